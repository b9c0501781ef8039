"""Whole Wan text-to-video pipelines against diffusers' WanPipeline on identical tiny random checkpoints,
from the same initial latents: frames must agree to 1e-3."""

import numpy as np
import pytest
import torch
from tiny_checkpoints import make_wan_t2v

import dit_rt

PROMPTS = ["a cat and a dog baking a cake", "the dog on a cake"]


@pytest.fixture(scope="module")
def wan21(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan21")
    return path, make_wan_t2v(path)


@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan22")
    return path, make_wan_t2v(path, two_experts=True, boundary_ratio=0.6)


def _run_both(
    path, ref, *, prompts, height, width, frames, steps, guidance, guidance_2=None, negative="blurry"
):
    z = ref.vae.config.z_dim
    shape = (len(prompts), z, (frames - 1) // 4 + 1, height // 8, width // 8)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    kw = dict(
        height=height, width=width, num_frames=frames, num_inference_steps=steps, guidance_scale=guidance
    )
    if guidance_2 is not None:
        kw["guidance_scale_2"] = guidance_2
    expected = ref(
        prompt=prompts,
        negative_prompt=[negative] * len(prompts),
        latents=latents.clone(),
        output_type="np",
        **kw,
    ).frames
    pipe = dit_rt.load(str(path), device="cpu", dtype=torch.float32)
    out = pipe.generate(prompts, negative, latents=latents.clone(), progress_bar=False, **kw)
    return np.asarray(expected), out


@pytest.mark.parametrize(
    "prompts,height,width,frames,steps,guidance",
    [
        (PROMPTS[:1], 32, 32, 5, 2, 5.0),
        (PROMPTS, 48, 64, 9, 3, 4.0),  # batch of two, non-square
        (PROMPTS[:1], 64, 32, 1, 4, 1.0),  # one frame, no guidance
        (PROMPTS[:1], 32, 48, 13, 5, 6.5),
    ],
)
def test_wan21_matches_diffusers(wan21, prompts, height, width, frames, steps, guidance):
    path, ref = wan21
    expected, out = _run_both(
        path, ref, prompts=prompts, height=height, width=width, frames=frames, steps=steps, guidance=guidance
    )
    assert out.frames.shape == expected.shape == (len(prompts), frames, height, width, 3)
    assert out.frames.dtype == torch.float32
    assert np.abs(out.frames.numpy() - expected).max() <= 1e-3


@pytest.mark.parametrize("guidance,guidance_2", [(4.0, 3.0), (5.0, None)])
def test_wan22_two_experts_match_diffusers(wan22, guidance, guidance_2):
    path, ref = wan22
    expected, out = _run_both(
        path,
        ref,
        prompts=PROMPTS[:1],
        height=32,
        width=48,
        frames=5,
        steps=4,
        guidance=guidance,
        guidance_2=guidance_2,
    )
    assert np.abs(out.frames.numpy() - expected).max() <= 1e-3


def test_both_experts_are_used(wan22):
    path, _ = wan22
    pipe = dit_rt.load(str(path), device="cpu", dtype=torch.float32)
    assert len(pipe.transformers) == 2
    calls = []
    for i, model in enumerate(pipe.transformers):
        model.register_forward_hook(lambda *_, i=i: calls.append(i))
    pipe.generate(
        "a cat",
        height=32,
        width=32,
        num_frames=1,
        num_inference_steps=4,
        guidance_scale=1.0,
        output_type="latents",
        progress_bar=False,
        seed=0,
    )
    # boundary 0.6 -> timestep 600: the high-noise expert runs first, the low-noise one after.
    assert calls[0] == 0 and calls[-1] == 1 and calls == sorted(calls)


def test_parked_expert_moves_with_the_boundary(wan22, monkeypatch):
    path, _ = wan22
    kw = dict(height=32, width=32, num_frames=1, num_inference_steps=4, seed=0, progress_bar=False)
    pipe = dit_rt.load(str(path), device="cpu", dtype=torch.float32, park_experts=True)
    assert pipe.park_experts
    base = pipe.generate("a cat", output_type="latents", **kw).latents
    moves = []
    for i, model in enumerate(pipe.transformers):  # record moves instead of making them
        monkeypatch.setattr(model, "to", lambda dev, i=i, m=model: moves.append((i, str(dev))) or m)
    monkeypatch.setattr(pipe, "device", torch.device("cuda"))  # pretend the experts live elsewhere
    for t in (999, 800, 601, 599, 300, 10):  # boundary 600
        expert, _ = pipe._expert(torch.tensor(t), 4.0, 3.0)
        assert expert is pipe.transformers[0 if t >= 600 else 1]
    # The high-noise expert comes in first with the other parked; past the boundary they trade places.
    assert moves[:2] == [(1, "cpu"), (0, "cuda")] and (0, "cpu") in moves and (1, "cuda") in moves
    monkeypatch.undo()
    again = dit_rt.load(str(path), device="cpu", dtype=torch.float32, park_experts=False)
    assert torch.equal(base, again.generate("a cat", output_type="latents", **kw).latents)
