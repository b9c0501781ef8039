"""Image inputs for image-to-video: loading, the VAE-side resize, CLIP preprocessing, the output size.

The pipeline's input side (files, PIL, arrays -> tensors), beside `media.py`, its output side: `models/`
holds the networks, which take the tensors made here.

Reference behaviour (diffusers 0.42.1 `WanImageToVideoPipeline`, transformers 5.24.0 `CLIPImageProcessor`):

- Video frame 0 (`resize_for_video`): diffusers' `VideoProcessor.preprocess(image, height, width)`. PIL
  images are resized with PIL Lanczos; tensors and arrays with `F.interpolate`'s default, nearest
  neighbour. Then [0, 1] -> [-1, 1].
- Image-encoder input (`clip_preprocess`): transformers' PIL backend (what `CLIPImageProcessor` runs without
  torchvision): shortest side to 224 with PIL bicubic, center crop 224, x / 255, (x - mean) / std.
- Output size (`derive_size`): the image's aspect ratio at a pixel budget, rounded to the latent grid.

Every input kind is accepted everywhere: a PIL image, a file path, a numpy array (H, W, C) or a torch tensor
(C, H, W) / (H, W, C), uint8 (0..255) or float (0..1). All become RGB: grey is repeated, an alpha channel is
composited over white (transformers' rule for CLIP; diffusers would pass 4 channels to the VAE and fail).
Where we deliberately differ from the references, for inputs they mishandle:
- float tensors/arrays for CLIP are quantised to uint8 by rounding and then follow the PIL path (transformers
  truncates, and then rescales by 1/255 a second time);
- uint8 tensors/arrays for the video frame are scaled to [0, 1] first (diffusers would normalise raw 0..255);
- files are opened with their EXIF orientation applied, as `diffusers.utils.load_image` does.

Pillow (and numpy, for array inputs) are imported only when an image is handled, never at `import dit_rt`.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    import PIL.Image

ImageInput = Any
"""A PIL image, a path (str / os.PathLike), a numpy array (H, W, C), a torch tensor (C, H, W) / (H, W, C)."""

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA


def _pil():
    try:
        import PIL.Image
        import PIL.ImageOps
    except ImportError as e:
        raise ImportError("image inputs need Pillow: pip install pillow") from e
    return PIL


def _is_pil(image) -> bool:
    mod = sys.modules.get("PIL.Image")
    return mod is not None and isinstance(image, mod.Image)


def _is_ndarray(image) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(image, np.ndarray)


def _pil_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    """RGB, compositing any transparency over white (as transformers' `convert_to_rgb`)."""
    PIL = _pil()
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        white = PIL.Image.new("RGBA", img.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _open(path) -> PIL.Image.Image:
    PIL = _pil()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {os.fspath(path)!r}")
    try:
        with PIL.Image.open(path) as img:
            img = PIL.ImageOps.exif_transpose(img)
            img.load()
    except PIL.UnidentifiedImageError as e:
        raise ValueError(f"{os.fspath(path)!r} is not an image file Pillow can read") from e
    return _pil_rgb(img)


def _tensor_chw(t: torch.Tensor, channels_last_first: bool) -> torch.Tensor:
    """An image tensor -> float32 [3, H, W] in [0, 1]. channels_last_first: try (H, W, C) before (C, H, W)."""
    shape = tuple(t.shape)
    if t.ndim == 4 and shape[0] == 1:
        t = t[0]  # a batch of one
    elif t.ndim == 2:
        t = t[None]  # grey (H, W)
    if t.ndim != 3:
        raise ValueError(f"expected one image (C, H, W) or (H, W, C), got a tensor of shape {shape}")
    first, last = t.shape[0] in _CHANNELS, t.shape[-1] in _CHANNELS
    if last and (channels_last_first or not first):
        t = t.permute(2, 0, 1)
    elif not first:
        raise ValueError(
            f"image of shape {shape}: expected 1 (grey), 3 (RGB) or 4 (RGBA) channels first or last"
        )
    if t.dtype == torch.uint8:
        t = t.float() / 255
    elif t.is_floating_point():
        t = t.float()
        lo, hi = t.min().item(), t.max().item()
        if lo < 0 or hi > 1:
            raise ValueError(
                f"float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]: map [-1, 1] data with "
                "(x + 1) / 2, pass 0..255 data as uint8"
            )
    else:
        raise TypeError(f"image tensors must be uint8 (0..255) or float (0..1), got {t.dtype}")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    elif t.shape[0] == 4:
        rgb, alpha = t[:3], t[3:]
        t = rgb * alpha + (1 - alpha)  # over white
    return t.contiguous()


def _canonical(image: ImageInput) -> PIL.Image.Image | torch.Tensor:
    """An RGB PIL image (PIL images and files) or a float32 [3, H, W] tensor in [0, 1] (arrays, tensors)."""
    if isinstance(image, (str, os.PathLike)):
        return _open(image)
    if _is_pil(image):
        return _pil_rgb(image)
    if _is_ndarray(image):
        if image.dtype.kind not in "uf":
            raise TypeError(f"image arrays must be uint8 (0..255) or float (0..1), got {image.dtype}")
        if image.dtype.kind == "u" and image.dtype.itemsize != 1:
            raise TypeError(f"image arrays must be uint8 (0..255) or float (0..1), got {image.dtype}")
        return _tensor_chw(torch.from_numpy(image.copy()), channels_last_first=True)
    if isinstance(image, torch.Tensor):
        return _tensor_chw(image.detach().cpu(), channels_last_first=False)
    raise TypeError(
        f"unsupported image type {type(image).__name__}: pass a PIL image, a file path, a numpy array "
        "(H, W, C) or a torch tensor (C, H, W)"
    )


def _pil_to_uint8(img: PIL.Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W]."""
    hwc = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
    return hwc.permute(2, 0, 1)


def _float_to_pil(chw: torch.Tensor) -> PIL.Image.Image:
    """float [3, H, W] in [0, 1] -> RGB PIL image, rounding to the nearest level."""
    PIL = _pil()
    hwc = (chw * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    return PIL.Image.frombytes("RGB", (hwc.shape[1], hwc.shape[0]), bytes(hwc.flatten().tolist()))


def load_image(image: ImageInput) -> torch.Tensor:
    """Any supported image input -> float32 [3, H, W] RGB in [0, 1] on the CPU (uint8 inputs give k / 255)."""
    x = _canonical(image)
    return _pil_to_uint8(x).float() / 255 if not isinstance(x, torch.Tensor) else x


def image_size(image: ImageInput) -> tuple[int, int]:
    """(height, width) of an image input, after EXIF orientation for files."""
    x = _canonical(image)
    return (x.shape[1], x.shape[2]) if isinstance(x, torch.Tensor) else (x.height, x.width)


def _check_hw(height, width) -> None:
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def resize_for_video(image: ImageInput, height: int, width: int) -> torch.Tensor:
    """Frame 0 as diffusers' Wan I2V pipeline makes it: float32 [1, 3, height, width] in [-1, 1].

    PIL images and files: PIL Lanczos resize to (width, height). Tensors and arrays: nearest-neighbour
    `F.interpolate`, as diffusers does for tensors. The aspect ratio is not kept (pick height/width with
    `derive_size`); unlike diffusers, height and width are not floored to multiples of 8 here: the pipeline
    checks that they fit the latent grid.
    """
    _check_hw(height, width)
    x = _canonical(image)
    if isinstance(x, torch.Tensor):
        x = F.interpolate(x[None], size=(height, width))  # [1, 3, H, W], mode="nearest"
    else:
        PIL = _pil()
        x = x.resize((width, height), resample=PIL.Image.Resampling.LANCZOS)
        x = _pil_to_uint8(x)[None].float() / 255
    return 2.0 * x - 1.0


def derive_size(
    image: ImageInput | tuple[int, int],
    max_area: int,
    grid: int = 16,
    *,
    rounding: Literal["diffusers", "wan"] = "diffusers",
) -> tuple[int, int]:
    """(height, width) with the image's aspect ratio, about `max_area` pixels, multiples of `grid`.

    image: an image input or its (height, width). max_area: 480 * 832 (480p) or 720 * 1280 (720p).
    grid: VAE spatial factor x transformer patch size (8 x 2 = 16 for Wan 2.1/2.2 A14B).
    rounding "diffusers" (the Diffusers docs example): round(sqrt(max_area * h / w)) // grid * grid.
    rounding "wan" (the authors' generate scripts): floor(sqrt(max_area * h / w) / grid) * grid; the two
    differ only when the square root lies within half a pixel below a multiple of grid.
    """
    h, w = (int(v) for v in image) if isinstance(image, tuple) else image_size(image)
    if min(h, w, max_area, grid) <= 0:
        raise ValueError(f"image size {h}x{w}, max_area {max_area} and grid {grid} must all be positive")
    aspect = h / w
    sides = math.sqrt(max_area * aspect), math.sqrt(max_area / aspect)
    if rounding == "diffusers":
        height, width = (round(s) // grid * grid for s in sides)
    elif rounding == "wan":
        height, width = (int(s // grid) * grid for s in sides)
    else:
        raise ValueError(f"rounding {rounding!r}: expected 'diffusers' or 'wan'")
    if height < grid or width < grid:
        raise ValueError(
            f"a {h}x{w} image at max_area={max_area} gives {height}x{width}: the aspect ratio is too extreme "
            f"for a {grid}-pixel grid; crop the image or pass height/width"
        )
    return height, width


@dataclass(frozen=True)
class CLIPImageConfig:
    """transformers `CLIPImageProcessor` settings, named as in `image_processor/preprocessor_config.json`.

    size: an int resizes the shortest side to it (the other side int(size * long / short), truncated);
    a (height, width) pair resizes to exactly that. crop_size: (height, width). resample: a PIL filter
    number (3 = bicubic). Defaults are OpenAI CLIP at 224 px, which Wan 2.1 I2V uses.
    """

    do_resize: bool = True
    size: int | tuple[int, int] = 224
    resample: int = 3
    do_center_crop: bool = True
    crop_size: tuple[int, int] = (224, 224)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def from_config(cls, config: dict) -> CLIPImageConfig:
        """Read a `preprocessor_config.json` dict (current `{"shortest_edge": n}` or legacy int sizes)."""
        kwargs = {}
        for key in (
            "do_resize",
            "resample",
            "do_center_crop",
            "do_rescale",
            "rescale_factor",
            "do_normalize",
        ):
            if key in config:
                kwargs[key] = config[key]
        for key in ("image_mean", "image_std"):
            if key in config:
                v = config[key]
                kwargs[key] = tuple(v) if isinstance(v, (list, tuple)) else (v,) * 3
        if "size" in config:
            kwargs["size"] = _size(config["size"], "size", allow_shortest=True)
        if "crop_size" in config:
            kwargs["crop_size"] = _size(config["crop_size"], "crop_size", allow_shortest=False)
        return cls(**kwargs)


def _size(v, name: str, allow_shortest: bool) -> int | tuple[int, int]:
    if isinstance(v, int):
        return v if allow_shortest else (v, v)
    if isinstance(v, dict):
        if set(v) == {"shortest_edge"} and allow_shortest:
            return int(v["shortest_edge"])
        if set(v) == {"height", "width"}:
            return int(v["height"]), int(v["width"])
    raise ValueError(
        f"preprocessor_config {name}={v!r}: unsupported (expected an int, shortest_edge, height/width)"
    )


def _center_crop(x: torch.Tensor, ch: int, cw: int) -> torch.Tensor:
    """[C, H, W] -> [C, ch, cw]: offsets floor((H - ch) / 2); a smaller image is zero-padded, centred with
    the extra pixel before it (transformers' `center_crop`)."""
    _, h, w = x.shape
    if h < ch or w < cw:
        top, left = math.ceil(max(ch - h, 0) / 2), math.ceil(max(cw - w, 0) / 2)
        canvas = x.new_zeros(x.shape[0], max(h, ch), max(w, cw))
        canvas[:, top : top + h, left : left + w] = x
        x, h, w = canvas, canvas.shape[1], canvas.shape[2]
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[:, top : top + ch, left : left + cw]


def clip_preprocess(
    image: ImageInput | list[ImageInput], config: CLIPImageConfig | None = None
) -> torch.Tensor:
    """Image(s) -> CLIP pixel_values float32 [N, 3, crop_h, crop_w] (N = 1 for a single image).

    Matches transformers' `CLIPImageProcessor` (PIL backend) on PIL images and uint8 arrays; a list gives
    a batch (first-last-frame conditioning encodes two images).
    """
    cfg = config or CLIPImageConfig()
    images = image if isinstance(image, (list, tuple)) else [image]
    if not images:
        raise ValueError("clip_preprocess got an empty list of images")
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(cfg.image_std, dtype=torch.float32)[:, None, None]
    out = []
    for img in images:
        x = _canonical(img)
        pil = _float_to_pil(x) if isinstance(x, torch.Tensor) else x
        if cfg.do_resize:
            if isinstance(cfg.size, int):
                short, long = sorted((pil.height, pil.width))
                new_long = int(cfg.size * long / short)
                h, w = (cfg.size, new_long) if pil.height <= pil.width else (new_long, cfg.size)
            else:
                h, w = cfg.size
            pil = pil.resize((w, h), resample=cfg.resample)
        u8 = _pil_to_uint8(pil)  # [3, H, W]
        if cfg.do_center_crop:
            u8 = _center_crop(u8, *cfg.crop_size)
        # transformers rescales in float64 and stores float32; normalisation then runs in float32.
        x = (u8.double() * cfg.rescale_factor).float() if cfg.do_rescale else u8.float()
        if cfg.do_normalize:
            x = (x - mean) / std
        out.append(x)
    shapes = {tuple(x.shape) for x in out}
    if len(shapes) > 1:
        raise ValueError(f"preprocessed images differ in size {sorted(shapes)}: enable do_center_crop")
    return torch.stack(out)  # [N, 3, h, w]
