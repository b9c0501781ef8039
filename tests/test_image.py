"""Image inputs for I2V against the references: transformers 5.24.0 CLIPImageProcessor (its PIL backend, which
`CLIPImageProcessor` is without torchvision) and diffusers 0.42.1's VideoProcessor as WanImageToVideoPipeline
calls it; output-size rules of the Diffusers docs example and the authors' Wan I2V script."""

from __future__ import annotations

import inspect
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from dit_rt.image import CLIPImageConfig, clip_preprocess, derive_size, load_image, resize_for_video

# Wan-AI/Wan2.1-I2V-14B-*-Diffusers image_processor/preprocessor_config.json
WAN_PREPROCESSOR = {
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224},
}  # fmt: skip

SIZES = [(300, 200), (200, 300), (224, 224), (97, 151), (513, 231), (224, 225)]  # (width, height)


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    g = np.random.default_rng(seed)
    bands = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = g.integers(0, 256, (height, width, bands), dtype=np.uint8)
    # Smooth structure plus noise, so resampling filters see more than white noise.
    ramp = np.linspace(0, 120, width, dtype=np.float32)[None, :, None]
    arr = np.clip(arr * 0.5 + ramp, 0, 255).astype(np.uint8)
    return Image.fromarray(arr[..., 0] if bands == 1 else arr, mode)


def reference_clip(images, config: dict) -> torch.Tensor:
    return CLIPImageProcessorPil(**config)(images=images, return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("size", SIZES)
def test_clip_preprocess_matches_transformers_on_pil(size):
    img = random_image(*size, seed=size[0])
    want = reference_clip(img, WAN_PREPROCESSOR)
    got = clip_preprocess(img, CLIPImageConfig.from_config(WAN_PREPROCESSOR))
    assert got.shape == want.shape == (1, 3, 224, 224) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_clip_preprocess_converts_modes_like_transformers(mode):
    img = random_image(180, 260, mode=mode, seed=7)
    torch.testing.assert_close(clip_preprocess(img), reference_clip(img, WAN_PREPROCESSOR), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "config",
    [
        # tiny shortest-edge config (hf-internal-testing style)
        {**WAN_PREPROCESSOR, "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
        # crop larger than the resized image: zero padding, centred as transformers does
        {**WAN_PREPROCESSOR, "size": {"shortest_edge": 21}, "crop_size": {"height": 32, "width": 27}},
        # legacy feature-extractor ints, bilinear, no normalisation
        {"size": 40, "crop_size": 36, "resample": 2, "do_normalize": False},
        # exact (height, width) resize without crop
        {**WAN_PREPROCESSOR, "size": {"height": 48, "width": 40}, "do_center_crop": False},
    ],
)
def test_clip_preprocess_configs_match_transformers(config):
    imgs = [random_image(77, 130, seed=1), random_image(130, 77, seed=2)]
    ours = CLIPImageConfig.from_config(config)
    want = reference_clip(imgs, config)
    got = clip_preprocess(imgs, ours)  # a list gives a batch (first-last-frame conditioning)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_clip_preprocess_on_arrays_and_tensors():
    """uint8 arrays match transformers exactly; float tensors (k/255) round to the same uint8 image."""
    img = random_image(150, 90, seed=4)
    arr = np.array(img)
    want = reference_clip(img, WAN_PREPROCESSOR)
    torch.testing.assert_close(reference_clip(arr, WAN_PREPROCESSOR), want, atol=1e-6, rtol=0)
    for x in (arr, torch.from_numpy(arr).permute(2, 0, 1), load_image(img), torch.from_numpy(arr) / 255.0):
        torch.testing.assert_close(clip_preprocess(x), want, atol=1e-6, rtol=0)


def test_clip_config_defaults_are_the_wan_config():
    assert CLIPImageConfig.from_config(WAN_PREPROCESSOR) == CLIPImageConfig()
    with pytest.raises(ValueError, match="size"):
        CLIPImageConfig.from_config({"size": {"longest_edge": 224}})


def test_pipeline_resizes_with_video_processor_preprocess():
    """Pins what the reference pipeline does with `image`, so the comparisons below are the right ones."""
    from diffusers import WanImageToVideoPipeline

    src = inspect.getsource(WanImageToVideoPipeline)
    assert "VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)" in src
    assert "self.video_processor.preprocess(image, height=height, width=width)" in src


def _diffusers_video_preprocess(image, height, width):
    from diffusers.video_processor import VideoProcessor

    return VideoProcessor(vae_scale_factor=8).preprocess(image, height=height, width=width)


@pytest.mark.parametrize("size", SIZES[:4])
@pytest.mark.parametrize("target", [(480, 832), (64, 48), (224, 224)])
def test_resize_for_video_matches_diffusers_on_pil(size, target):
    img = random_image(*size, seed=sum(size))
    want = _diffusers_video_preprocess(img, *target)
    got = resize_for_video(img, *target)
    assert got.shape == want.shape == (1, 3, *target)
    assert got.min() >= -1 and got.max() <= 1
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("target", [(64, 48), (48, 96), (96, 160)])
def test_resize_for_video_matches_diffusers_on_tensors(target):
    x = torch.rand(3, 90, 150, generator=torch.Generator().manual_seed(0))  # (C, H, W) in [0, 1]
    want = _diffusers_video_preprocess(x, *target)  # nearest-neighbour F.interpolate
    torch.testing.assert_close(resize_for_video(x, *target), want, atol=1e-6, rtol=0)
    # The same image as (H, W, C) numpy or a batch of one resizes identically.
    torch.testing.assert_close(resize_for_video(x.permute(1, 2, 0).numpy(), *target), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(resize_for_video(x[None], *target), want, atol=1e-6, rtol=0)


def test_load_image_every_input_kind(tmp_path):
    img = random_image(40, 30, seed=9)
    want = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255  # [3, 30, 40]
    path = tmp_path / "frame.png"
    img.save(path)
    arr = np.array(img)
    inputs = [
        img,
        path,
        str(path),
        arr,
        arr / 255.0,
        torch.from_numpy(arr),
        torch.from_numpy(arr).permute(2, 0, 1),
    ]
    for x in inputs:
        got = load_image(x)
        assert got.dtype == torch.float32 and got.shape == (3, 30, 40), type(x)
        torch.testing.assert_close(got, want, atol=1e-7, rtol=0)


def test_load_image_modes_and_orientation(tmp_path):
    rgba = random_image(20, 10, mode="RGBA", seed=3)
    a = np.asarray(rgba).astype(np.float32) / 255
    over_white = a[..., :3] * a[..., 3:] + (1 - a[..., 3:])
    torch.testing.assert_close(
        load_image(rgba), torch.from_numpy(over_white).permute(2, 0, 1), atol=1 / 255, rtol=0
    )
    torch.testing.assert_close(
        load_image(a), torch.from_numpy(over_white).permute(2, 0, 1), atol=1e-6, rtol=0
    )
    grey = load_image(random_image(20, 10, mode="L", seed=3))
    assert grey.shape == (3, 10, 20) and torch.equal(grey[0], grey[2])
    # A file with EXIF orientation 6 (rotated 90 degrees) loads upright, as diffusers' load_image does.
    img = random_image(40, 30, seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.png"
    img.save(path, exif=exif)
    got = load_image(path)
    assert got.shape == (3, 40, 30)
    torch.testing.assert_close(got, load_image(img.transpose(Image.Transpose.ROTATE_270)), atol=0, rtol=0)


def _diffusers_docs_size(h, w, max_area, mod=16):
    aspect_ratio = h / w
    return (
        round(np.sqrt(max_area * aspect_ratio)) // mod * mod,
        round(np.sqrt(max_area / aspect_ratio)) // mod * mod,
    )


def _wan_script_size(h, w, max_area, stride=8, patch=2):
    aspect_ratio = h / w
    lat_h = round(np.sqrt(max_area * aspect_ratio) // stride // patch * patch)
    lat_w = round(np.sqrt(max_area / aspect_ratio) // stride // patch * patch)
    return lat_h * stride, lat_w * stride


def test_derive_size_cases():
    a480, a720 = 480 * 832, 720 * 1280
    assert derive_size(random_image(1280, 720), a480) == (464, 832)
    assert derive_size(random_image(720, 1280), a480) == (832, 464)
    assert derive_size((512, 512), a480) == (624, 624)
    assert derive_size((1080, 1920), a720) == (720, 1280)
    assert derive_size((1024, 1024), a720) == (960, 960)
    # Where the two rounding rules part: sqrt(399360 * 108 / 1000) = 207.68.
    assert derive_size((108, 1000), a480) == (208, 1920)
    assert derive_size((108, 1000), a480, rounding="wan") == (192, 1920)
    g = np.random.default_rng(0)
    for h, w in g.integers(64, 4000, (300, 2)):
        h, w = int(h), int(w)
        for area in (a480, a720):
            if min(_diffusers_docs_size(h, w, area)) >= 16 and min(_wan_script_size(h, w, area)) >= 16:
                assert derive_size((h, w), area) == _diffusers_docs_size(h, w, area)
                assert derive_size((h, w), area, rounding="wan") == _wan_script_size(h, w, area)
    # Arrays and tensors give their own (H, W).
    assert derive_size(np.zeros((720, 1280, 3), np.uint8), a480) == (464, 832)
    assert derive_size(torch.zeros(3, 720, 1280), a480) == (464, 832)
    with pytest.raises(ValueError, match="aspect ratio is too extreme"):
        derive_size((10, 20000), a480)
    assert derive_size((np.int64(720), np.int64(1280)), a480) == (464, 832)
    with pytest.raises(ValueError, match="positive"):
        derive_size((0, 1280), a480)
    with pytest.raises(ValueError, match="rounding"):
        derive_size((10, 20), a480, rounding="nearest")


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(TypeError, match="unsupported image type int"):
        load_image(3)
    with pytest.raises(TypeError, match="unsupported image type dict"):
        clip_preprocess({"image": 1})
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="not an image file"):
        resize_for_video(str(tmp_path / "notes.txt"), 16, 16)
    with pytest.raises(ValueError, match="channels"):
        load_image(np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match="channels"):
        load_image(torch.zeros(5, 8, 8))
    with pytest.raises(ValueError, match="one image"):
        load_image(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_image(torch.full((3, 8, 8), -0.5))
    with pytest.raises(TypeError, match="uint8"):
        load_image(torch.zeros(3, 8, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="uint8"):
        load_image(np.zeros((8, 8, 3), np.uint16))
    with pytest.raises(ValueError, match="height"):
        resize_for_video(torch.zeros(3, 8, 8), 0, 16)


def test_import_does_not_load_pil():
    probe = "import sys, dit_rt.image, dit_rt.models.text.clip; assert 'PIL' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
