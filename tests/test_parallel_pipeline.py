"""The whole Wan pipeline under every parallel mode on CPU: 2 and 4 gloo processes against one process.

The tiny checkpoints are written once in the parent and the single-process outputs computed there; the
workers are forked, so they inherit both. Each world size is spawned once (module fixture) and runs every
mode in turn through `dit_rt.load(..., parallel=...)`, recording on every rank the largest absolute error
of its frames and latents against the single-process run; the pytest cases assert per mode and rank.
Frames come from the parallel VAE decode (the latent rows split over the ranks of each dp group), so every
mode checks it too; the direct decode cases add uneven row splits and a control that must fail without
the halo exchange. Errors are relative to the reference's magnitude where it exceeds 1 (see `_error`).

Sizes: 48x80 pixels x 9 frames -> latents (3, 6, 10) -> 3 x 3 x 5 = 45 tokens, which no degree divides;
the tiny transformer has 2 heads, so Ulysses 4 pads heads. Two prompts, so dp=2 gives each group one.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_checkpoints import make_wan_t2v

import dit_rt

TOL = 1e-5
PROMPTS = ["a cat and a dog baking a cake", "the dog on a cake"]
REQUEST = dict(
    negative_prompt="blurry",
    height=48,
    width=80,
    num_frames=9,
    num_inference_steps=2,
    guidance_scale=5.0,
    seed=0,
    progress_bar=False,
)
# mode -> (checkpoint, parallel options); the product of the degrees is the world size.
MODES = {
    2: {
        "cfg2": ("t2v", dict(cfg=2)),
        "ulysses2": ("t2v", dict(ulysses=2)),
        "ring2": ("t2v", dict(ring=2)),
        "dp2": ("t2v", dict(dp=2)),
        "fsdp_cfg2": ("t2v", dict(cfg=2, fsdp=True)),
    },
    4: {
        "cfg2_ulysses2": ("t2v", dict(cfg=2, ulysses=2)),
        "ulysses2_ring2": ("t2v", dict(ulysses=2, ring=2)),
        "dp2_cfg2": ("t2v", dict(dp=2, cfg=2)),
        "ulysses4": ("t2v", dict(ulysses=4)),  # 2 heads over 4 ranks: padded heads
        "two_experts_cfg2_ulysses2": ("a14b", dict(cfg=2, ulysses=2)),
        "fsdp_dp2_ring2": ("t2v", dict(dp=2, ring=2, fsdp=True)),
    },
    # Eight ranks, the layouts of the 8-GPU runs (issue 10): 2 heads padded to 8, 45 tokens over 8 shards.
    8: {
        "ulysses8": ("t2v", dict(ulysses=8)),
        "ring8": ("t2v", dict(ring=8)),
        "cfg2_ulysses4": ("t2v", dict(cfg=2, ulysses=4)),
        "cfg2_ring2_ulysses2": ("t2v", dict(cfg=2, ring=2, ulysses=2)),
    },
}
# Latent rows per VAE case: uneven over 2 and 4 ranks, and one rank-sized stripe of a single row.
VAE_ROWS = {2: (7,), 4: (7, 4), 8: (9,)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel_pipeline")
    folders = {"t2v": root / "t2v", "a14b": root / "a14b"}
    make_wan_t2v(folders["t2v"])
    make_wan_t2v(folders["a14b"], two_experts=True, boundary_ratio=0.6)
    reference = {}
    for name, folder in folders.items():
        out = dit_rt.load(str(folder), device="cpu", dtype=torch.float32).generate(PROMPTS, **REQUEST)
        reference[name] = (out.frames, out.latents)
    return root, folders, reference


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vae_cases(folder: Path, world: int) -> dict[str, float]:
    """Parallel decode against one-process decode on the same rank, plus a no-halo control."""
    from dit_rt.loaders import load_weights, read_config
    from dit_rt.models.wan import WanVAE, WanVAEConfig
    from dit_rt.parallel.vae import StripeDecode, parallel_decode

    with torch.device("meta"):
        vae = WanVAE(WanVAEConfig.from_config(read_config(folder / "vae")))
    load_weights(vae, folder / "vae", device="cpu", dtype=torch.float32, component="vae")
    group = dist.group.WORLD
    results = {}
    for rows in VAE_ROWS[world]:
        z = torch.randn(1, 16, 3, rows, 5, generator=torch.Generator().manual_seed(rows))
        ref = vae.decode(z, chunk=1)
        results[f"vae_rows{rows}"] = _error(parallel_decode(vae, z, group, chunk=1), ref)
        # The CUDA layout (channels-last activations) through the same hooks, and a whole-clip pass.
        out = parallel_decode(vae, z, group, chunk=None, channels_last=True)
        results[f"vae_rows{rows}_channels_last"] = _error(out, vae.decode(z, chunk=None, channels_last=True))
        # Control: stripes decoded without the exchange must differ, or the cases above prove nothing.
        stripes = StripeDecode(group, rows)
        naive = stripes.gather(vae.decode(stripes.stripe(z), chunk=1))
        results[f"vae_rows{rows}_control"] = _error(naive, ref)
    return results


def _error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error, relative to the reference's largest magnitude where that exceeds 1: frames lie in
    [0, 1], latents reach ~9 here, where float32 values are 1e-6 apart, so 1e-5 means a few roundings."""
    if out.shape != ref.shape:
        return float("inf")
    return (out - ref).abs().max().item() / max(1.0, ref.abs().max().item())


def _worker(rank: int, world: int, port: int, root: str, folders: dict, reference: dict) -> None:
    # The torchrun environment, without torchrun: dit_rt initialises the process group itself.
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    results: dict[str, float] = {}
    for mode, (ckpt, parallel) in MODES[world].items():
        pipe = dit_rt.load(str(folders[ckpt]), device="cpu", dtype=torch.float32, parallel=parallel)
        out = pipe.generate(PROMPTS, **REQUEST)
        frames, latents = reference[ckpt]
        results[f"{mode}/frames"] = _error(out.frames, frames)
        results[f"{mode}/latents"] = _error(out.latents, latents)
        if parallel.get("fsdp"):  # the share of the block weights this rank holds
            parts = (
                ("text_encoder", pipe.text_encoder, "encoder.block."),
                ("transformer", pipe.transformers[0], "blocks."),
            )
            for name, model, prefix in parts:
                params = [p for n, p in model.named_parameters() if n.startswith(prefix)]
                local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
                results[f"{mode}/{name}_shard"] = local / sum(p.numel() for p in params)
    results.update(_vae_cases(Path(folders["t2v"]), world))
    (Path(root) / f"world{world}_rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _spawn(world: int, setup) -> list[dict[str, float]]:
    root, folders, reference = setup
    # fork: the children inherit the imported modules and the reference outputs (see test_parallel.py).
    mp.start_processes(
        _worker, args=(world, _free_port(), str(root), folders, reference), nprocs=world, start_method="fork"
    )
    return [json.loads((root / f"world{world}_rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def world2(setup):
    return _spawn(2, setup)


@pytest.fixture(scope="module")
def world4(setup):
    return _spawn(4, setup)


@pytest.fixture(scope="module")
def world8(setup):
    return _spawn(8, setup)


def _cases(world: int) -> list[str]:
    cases = [f"{mode}/{what}" for mode in MODES[world] for what in ("frames", "latents")]
    return cases + [f"vae_rows{rows}{v}" for rows in VAE_ROWS[world] for v in ("", "_channels_last")]


def _check(per_rank: list[dict[str, float]], case: str) -> None:
    for rank, results in enumerate(per_rank):
        assert results[case] <= TOL, f"{case} on rank {rank}: max abs error {results[case]:.3g}"
    if case.startswith("vae_") and not case.endswith("_channels_last"):
        for results in per_rank:
            control = results[f"{case}_control"]
            assert control > 1e-3, f"{case}: stripes without the halo exchange matched too ({control:.3g})"


@pytest.mark.parametrize("case", _cases(2))
def test_two_processes_match_one(world2, case):
    _check(world2, case)


@pytest.mark.parametrize("case", _cases(4))
def test_four_processes_match_one(world4, case):
    _check(world4, case)


@pytest.mark.parametrize("case", _cases(8))
def test_eight_processes_match_one(world8, case):
    _check(world8, case)


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_shards_transformer_and_text_encoder(world, world2, world4):
    per_rank = {2: world2, 4: world4}[world]
    for mode, (_, parallel) in MODES[world].items():
        if not parallel.get("fsdp"):
            continue
        for results in per_rank:
            for name in ("text_encoder", "transformer"):
                assert results[f"{mode}/{name}_shard"] <= 1 / world + 0.05, (mode, name)


# ------------------------------------------------------------------------------------------ one process


def test_parallel_errors_before_heavy_work(setup, monkeypatch):
    _, folders, _ = setup
    for var in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match=r"need 2 processes but the world size is 1.*nproc-per-node 2"):
        dit_rt.load(str(folders["t2v"]), device="cpu", parallel=dict(ulysses=2))
    with pytest.raises(ValueError, match="must be a dict"):
        dit_rt.load(str(folders["t2v"]), device="cpu", parallel="ulysses")
    # Degrees of 1 in one process: the single-process pipeline, same output.
    pipe = dit_rt.load(str(folders["t2v"]), device="cpu", dtype=torch.float32, parallel={})
    frames, latents = setup[2]["t2v"]
    out = pipe.generate(PROMPTS, **REQUEST)
    assert (out.frames - frames).abs().max().item() == 0.0


GLOO_ABORT = "terminate called without an active exception"


def test_cli_under_torchrun_writes_one_file(setup, tmp_path):
    _, folders, _ = setup
    out = tmp_path / "clip.gif"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "dit_rt", "generate", "--model", str(folders["t2v"]), "--prompt", PROMPTS[0],
        "--height", "48", "--width", "80", "--frames", "5", "--steps", "2", "--seed", "1",
        "--ulysses", "2", "--device", "cpu", "-o", str(out),
    ]  # fmt: skip
    # PYTHONFAULTHANDLER: a rank killed by a signal prints every thread's Python stack.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    if run.returncode and GLOO_ABORT in run.stderr:
        # Once in CI (2026-12-05, 2 cores) a rank aborted inside gloo with this message at the first step,
        # never in dozens of runs here; pytorch/pytorch#65231 is the same abort in torch's own gloo tests.
        # One retry; the first run's stderr goes to the captured output, shown if the retry fails too.
        print(run.stderr[-3000:])
        shutil.rmtree(tmp_path, ignore_errors=True)
        tmp_path.mkdir()
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert out.read_bytes()[:6] == b"GIF89a"
    assert run.stdout.count("wrote ") == 1, run.stdout  # rank 0 writes and prints, rank 1 stays silent
    assert list(tmp_path.iterdir()) == [out]
