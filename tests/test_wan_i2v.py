"""Wan image-to-video against diffusers' WanImageToVideoPipeline on identical tiny random checkpoints, from
the same initial latents: Wan 2.1 I2V (CLIP image tokens) and Wan 2.2 I2V A14B (two experts, no CLIP)."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_checkpoints import make_wan_i2v

import dit_rt


@pytest.fixture(scope="module", params=[False, True], ids=["wan2.1-i2v", "wan2.2-i2v-a14b"])
def i2v(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("i2v")
    ref = make_wan_i2v(path, wan22=request.param)
    return path, ref, dit_rt.load(str(path), device="cpu", dtype=torch.float32)


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("height,width,frames,steps", [(32, 32, 5, 2), (48, 64, 9, 3)])
def test_i2v_matches_diffusers(i2v, height, width, frames, steps):
    path, ref, pipe = i2v
    image = _image(40, 56)
    shape = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    kw = dict(height=height, width=width, num_frames=frames, num_inference_steps=steps, guidance_scale=4.0)
    expected = ref(
        image=image, prompt="a cat", negative_prompt="blurry", latents=latents.clone(), output_type="np", **kw
    ).frames
    out = pipe.generate("a cat", "blurry", image=image, latents=latents.clone(), progress_bar=False, **kw)
    assert out.frames.shape == (1, frames, height, width, 3)
    assert np.abs(out.frames.numpy() - np.asarray(expected)).max() <= 1e-3


def test_i2v_conditioning_matters_and_is_required(i2v):
    _, _, pipe = i2v
    kw = dict(
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=2,
        seed=0,
        progress_bar=False,
        output_type="latents",
    )
    a = pipe.generate("a cat", image=_image(32, 32, 1), **kw).latents
    b = pipe.generate("a cat", image=_image(32, 32, 2), **kw).latents
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="image-to-video: pass image="):
        pipe.generate("a cat", **kw)
    with pytest.raises((ValueError, TypeError), match="image"):
        pipe.generate("a cat", image=42, **kw)


def test_i2v_size_from_image_aspect(i2v):
    _, _, pipe = i2v
    pipe.defaults = type(pipe.defaults)(64, 64, 5, 16, 1, 1.0)  # a 64x64 pixel budget for the tiny model
    out = pipe.generate("a cat", image=_image(30, 120), num_inference_steps=1, seed=0, progress_bar=False)
    _, _, h, w, _ = out.frames.shape
    assert w > h and h % 16 == 0 and w % 16 == 0 and h * w <= 64 * 64


def test_clip_branch_is_decided_by_the_weights(tmp_path):
    """A Wan 2.1 I2V folder whose config.json says `image_dim: null` (as some Hub revisions do) still loads
    with its CLIP branch, because the checkpoint holds `attn2.add_k_proj`."""
    import json
    import shutil

    src = tmp_path / "src"
    make_wan_i2v(src)
    edited = tmp_path / "edited"
    shutil.copytree(src, edited)
    cfg_path = edited / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["image_dim"] = cfg["added_kv_proj_dim"] = None
    cfg_path.write_text(json.dumps(cfg))
    kw = dict(
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=2,
        seed=0,
        progress_bar=False,
        output_type="latents",
        image=_image(32, 32),
    )
    a = dit_rt.load(str(src), device="cpu", dtype=torch.float32)
    b = dit_rt.load(str(edited), device="cpu", dtype=torch.float32)
    assert b.transformers[0].cfg.image_dim == a.transformers[0].cfg.image_dim is not None
    assert b.image_encoder is not None
    assert torch.equal(a.generate("a cat", **kw).latents, b.generate("a cat", **kw).latents)
