"""Cosmos-Predict2 Text2Image / Video2World and Cosmos-Predict2.5 (Text2World, Image2World, Video2World)
against diffusers 0.42.1 on identical tiny random checkpoints, from the same initial latents; then what the
shared loop adds for Cosmos: step caches, offload, two-process parallel layouts, the folder rules (guardrail
entry or not, sizes and frames refused before loading).

Frames: the Predict2 references pass their frames through the guardrail's uint8 path, which truncates to
1/255 steps (Predict2.5's does not with a stand-in checker); the latents are compared as well, tightly.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import astuple
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from tiny_cosmos_pipelines import make_cosmos2_t2i, make_cosmos2_v2w, make_cosmos25, reference_stand_ins

import dit_rt
from dit_rt import checks

TOL = 1e-3
ONE_LEVEL = 1 / 255  # the Predict2 reference's uint8 truncation
KW = dict(height=32, width=48, num_inference_steps=3, guidance_scale=3.0)
MAX_TOKENS = 96  # the chat template alone is ~70 tiny tokens


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cosmos")
    refs = {
        "t2i": make_cosmos2_t2i(root / "t2i"),
        "v2w": make_cosmos2_v2w(root / "v2w"),
        "c25": make_cosmos25(root / "c25"),
    }
    return root, refs


@pytest.fixture(scope="module")
def pipes(folders):
    root, _ = folders
    return {name: dit_rt.load(str(root / name), device="cpu", dtype=torch.float32) for name in folders[1]}


def _image(h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _latents(frames: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    shape = (batch, 16, (frames - 1) // 4 + 1, KW["height"] // 8, KW["width"] // 8)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _reference(ref, output_type, **kw):
    with reference_stand_ins():
        out = ref(output_type=output_type, **kw)
    return out.images if hasattr(out, "images") else out.frames


def _close(out, ref_frames, ref_latents, frames_tol):
    """Our frames / latents against the reference's: frames [B, T, H, W, 3] in [0, 1]."""
    ref_frames = torch.as_tensor(np.asarray(ref_frames)).float()
    ref_frames = ref_frames.reshape(out.frames.shape)
    assert (out.frames - ref_frames).abs().max().item() <= frames_tol
    ref_latents = torch.as_tensor(ref_latents).reshape(out.latents.shape)
    err = (out.latents - ref_latents).abs().max().item() / max(1.0, ref_latents.abs().max().item())
    assert err <= 1e-4, err


# ------------------------------------------------------------------------------------------ vs diffusers


def test_text2image_matches_diffusers(folders, pipes):
    """A batch of two prompts sharing one negative prompt."""
    ref = folders[1]["t2i"]
    prompts = ["a cat", "the dog baking a cake"]
    latents = _latents(1, batch=2)
    args = dict(prompt=prompts, negative_prompt="the dog", max_sequence_length=MAX_TOKENS, **KW)
    expected = _reference(ref, "np", latents=latents.clone(), **args)
    expected_latents = _reference(ref, "latent", latents=latents.clone(), **args)
    out = pipes["t2i"].generate(
        prompts, "the dog", latents=latents, max_sequence_length=MAX_TOKENS, progress_bar=False, **KW
    )
    assert out.frames.shape == (2, 1, 32, 48, 3)
    _close(out, expected, expected_latents, ONE_LEVEL + TOL)


@pytest.mark.parametrize("clip", [0, 5, 11], ids=["image", "clip5", "clip11"])
def test_video2world_matches_diffusers(folders, pipes, clip):
    """From one picture (1 conditioning latent frame), a 5-frame clip (2) and an 11-frame clip (its last 9
    frames, all 3 latent frames conditioning), 9 frames out; the posterior sample's noise is the first draw
    of the reference's generator, seeded alike. The picture case runs a batch of two prompts on it."""
    ref = folders[1]["v2w"]
    image = [_image(seed=i) for i in range(clip)] if clip else _image()
    ref_input = dict(video=image) if clip else dict(image=image)
    prompts = ["a robot"] if clip else ["a robot", "the dog and a cake"]
    latents = _latents(9, batch=len(prompts))
    args = dict(prompt=prompts, negative_prompt="the cat", num_frames=9, max_sequence_length=MAX_TOKENS, **KW)
    runs = [
        _reference(
            ref,
            kind,
            latents=latents.clone(),
            generator=torch.Generator().manual_seed(7),
            **ref_input,
            **args,
        )
        for kind in ("np", "latent")
    ]
    out = pipes["v2w"].generate(
        prompts, "the cat", image=image, num_frames=9, seed=7, latents=latents,
        max_sequence_length=MAX_TOKENS, progress_bar=False, **KW,
    )  # fmt: skip
    assert out.frames.shape == (len(prompts), 9, 32, 48, 3)
    _close(out, *runs, ONE_LEVEL + TOL)


@pytest.mark.parametrize(
    "mode",
    [
        "text2world",
        "text2image",
        "image2world",
        "image2world_no_cond_timestep",
        "video2world_k2",
        "video2world_k1",
    ],
)
def test_predict25_matches_diffusers(folders, pipes, mode):
    """All three modes, and a single frame out (num_frames=1); conditional_frame_timestep < 0 gives the
    conditioning frames the step's sigma, as the reference."""
    ref = folders[1]["c25"]
    ours, ref_input = {}, {}
    frames_out = 1 if mode == "text2image" else 9
    if mode == "image2world":
        ours = ref_input = dict(image=_image())
    elif mode == "image2world_no_cond_timestep":
        ours = ref_input = dict(image=_image(), conditional_frame_timestep=-1.0)
    elif mode.startswith("video2world"):
        clip = [_image(seed=i) for i in range(7)]
        k = int(mode[-1])
        ref_input = dict(video=clip, num_latent_conditional_frames=k)
        ours = dict(image=clip, num_latent_conditional_frames=k)
    latents = _latents(frames_out, seed=2)
    args = dict(negative_prompt="the cat", num_frames=frames_out, max_sequence_length=MAX_TOKENS, **KW)
    runs = [
        _reference(ref, kind, prompt="a robot arm", latents=latents.clone(), **ref_input, **args)
        for kind in ("pt", "latent")
    ]
    frames = runs[0].permute(0, 1, 3, 4, 2)  # [B, T, C, H, W] -> [B, T, H, W, C]
    out = pipes["c25"].generate("a robot arm", latents=latents, progress_bar=False, **ours, **args)
    assert out.frames.shape == (1, frames_out, 32, 48, 3)
    _close(out, frames, runs[1], TOL)


def test_conditioning_matters(pipes):
    """A different picture changes the frames generated after it; Image2World differs from Text2World."""
    kw = dict(num_frames=9, seed=0, progress_bar=False, output_type="latents", **KW)
    a = pipes["v2w"].generate("a cat", image=_image(seed=1), **kw).latents
    b = pipes["v2w"].generate("a cat", image=_image(seed=2), **kw).latents
    assert not torch.allclose(a[:, :, 1:], b[:, :, 1:])
    c = pipes["c25"].generate("a cat", image=_image(seed=1), **kw).latents
    d = pipes["c25"].generate("a cat", **kw).latents  # Text2World: no conditioning
    assert not torch.allclose(c, d)


# ------------------------------------------------------------------------------------------ folder rules


def test_loads_with_and_without_guardrail_entry(folders, pipes, tmp_path):
    root, _ = folders
    index = json.loads((root / "t2i" / "model_index.json").read_text())
    assert index["safety_checker"] == ["cosmos_guardrail", "CosmosSafetyChecker"]
    bare = tmp_path / "bare"
    shutil.copytree(root / "t2i", bare)
    shutil.rmtree(bare / "safety_checker")
    del index["safety_checker"]
    (bare / "model_index.json").write_text(json.dumps(index))
    kw = dict(seed=3, progress_bar=False, output_type="latents", **KW)
    a = pipes["t2i"].generate("a cat", **kw)
    b = dit_rt.load(str(bare), device="cpu", dtype=torch.float32).generate("a cat", **kw)
    assert torch.equal(a.latents, b.latents)
    assert a.metadata["guardrail"] == "none"


def test_info_says_no_guardrail(folders, capsys, tmp_path):
    from dit_rt.cli import main

    root, _ = folders
    assert main(["info", str(root / "c25")]) == 0
    out = capsys.readouterr().out
    assert "safety_checker" in out and "not run" in out and "guardrail: none" in out
    # The guardrail entry without its folder (it is never loaded) is not a problem either.
    shutil.copytree(root / "c25", tmp_path / "c25")
    shutil.rmtree(tmp_path / "c25" / "safety_checker")
    assert main(["info", str(tmp_path / "c25")]) == 0


@pytest.mark.parametrize(
    "name,args,match",
    [
        ("t2i", dict(height=40), r"height=40 must be a positive multiple of 16"),
        ("t2i", dict(num_frames=5), r"single images"),
        ("t2i", dict(image="x.png"), r"takes no image"),
        ("v2w", dict(num_frames=8, image=_image()), r"num_frames=8 must be 4k\+1"),
        ("v2w", {}, r"image-to-video: pass image="),
        ("c25", dict(width=100), r"width=100 must be a positive multiple of 16 .*; try 96"),
    ],
)
def test_bad_requests_fail_before_loading(folders, name, args, match):
    root, _ = folders
    with pytest.raises(ValueError, match=match):
        checks.check_generation(str(root / name), **args)


def test_folder_constraints_equal_the_catalog(folders):
    from dit_rt.catalog import CATALOG

    root, _ = folders
    for name, alias in (
        ("t2i", "cosmos-predict2-2b-text2image"),
        ("v2w", "cosmos-predict2-2b-video2world"),
        ("c25", "cosmos-predict2.5-2b"),
    ):
        assert checks.model_constraints(str(root / name)) == CATALOG[alias].constraints, name


def test_bad_requests_fail_before_work(pipes):
    kw = dict(progress_bar=False, **KW)
    with pytest.raises(ValueError, match="num_frames=6 must be 4k"):
        pipes["c25"].generate("a cat", num_frames=6, **kw)
    with pytest.raises(ValueError, match="its last 5 frames, but it has 3"):
        pipes["c25"].generate("a cat", image=[_image()] * 3, num_frames=9, **kw)
    with pytest.raises(ValueError, match="num_latent_conditional_frames must be 1 or 2"):
        pipes["c25"].generate("a cat", image=[_image()] * 9, num_latent_conditional_frames=3, **kw)
    with pytest.raises(TypeError, match="unknown generate"):
        pipes["t2i"].generate("a cat", fps=16, **kw)
    with pytest.raises(ValueError, match="flow_shift=3.0 does not apply"):
        pipes["v2w"].generate("a cat", image=_image(), flow_shift=3.0, **kw)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipes["t2i"].generate("a cat", latents=torch.zeros(1, 16, 2, 4, 6), **kw)


def test_cli_generates_cosmos(folders, tmp_path):
    from dit_rt.cli import main

    root, _ = folders
    out = tmp_path / "cat.png"
    argv = ["generate", "--model", str(root / "t2i"), "--prompt", "a cat", "--height", "32", "--width", "48"]
    assert main([*argv, "--steps", "2", "--seed", "1", "--device", "cpu", "-o", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_defaults_follow_the_references(pipes):
    import diffusers.pipelines.cosmos.pipeline_cosmos2_5_predict as p25
    import diffusers.pipelines.cosmos.pipeline_cosmos2_text2image as t2i
    import diffusers.pipelines.cosmos.pipeline_cosmos2_video2world as v2w

    from dit_rt.catalog import COSMOS_NEGATIVE, lookup

    assert COSMOS_NEGATIVE == t2i.DEFAULT_NEGATIVE_PROMPT == v2w.DEFAULT_NEGATIVE_PROMPT
    assert COSMOS_NEGATIVE == p25.DEFAULT_NEGATIVE_PROMPT

    for alias in ("cosmos-predict2-2b-text2image", "cosmos-predict2-14b-video2world", "cosmos-predict2.5-2b"):
        d = lookup(alias).defaults
        assert (d.num_inference_steps, d.guidance_scale, d.negative_prompt) in (
            (35, 7.0, COSMOS_NEGATIVE),
            (36, 7.0, COSMOS_NEGATIVE),
        )
    # A folder outside the catalog gets the reference pipeline's call defaults.
    for name, want in (
        ("t2i", (768, 1360, 1, 1, 35, 7.0)),
        ("v2w", (704, 1280, 93, 16, 35, 7.0)),
        ("c25", (704, 1280, 93, 16, 36, 7.0)),
    ):
        assert astuple(pipes[name].defaults)[:6] == want, name
        assert pipes[name].defaults.negative_prompt == COSMOS_NEGATIVE


# ------------------------------------------------------------------------------------------ runtime options


def test_fbcache_on_cosmos(folders, pipes):
    root, _ = folders
    kw = dict(image=_image(), num_frames=5, seed=4, progress_bar=False, **{**KW, "num_inference_steps": 5})
    base = pipes["v2w"].generate("a cat", **kw)
    exact = dit_rt.load(str(root / "v2w"), device="cpu", cache=dict(kind="fbcache", threshold=0.0))
    out = exact.generate("a cat", **kw)
    assert torch.equal(out.frames, base.frames)
    assert out.stats["computed"] == 2 * 5 and out.stats["skipped"] == 0
    loose = dit_rt.load(str(root / "v2w"), device="cpu", cache=dict(kind="fbcache", threshold=1e9))
    out = loose.generate("a cat", **kw)
    assert out.stats["skipped"] > 0 and not torch.equal(out.frames, base.frames)


def test_teacache_and_offload_on_cosmos(folders, pipes):
    root, _ = folders
    kw = dict(num_frames=5, seed=5, progress_bar=False, **KW)
    base = pipes["c25"].generate("a cat", **kw)
    cache = dict(kind="teacache", threshold=0.0, coefficients=[1.0, 0.0])
    out = dit_rt.load(str(root / "c25"), device="cpu", cache=cache).generate("a cat", **kw)
    assert torch.equal(out.frames, base.frames) and out.stats["skipped"] == 0
    for mode in ("block", "model"):
        out = dit_rt.load(str(root / "c25"), device="cpu", offload=mode).generate("a cat", **kw)
        assert torch.equal(out.frames, base.frames), mode


def test_linear_format_on_cosmos(folders, pipes):
    """linear= converts the DiT's block projections at load (fp8, emulated on the CPU); output stays close."""
    from dit_rt.ops import Linear

    root, _ = folders
    kw = dict(image=_image(), num_frames=5, seed=6, progress_bar=False, **KW)
    q = dit_rt.load(str(root / "v2w"), device="cpu", linear="fp8-per-tensor", attention="sdpa")
    formats = {m.fmt for m in q.transformer.transformer_blocks.modules() if isinstance(m, Linear)}
    assert formats == {"fp8-per-tensor"}
    out, base = q.generate("a cat", **kw), pipes["v2w"].generate("a cat", **kw)
    assert 0 < ((out.frames - base.frames).norm() / base.frames.norm()).item() < 0.1


# ------------------------------------------------------------------------------------------ two processes

PROMPTS = ["a robot arm", "the cat"]
PARALLEL_REQUEST = dict(num_frames=9, seed=0, progress_bar=False, negative_prompt="blurry", **KW)
MODES = {
    "v2w/cfg2": dict(cfg=2),
    "v2w/ulysses2": dict(ulysses=2),
    "c25/ring2": dict(ring=2),
    "c25/dp2": dict(dp=2),
    "c25/fsdp_cfg2": dict(cfg=2, fsdp=True),
}


def _request(name: str) -> dict:
    return dict(PARALLEL_REQUEST, image=_image()) if name == "v2w" else PARALLEL_REQUEST


def _worker(rank: int, world: int, port: int, root: str, reference: dict) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    results = {}
    for mode, parallel in MODES.items():
        name = mode.split("/")[0]
        pipe = dit_rt.load(str(Path(root) / name), device="cpu", dtype=torch.float32, parallel=parallel)
        for axis, degree in parallel.items():
            if axis != "fsdp":
                assert pipe.mesh.size(axis) == degree, (mode, axis)
        out = pipe.generate(PROMPTS, **_request(name))
        frames, latents = reference[name]
        results[f"{mode}/frames"] = (out.frames - frames).abs().max().item()
        results[f"{mode}/latents"] = (out.latents - latents).abs().max().item() / latents.abs().max().item()
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(folders, pipes):
    root, _ = folders
    reference = {}
    for name in ("v2w", "c25"):
        out = pipes[name].generate(PROMPTS, **_request(name))
        reference[name] = (out.frames, out.latents)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, str(root), reference), nprocs=2, start_method="fork")
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case", [f"{m}/{w}" for m in MODES for w in ("frames", "latents")])
def test_two_processes_match_one(two_processes, case):
    for rank, results in enumerate(two_processes):
        assert results[case] <= 1e-5, f"{case} on rank {rank}: {results[case]:.3g}"
