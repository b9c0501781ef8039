"""The whole FLUX.1 pipeline against diffusers' FluxPipeline on an identical tiny random checkpoint, from the
same packed initial latents (or the same seed): images must agree to 1e-3."""

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_checkpoints import make_flux

import dit_rt
from dit_rt.pipelines.flux import calculate_shift, pack_latents, unpack_latents

PROMPTS = ["a cat baking a cake", "the red dog on a cake"]
T5_TOKENS = 32  # max_sequence_length of both sides: a short T5 sequence keeps the test fast


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux")
    ref = make_flux(path)
    pipe = dit_rt.load(str(path), device="cpu", dtype=torch.float32)
    return path, ref, pipe


def _packed_noise(batch, height, width, seed=0):
    shape = (batch, 16, height // 8, width // 8)
    return pack_latents(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize(
    "prompts,height,width,steps,guidance,true_cfg,negative",
    [
        (PROMPTS[:1], 64, 48, 3, 3.5, 1.0, None),  # embedded guidance only, non-square
        (PROMPTS[:1], 32, 32, 2, 3.5, 2.5, "blurry"),  # true CFG with a negative prompt
        (PROMPTS, 32, 64, 2, 4.0, 1.0, None),  # batch of two, non-square
        (PROMPTS, 48, 32, 2, 3.5, 3.0, ["blurry", "a dog"]),  # batch of two with true CFG
        (PROMPTS[:1], 32, 32, 2, 3.5, 1.0, "blurry"),  # a negative prompt without true_cfg_scale: ignored
    ],
)
def test_flux_matches_diffusers(flux, prompts, height, width, steps, guidance, true_cfg, negative):
    _, ref, pipe = flux
    latents = _packed_noise(len(prompts), height, width)
    kw = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=guidance)
    kw |= dict(true_cfg_scale=true_cfg, negative_prompt=negative, max_sequence_length=T5_TOKENS)
    expected = ref(prompt=prompts, latents=latents.clone(), output_type="np", **kw).images
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = pipe.generate(prompts, latents=latents.clone(), progress_bar=False, **kw)
    finally:
        hook.remove()
    assert out.frames.shape == (len(prompts), 1, height, width, 3)
    assert out.frames.dtype == torch.float32
    assert np.abs(out.frames[:, 0].numpy() - expected).max() <= 1e-3
    assert out.latents.shape == latents.shape  # FluxPipeline's packed layout
    # Embedded guidance: one transformer pass per step; true CFG adds the negative prompt's pass.
    assert len(calls) == steps * (2 if true_cfg > 1 and negative else 1)


def test_flux_seed_and_prompt_2_match_diffusers(flux):
    """The seeded noise is drawn unpacked as FluxPipeline draws it; prompt_2 goes to T5 only."""
    _, ref, pipe = flux
    kw = dict(height=32, width=48, num_inference_steps=2, max_sequence_length=T5_TOKENS)
    expected = ref(
        prompt=PROMPTS[0],
        prompt_2=PROMPTS[1],
        generator=torch.Generator().manual_seed(7),
        output_type="np",
        **kw,
    ).images
    out = pipe.generate(PROMPTS[0], prompt_2=PROMPTS[1], seed=7, progress_bar=False, **kw)
    assert out.seed == 7
    assert np.abs(out.frames[:, 0].numpy() - expected).max() <= 1e-3


def test_flux_default_sequence_length_and_latents_output(flux):
    """max_sequence_length defaults to 512 (FLUX.1-dev's); output_type='latents' then decode() equals the
    frames of a full run."""
    _, ref, pipe = flux
    latents = _packed_noise(1, 32, 32, seed=3)
    kw = dict(height=32, width=32, num_inference_steps=2)
    expected = ref(prompt=PROMPTS[0], latents=latents.clone(), output_type="np", **kw).images
    out = pipe.generate(PROMPTS[0], latents=latents.clone(), progress_bar=False, output_type="latents", **kw)
    assert out.frames.numel() == 0
    frames = pipe.decode(out.latents)
    assert np.abs(frames[:, 0].numpy() - expected).max() <= 1e-3


def test_pack_unpack_and_shift():
    z = torch.randn(2, 16, 6, 10)
    x = pack_latents(z)
    assert x.shape == (2, 15, 64)
    assert torch.equal(unpack_latents(x, 6, 10), z)
    assert calculate_shift(4096, 256, 4096, 0.5, 1.15) == pytest.approx(1.15)
    assert calculate_shift(256, 256, 4096, 0.5, 1.15) == pytest.approx(0.5)


@pytest.mark.parametrize("height,width,steps", [(1024, 1024, 28), (512, 768, 20), (1360, 768, 4)])
def test_flux_schedule_matches_diffusers(flux, height, width, steps):
    """FluxPipeline's sigmas and mu at real sizes (the tiny run above never reaches mu's upper end)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as reference_shift

    from dit_rt.pipeline import Request

    _, ref, pipe = flux
    shape = pipe.check_inputs(height, width, 1, None)
    request = Request(prompts=["x"], negatives=None, shape=shape, steps=steps, guidance=(1.0,), metadata={})
    scheduler = pipe.make_scheduler(request)
    c = ref.scheduler.config
    seq_len = (height // 16) * (width // 16)
    mu = reference_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    ref.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    assert torch.equal(scheduler.timesteps, ref.scheduler.timesteps)
    assert torch.equal(scheduler.sigmas, ref.scheduler.sigmas)


def test_flux_bad_inputs_fail_clearly(flux):
    path, _, pipe = flux
    # Before anything loads: the folder's configs and the catalog entry give the 16-pixel grid.
    with pytest.raises(ValueError, match="height=60 must be a positive multiple of 16"):
        dit_rt.checks.check_generation(str(path), height=60)
    with pytest.raises(ValueError, match="width=1000 must be a positive multiple of 16"):
        dit_rt.checks.check_generation("flux.1-dev", width=1000)
    with pytest.raises(ValueError, match="single images"):
        dit_rt.checks.check_generation("flux.1-dev", num_frames=5)
    with pytest.raises(ValueError, match="multiple of 16"):
        pipe.generate(PROMPTS[0], height=40, width=32, progress_bar=False)
    with pytest.raises(ValueError, match="packed shape"):
        pipe.generate(PROMPTS[0], height=32, width=32, latents=torch.zeros(1, 16, 4, 4), progress_bar=False)
    with pytest.raises(ValueError, match="flow_shift"):
        pipe.generate(PROMPTS[0], height=32, width=32, flow_shift=3.0, progress_bar=False)
    with pytest.raises(ValueError, match="takes no image"):
        pipe.generate(PROMPTS[0], height=32, width=32, image="x.png", progress_bar=False)


def test_flux_save_png(flux, tmp_path):
    from PIL import Image

    _, _, pipe = flux
    out = pipe.generate(PROMPTS[0], height=32, width=48, num_inference_steps=1, seed=0, progress_bar=False)
    (written,) = out.save(tmp_path / "flux.png")
    with Image.open(written) as image:
        assert image.size == (48, 32)


FEATURES = dict(height=32, width=32, num_inference_steps=4, seed=5, max_sequence_length=T5_TOKENS)


@pytest.fixture(scope="module")
def baseline(flux):
    """The plain run the runtime options are held to (true CFG: both guidance branches)."""
    _, _, pipe = flux
    return pipe.generate(
        PROMPTS[0], true_cfg_scale=2.0, negative_prompt="blurry", progress_bar=False, **FEATURES
    )


@pytest.mark.parametrize(
    "options",
    [
        dict(cache=dict(kind="fbcache", threshold=0.0)),
        dict(
            cache=dict(kind="teacache", threshold=0.0, model="flux.1-dev")
        ),  # the authors' FLUX coefficients
        dict(offload="block"),
        dict(offload="model"),
    ],
)
def test_flux_runtime_options_are_exact(flux, baseline, options):
    path, _, _ = flux
    kw = dict(FEATURES, true_cfg_scale=2.0, negative_prompt="blurry")
    out = dit_rt.load(str(path), device="cpu", **options).generate(PROMPTS[0], progress_bar=False, **kw)
    assert torch.equal(out.frames, baseline.frames)
    if "cache" in options:
        assert (out.stats["computed"], out.stats["skipped"]) == (2 * FEATURES["num_inference_steps"], 0)


def test_flux_cache_skips(flux):
    path, _, pipe = flux
    cache = dict(kind="fbcache", threshold=1e9)
    out = dit_rt.load(str(path), device="cpu", cache=cache).generate(
        PROMPTS[0], progress_bar=False, **FEATURES
    )
    assert out.stats["skipped"] > 0
    assert out.stats["computed"] + out.stats["skipped"] == FEATURES["num_inference_steps"]


# ---------------------------------------------------------------------------------- parallel (gloo, 2 ranks)

PARALLEL_REQUEST = dict(
    height=48, width=32, num_inference_steps=2, true_cfg_scale=2.0, negative_prompt="blurry", seed=0
)  # 12 image tokens + 16 text tokens; the tiny transformer's 2 heads
PARALLEL_MODES = {
    "cfg2": dict(cfg=2),  # true CFG: the negative prompt's pass on rank 1
    "ulysses2": dict(ulysses=2),  # the joint [txt; img] sequence over 2 ranks
    "ring2": dict(ring=2),
    "dp2": dict(dp=2),
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error, relative to the reference's largest magnitude where that exceeds 1 (latents reach a
    few units, where float32 values are ~1e-6 apart; a batch split changes GEMM shapes, hence roundings)."""
    return (out - ref).abs().max().item() / max(1.0, ref.abs().max().item())


def _parallel_worker(rank: int, port: int, folder: str, reference, out_dir: str) -> None:
    import json
    import os

    import torch.distributed as dist

    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    errors = {}
    for mode, parallel in PARALLEL_MODES.items():
        pipe = dit_rt.load(folder, device="cpu", dtype=torch.float32, parallel=parallel)
        out = pipe.generate(PROMPTS, progress_bar=False, max_sequence_length=16, **PARALLEL_REQUEST)
        errors[mode] = max(_error(out.frames, reference[0]), _error(out.latents, reference[1]))
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(errors))
    dist.destroy_process_group()


def test_flux_parallel_matches_one_process(flux, tmp_path):
    """cfg / Ulysses / Ring / dp over 2 gloo processes give the one-process image (and latents)."""
    import json

    import torch.multiprocessing as mp

    path, _, pipe = flux
    ref = pipe.generate(PROMPTS, progress_bar=False, max_sequence_length=16, **PARALLEL_REQUEST)
    mp.start_processes(
        _parallel_worker,
        args=(_free_port(), str(path), (ref.frames, ref.latents), str(tmp_path)),
        nprocs=2,
        start_method="fork",
    )
    for rank in range(2):
        errors = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert all(e <= 1e-5 for e in errors.values()), f"rank {rank}: {errors}"


def test_cli_true_cfg_scale(flux, tmp_path, monkeypatch):
    from dit_rt import cli

    folder = str(flux[0])
    out = tmp_path / "x.png"
    args = ["generate", "--model", folder, "--prompt", "a cat", "--negative-prompt", "blurry"]
    args += ["--height", "32", "--width", "32", "--steps", "2", "--seed", "0", "-o", str(out)]
    assert cli.main([*args, "--true-cfg-scale", "2"]) == 0 and out.is_file()
    monkeypatch.setattr("dit_rt.load", lambda *a, **k: pytest.fail("loaded before the check"))
    assert cli.main([*args, "--true-cfg-scale", "-1"]) == 2
