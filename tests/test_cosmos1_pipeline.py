"""Cosmos-1.0 Text2World end to end against diffusers' CosmosTextToWorldPipeline: a tiny random pipeline saved
in the Hub layout, both sides from the same `latents` (CPU, float32)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_checkpoints import make_t5_tokenizer
from tiny_cosmos import COSMOS_1, COSMOS_TEXT_DIM, make_cosmos_transformer, torchvision_stand_in

import dit_rt
from dit_rt.demo import randomize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from bench_e2e import COSMOS1_SCHEDULER, pass_through_safety_checker  # noqa: E402

PROMPTS = ["a cat baking a cake", "the dog"]
T5_11B = dict(
    vocab_size=128, d_model=COSMOS_TEXT_DIM, d_kv=16, num_heads=4, d_ff=64, num_layers=2,
    feed_forward_proj="relu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
    dropout_rate=0.0,
)  # fmt: skip
VAE = dict(
    encoder_block_out_channels=(8, 16, 16, 16),
    decode_block_out_channels=(16, 16, 16, 16),
    attention_resolutions=(8,),
    resolution=64,
    num_layers=1,
)
EDM = COSMOS1_SCHEDULER  # Cosmos-1.0's scheduler_config.json
SIZE = dict(height=32, width=48, num_frames=17, num_inference_steps=3)  # latents [B, 16, 3, 4, 6]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(diffusers pipeline, its folder in the Hub layout with the safety_checker entry, one without it)."""
    from diffusers import AutoencoderKLCosmos, CosmosTextToWorldPipeline, EDMEulerScheduler
    from transformers import T5Config, T5EncoderModel

    pipe = CosmosTextToWorldPipeline(
        text_encoder=randomize(T5EncoderModel(T5Config(**T5_11B)).eval(), 31),
        tokenizer=make_t5_tokenizer(),
        transformer=make_cosmos_transformer(COSMOS_1, seed=22),
        vae=randomize(AutoencoderKLCosmos(**VAE).eval(), 23, std=0.02),
        scheduler=EDMEulerScheduler(**EDM),
        safety_checker=pass_through_safety_checker(),
    )
    folder = tmp_path_factory.mktemp("cosmos1")
    pipe.save_pretrained(str(folder), safe_serialization=True)
    # The same checkpoint without a safety checker component at all.
    bare = tmp_path_factory.mktemp("cosmos1_bare")
    shutil.copytree(folder, bare, dirs_exist_ok=True)
    shutil.rmtree(bare / "safety_checker")
    index = json.loads((bare / "model_index.json").read_text())
    del index["safety_checker"]
    (bare / "model_index.json").write_text(json.dumps(index))
    return pipe, folder, bare


def _noise(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 16, 3, 4, 6, generator=torch.Generator().manual_seed(5))


def _run_reference(pipe, latents, **kwargs):
    """(video in [0, 1] as the decoder gave it [B, T, H, W, 3], the final frames through the 8-bit safety
    path, the final latents)."""
    decoded = {}
    decode = pipe.vae.decode

    def recording_decode(z, *args, **kw):
        out = decode(z, *args, **kw)
        decoded["video"] = out[0] if isinstance(out, tuple) else out.sample
        return out

    pipe.vae.decode = recording_decode
    try:
        with torchvision_stand_in():
            frames = pipe(PROMPTS, latents=latents, output_type="pt", **SIZE, **kwargs).frames
            final = pipe(PROMPTS, latents=latents, output_type="latent", **SIZE, **kwargs).frames
    finally:
        del pipe.vae.decode
    video = (decoded["video"] / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1)
    return video, frames.permute(0, 1, 3, 4, 2), final


def test_frames_match_reference(reference):
    pipe, folder, _ = reference
    noise = _noise()
    want_video, want_frames, want_latents = _run_reference(pipe, noise)
    ours = dit_rt.load(str(folder), device="cpu", dtype=torch.float32)
    out = ours.generate(PROMPTS, latents=noise, progress_bar=False, **SIZE)
    assert out.frames.shape == (2, 17, 32, 48, 3) and out.fps == 30
    torch.testing.assert_close(out.latents, want_latents, rtol=1e-4, atol=1e-4)
    err = (out.frames - want_video).abs().max().item()
    assert err <= 1e-3, err
    # The reference's own output went through its guardrail as 8-bit video: within one step of ours.
    assert (out.frames - want_frames).abs().max() <= 1 / 255 + 1e-3
    inside = ((want_video > 0) & (want_video < 1)).float().mean()
    assert want_video.std() > 0.1 and inside > 0.5, (
        want_video.std(),
        inside,
    )  # not vacuous: mostly unclamped


def test_guidance_fps_and_negative_prompt_options(reference):
    """Non-default guidance, fps (the DiT's RoPE time scale) and negative prompt reach the computation as in
    the reference; without guidance (scale 1) no unconditional pass runs on either side."""
    pipe, _, bare = reference
    noise = _noise(1)
    ours = dit_rt.load(str(bare), device="cpu", dtype=torch.float32)  # no safety_checker component
    for kwargs in (dict(guidance_scale=3.0, fps=12, negative_prompt="the cake"), dict(guidance_scale=1.0)):
        with torchvision_stand_in():
            want = pipe(PROMPTS[:1], latents=noise, output_type="latent", **SIZE, **kwargs).frames
        got = ours.generate(
            PROMPTS[0], latents=noise, output_type="latents", progress_bar=False, **SIZE, **kwargs
        )
        torch.testing.assert_close(got.latents, want, rtol=1e-4, atol=1e-4)


def test_defaults_and_bad_inputs(reference):
    _, folder, _ = reference
    ours = dit_rt.load(str(folder), device="cpu", dtype=torch.float32)
    d = ours.defaults
    assert (d.height, d.width, d.num_frames, d.fps, d.num_inference_steps, d.guidance_scale) == (
        704, 1280, 121, 30, 36, 7.0
    )  # fmt: skip
    assert d.negative_prompt.startswith("The video captures a series of frames showing ugly scenes")
    with pytest.raises(ValueError, match="8k\\+1"):
        ours.generate("a cat", height=32, width=48, num_frames=12)
    with pytest.raises(ValueError, match="multiple of 16"):
        ours.generate("a cat", height=40, width=48, num_frames=9)
    with pytest.raises(ValueError, match="takes no image"):
        ours.generate("a cat", image=torch.zeros(3, 32, 48))
    with pytest.raises(ValueError, match="flow_shift=3.0 does not apply"):
        ours.generate("a cat", flow_shift=3.0)
    with pytest.raises(ValueError, match="fps"):
        ours.generate("a cat", fps=0, **SIZE)
    with pytest.raises(ValueError, match="latents must have shape"):
        ours.generate("a cat", latents=torch.zeros(1, 16, 2, 4, 6), **SIZE)
    c = dit_rt.checks.folder_constraints(folder)
    assert (c.spatial, c.temporal, c.image) == (16, 8, "none")


# ------------------------------------------------------------------------------------------ runtime options


@pytest.fixture(scope="module")
def baseline(reference):
    _, folder, _ = reference
    kw = dict(seed=3, progress_bar=False, **SIZE)
    return kw, dit_rt.load(str(folder), device="cpu", dtype=torch.float32).generate(PROMPTS[0], **kw)


def test_step_caches_and_offload_on_cosmos1(reference, baseline):
    _, folder, _ = reference
    kw, base = baseline
    for cache in (
        dict(kind="fbcache", threshold=0.0),
        dict(kind="teacache", threshold=0.0, coefficients=[1.0, 0]),
    ):
        out = dit_rt.load(str(folder), device="cpu", cache=cache).generate(PROMPTS[0], **kw)
        assert torch.equal(out.frames, base.frames) and out.stats["skipped"] == 0, cache["kind"]
        assert out.stats["computed"] == 2 * SIZE["num_inference_steps"]
    loose = dit_rt.load(str(folder), device="cpu", cache=dict(kind="fbcache", threshold=1e9))
    out = loose.generate(PROMPTS[0], **kw)
    assert out.stats["skipped"] > 0 and not torch.equal(out.latents, base.latents)
    for mode in ("block", "model"):
        out = dit_rt.load(str(folder), device="cpu", offload=mode).generate(PROMPTS[0], **kw)
        assert torch.equal(out.frames, base.frames), mode


# ------------------------------------------------------------------------------------------ two processes

PARALLEL = {
    "cfg2": dict(cfg=2),
    "ulysses2": dict(ulysses=2),
    "ring2": dict(ring=2),
    "dp2": dict(dp=2),
    "fsdp+cfg2": dict(cfg=2, fsdp=True),  # T5's shared position bias read from a sharded block 0
}


def _worker(rank: int, world: int, port: int, folder: str, reference: dict) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    results = {}
    for mode, parallel in PARALLEL.items():
        pipe = dit_rt.load(folder, device="cpu", dtype=torch.float32, parallel=parallel)
        out = pipe.generate(PROMPTS, latents=_noise(), progress_bar=False, **SIZE)
        results[f"{mode}/frames"] = (out.frames - reference["frames"]).abs().max().item()
        latents = reference["latents"]
        results[f"{mode}/latents"] = (out.latents - latents).abs().max().item() / latents.abs().max().item()
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(reference):
    _, folder, _ = reference
    one = dit_rt.load(str(folder), device="cpu", dtype=torch.float32)
    out = one.generate(PROMPTS, latents=_noise(), progress_bar=False, **SIZE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ref = dict(frames=out.frames, latents=out.latents)
    mp.start_processes(_worker, args=(2, port, str(folder), ref), nprocs=2, start_method="fork")
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case", [f"{m}/{w}" for m in PARALLEL for w in ("frames", "latents")])
def test_two_processes_match_one(two_processes, case):
    """CFG parallel, Ulysses, Ring, data parallel and FSDP on 2 gloo processes give the one-process output
    (the tokenizer decodes row stripes on both ranks)."""
    for rank, results in enumerate(two_processes):
        assert results[case] <= 1e-5, f"{case} on rank {rank}: {results[case]:.3g}"
