"""Writing generated frames: mp4 (H.264 via the optional `video` extra), gif and png in pure Python, webp via
Pillow.

Frames arrive as a float tensor or array (T, H, W, C) in [0, 1]; they are rounded to uint8 once here.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch

FORMATS = (".mp4", ".gif", ".png", ".webp")


def to_uint8(frames) -> torch.Tensor:
    """(T, H, W, C) floats in [0, 1] -> contiguous uint8 CPU tensor."""
    frames = torch.as_tensor(frames).detach().to("cpu", torch.float32)
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3):
        raise ValueError(f"expected frames shaped (T, H, W, C) with C in (1, 3), got {tuple(frames.shape)}")
    if frames.shape[-1] == 1:
        frames = frames.expand(*frames.shape[:-1], 3)
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()


def save(frames, path: str | Path, fps: int = 16) -> list[Path]:
    """Write `frames` to `path`, the format chosen by the extension; returns the files written.

    A multi-frame video saved as .png becomes numbered files `stem_00000.png`, ... beside `path`.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in FORMATS:
        raise ValueError(f"cannot save {path.name!r}: the extension must be one of {', '.join(FORMATS)}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = to_uint8(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    if ext == ".mp4":
        return [_write_mp4(frames, path, fps)]
    if ext == ".gif":
        path.write_bytes(encode_gif(frames, fps))
        return [path]
    if ext == ".webp":
        return [_write_webp(frames, path, fps)]
    if len(frames) == 1:
        path.write_bytes(encode_png(frames[0]))
        return [path]
    paths = [path.with_name(f"{path.stem}_{i:05d}.png") for i in range(len(frames))]
    for p, f in zip(paths, frames):
        p.write_bytes(encode_png(f))
    return paths


def encode_png(image: torch.Tensor) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (8-bit RGB, filter type 0 on every row)."""
    h, w, _ = image.shape
    rows = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), image.reshape(h, w * 3)], dim=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.numpy().tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def _palette_indices(frames: torch.Tensor) -> torch.Tensor:
    """Map RGB to a fixed 3-3-2 bit palette (8 red x 8 green x 4 blue levels) with rounding."""
    f = frames.to(torch.int32)
    r = (f[..., 0] * 7 + 127) // 255
    g = (f[..., 1] * 7 + 127) // 255
    b = (f[..., 2] * 3 + 127) // 255
    return (r << 5 | g << 2 | b).to(torch.uint8)


def _gif_palette() -> bytes:
    idx = torch.arange(256)
    r, g, b = (idx >> 5) * 255 // 7, ((idx >> 2) & 7) * 255 // 7, (idx & 3) * 255 // 3
    return torch.stack([r, g, b], 1).to(torch.uint8).numpy().tobytes()


def _lzw(indices: bytes, min_code_size: int = 8) -> bytes:
    """GIF-flavoured LZW: variable code width up to 12 bits, clear code on a full table."""
    clear, end = 1 << min_code_size, (1 << min_code_size) + 1
    table = {bytes([i]): i for i in range(clear)}
    next_code, width = end + 1, min_code_size + 1
    out, acc, nbits = bytearray(), 0, 0

    def emit(code: int):
        nonlocal acc, nbits
        acc |= code << nbits
        nbits += width
        while nbits >= 8:
            out.append(acc & 0xFF)
            acc >>= 8
            nbits -= 8

    emit(clear)
    prefix = b""
    for byte in indices:
        cand = prefix + bytes([byte])
        if cand in table:
            prefix = cand
            continue
        emit(table[prefix])
        if next_code < 4096:
            table[cand] = next_code
            next_code += 1
            if next_code > (1 << width) and width < 12:
                width += 1
        else:
            emit(clear)
            table = {bytes([i]): i for i in range(clear)}
            next_code, width = end + 1, min_code_size + 1
        prefix = bytes([byte])
    if prefix:
        emit(table[prefix])
    emit(end)
    if nbits:
        out.append(acc & 0xFF)
    return bytes(out)


def encode_gif(frames: torch.Tensor, fps: int) -> bytes:
    """(T, H, W, 3) uint8 -> animated GIF89a bytes with a fixed 256-colour palette, looping forever."""
    t, h, w, _ = frames.shape
    delay = max(1, round(100 / fps))  # GIF delays are in centiseconds
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", w, h, 0xF7, 0, 0) + _gif_palette())
    out += b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    for idx in _palette_indices(frames):
        out += b"\x21\xf9\x04\x00" + struct.pack("<H", delay) + b"\x00\x00"
        out += b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x08"
        data = _lzw(idx.numpy().tobytes())
        for i in range(0, len(data), 255):
            block = data[i : i + 255]
            out += bytes([len(block)]) + block
        out += b"\x00"
    out += b"\x3b"
    return bytes(out)


def _write_mp4(frames: torch.Tensor, path: Path, fps: int) -> Path:
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary imageio writes through)
    except ImportError as e:
        raise ImportError(
            "writing .mp4 needs the video extra: pip install 'dit-rt[video]' (or save as .gif / .webp / .png)"
        ) from e
    # H.264 in yuv420p needs even sizes; macro_block_size=2 pads odd ones by one pixel instead of 16.
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=2) as writer:
        for frame in frames.numpy():
            writer.append_data(frame)
    return path


def _write_webp(frames: torch.Tensor, path: Path, fps: int) -> Path:
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError(
            "writing .webp needs Pillow: pip install 'dit-rt[video]' (or save as .gif / .png)"
        ) from e
    images = [Image.fromarray(f) for f in frames.numpy()]
    images[0].save(
        path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0, lossless=False
    )
    return path
