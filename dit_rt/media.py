"""Writing generated frames: mp4 (H.264 through the ffmpeg binary of the optional `video` extra), gif and png
in pure Python, webp via Pillow.

Frames arrive as a float tensor or array (T, H, W, C) in [0, 1]; they are rounded to uint8 once here. Nothing
here needs numpy: pixel bytes are read straight from the tensor's memory, and ffmpeg and Pillow take bytes.

Every file is written under a temporary name beside its target and renamed into place when complete, so a
failed write (a bad path, a full disk, ffmpeg refusing) leaves nothing behind and fails with one line.

`metadata` (prompt, seed, model, options) is stored as one JSON text in each format's comment field: the
mp4 `comment` tag, a PNG `tEXt` chunk with keyword `Comment`, a GIF comment extension, and the webp EXIF
ImageDescription. PNG, GIF and EXIF comments are 7-bit text, so there the JSON escapes non-ASCII characters.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

FORMATS = (".mp4", ".gif", ".png", ".webp")


class MediaWriteError(OSError):
    """An output file could not be written; the message is one line naming the file and the reason."""


def to_uint8(frames) -> torch.Tensor:
    """(T, H, W, C) floats in [0, 1] -> contiguous uint8 CPU tensor."""
    frames = torch.as_tensor(frames).detach().to("cpu", torch.float32)
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3):
        raise ValueError(f"expected frames shaped (T, H, W, C) with C in (1, 3), got {tuple(frames.shape)}")
    if frames.shape[-1] == 1:
        frames = frames.expand(*frames.shape[:-1], 3)
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()


def _bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a CPU tensor, without numpy (a core install has none)."""
    t = t.contiguous()
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())


def check_writer(path: str | Path) -> None:
    """Fail now, naming the extension or the extra to install, if `path` cannot be written in its format.

    Called before any generation work, so a missing extra costs nothing."""
    name, ext = Path(path).name, Path(path).suffix.lower()
    if ext not in FORMATS:
        raise ValueError(f"cannot save {name!r}: the extension must be one of {', '.join(FORMATS)}")
    if ext == ".mp4":
        try:
            import imageio_ffmpeg

            imageio_ffmpeg.get_ffmpeg_exe()
        except (ImportError, RuntimeError) as e:
            raise ImportError(
                "writing .mp4 needs the video extra: pip install 'dit-rt[video]' (or save as .gif or .png, "
                "which need nothing)"
            ) from e
    elif ext == ".webp":
        try:
            from PIL import Image  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "writing .webp needs Pillow: pip install 'dit-rt[video]' (or save as .gif or .png, which "
                "need nothing)"
            ) from e


def save(frames, path: str | Path, fps: int = 16, metadata: dict | None = None) -> list[Path]:
    """Write `frames` to `path`, the format chosen by the extension; returns the files written.

    A multi-frame video saved as .png becomes numbered files `stem_00000.png`, ... beside `path`.
    `metadata`: a JSON-serialisable dict stored in the file's comment (see the module docstring).
    Raises MediaWriteError (an OSError, one line) when the file cannot be written; nothing is left behind.
    """
    path = Path(path)
    check_writer(path)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    frames = to_uint8(frames)
    metadata = metadata or None
    ext = path.suffix.lower()
    if ext == ".png" and len(frames) > 1:
        targets = [path.with_name(f"{path.stem}_{i:05d}.png") for i in range(len(frames))]
    else:
        targets = [path]
    for p in targets:
        if p.is_dir():
            raise MediaWriteError(f"cannot write {p}: it is a directory; pass a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MediaWriteError(f"cannot write {path}: cannot create {path.parent} ({_reason(e)})") from None
    written: list[Path] = []
    try:
        if ext == ".mp4":
            _atomic(path, lambda tmp: _write_mp4(frames, tmp, fps, metadata))
        elif ext == ".webp":
            _atomic(path, lambda tmp: _write_webp(frames, tmp, fps, metadata))
        elif ext == ".gif":
            data = encode_gif(frames, fps, metadata)
            _atomic(path, lambda tmp: tmp.write_bytes(data))
        else:
            for p, f in zip(targets, frames):
                data = encode_png(f, metadata)
                _atomic(p, lambda tmp, data=data: tmp.write_bytes(data))
                written.append(p)
    except OSError as e:
        for p in written:  # a .png sequence stopped part way: no partial sequence stays behind
            p.unlink(missing_ok=True)
        raise MediaWriteError(f"cannot write {path}: {_reason(e)}") from None
    return targets


def _reason(e: OSError) -> str:
    if isinstance(e, MediaWriteError):
        return str(e)
    return e.strerror or str(e).strip().splitlines()[0]


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    """write(tmp) to a temporary name beside `path` (same extension, for ffmpeg and Pillow), then rename."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        tmp.open("wb").close()  # the OS's reason, before ffmpeg or Pillow would report it their own way
        write(tmp)
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise MediaWriteError("the writer produced no data")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _comment(metadata: dict, ascii_only: bool = True) -> str:
    """The metadata as one JSON text, non-ASCII escaped unless asked (PNG, GIF and EXIF text is 7-bit)."""
    return json.dumps(metadata, ensure_ascii=ascii_only, default=str)


def encode_png(image: torch.Tensor, metadata: dict | None = None) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (8-bit RGB, filter type 0 on every row), `metadata` in a tEXt chunk."""
    h, w, _ = image.shape
    rows = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), image.reshape(h, w * 3)], dim=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + (chunk(b"tEXt", b"Comment\0" + _comment(metadata).encode("ascii")) if metadata else b"")
        + chunk(b"IDAT", zlib.compress(_bytes(rows), 6))
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
    return _bytes(torch.stack([r, g, b], 1).to(torch.uint8))


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


def _sub_blocks(data: bytes) -> bytes:
    """GIF data sub-blocks: runs of at most 255 bytes, each after its length, then a zero terminator."""
    out = bytearray()
    for i in range(0, len(data), 255):
        block = data[i : i + 255]
        out += bytes([len(block)]) + block
    return bytes(out + b"\x00")


def encode_gif(frames: torch.Tensor, fps: float, metadata: dict | None = None) -> bytes:
    """(T, H, W, 3) uint8 -> animated GIF89a bytes with a fixed 256-colour palette, looping forever;
    `metadata` in a comment extension."""
    t, h, w, _ = frames.shape
    delay = max(1, round(100 / fps))  # GIF delays are in centiseconds
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", w, h, 0xF7, 0, 0) + _gif_palette())
    out += b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    if metadata:
        out += b"\x21\xfe" + _sub_blocks(_comment(metadata).encode("ascii"))
    for idx in _palette_indices(frames):
        out += b"\x21\xf9\x04\x00" + struct.pack("<H", delay) + b"\x00\x00"
        out += b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x08"
        out += _sub_blocks(_lzw(_bytes(idx)))
    out += b"\x3b"
    return bytes(out)


def _write_mp4(frames: torch.Tensor, path: Path, fps: float, metadata: dict | None) -> None:
    import imageio_ffmpeg

    t, h, w, _ = frames.shape
    # H.264 in yuv420p needs even sizes; macro_block_size=2 pads odd ones by one pixel instead of 16.
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (w, h),
        fps=fps,
        codec="libx264",
        quality=8,
        macro_block_size=2,
        ffmpeg_log_level="error",
        output_params=["-metadata", f"comment={_comment(metadata, ascii_only=False)}"] if metadata else None,
    )
    writer.send(None)  # start ffmpeg
    try:
        for frame in frames:
            writer.send(_bytes(frame))
    finally:
        writer.close()


def _write_webp(frames: torch.Tensor, path: Path, fps: float, metadata: dict | None) -> None:
    from PIL import Image

    _, h, w, _ = frames.shape
    images = [Image.frombytes("RGB", (w, h), _bytes(f)) for f in frames]
    exif = Image.Exif()
    if metadata:
        exif[0x010E] = _comment(metadata)  # ImageDescription
    images[0].save(
        path,
        format="WEBP",
        save_all=True,
        append_images=images[1:],
        duration=round(1000 / fps),
        loop=0,
        lossless=False,
        exif=exif.tobytes(),
    )
