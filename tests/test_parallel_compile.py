"""parallel= with compile=True on CPU: 2 gloo processes against the one-process eager pipeline.

One world of two processes is spawned once (module fixture) and runs every mode in turn through
`dit_rt.load(..., parallel=..., compile=True)` (inductor, per-block): Ulysses (its all-to-alls traced as
functional collectives), Ring (its attention one opaque custom op in the block graph), CFG parallel (no
collective in the blocks) and FSDP2 with Ulysses (FSDP's hooks eager around the compiled forward). Each
rank records its latents' and frames' error against the one-process eager run, and dynamo's counters:
every block must stay one graph, shared by both blocks and every step.

Tolerance: inductor fuses and reorders float32 arithmetic, so a compiled block differs from the eager one
by a few float32 roundings; after the two denoising steps the latents differ by ~3e-7 of their magnitude
here (frames by ~6e-8), and TOL = 1e-5 (relative where the magnitude exceeds 1, see `_error`) leaves room
for other CPUs' vector widths. Inductor's C++ build dominates the time (~40 s cold on 2 cores, ~11 s with
inductor's on-disk FX graph cache warm): one compilation per mode's block graph.

The tiny demo checkpoint (dit_rt.demo): 2 heads, 2 blocks; 48x80 pixels x 5 frames -> 2 x 3 x 5 = 30
tokens, split 15 / 15.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_parallel_pipeline import PROMPTS, _error, _free_port

import dit_rt
from dit_rt.demo import write_tiny_wan
from dit_rt.graphs import StackGraphs, apply_cuda_graphs

TOL = 1e-5
WORLD = 2
REQUEST = dict(
    negative_prompt="blurry",
    height=48,
    width=80,
    num_frames=5,
    num_inference_steps=2,
    guidance_scale=5.0,
    seed=0,
    progress_bar=False,
)
MODES = {
    "ulysses2": dict(ulysses=2),
    "ring2": dict(ring=2),
    "cfg2": dict(cfg=2),
    "fsdp_ulysses2": dict(ulysses=2, fsdp=True),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel_compile")
    folder = write_tiny_wan(root / "tiny")
    out = dit_rt.load(str(folder), device="cpu", dtype=torch.float32).generate(PROMPTS[:1], **REQUEST)
    return root, folder, (out.frames, out.latents)


def _worker(rank: int, port: int, root: str, folder: str, reference) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    counters = torch._dynamo.utils.counters
    results: dict[str, float] = {}
    for mode, parallel in MODES.items():
        torch._dynamo.reset()
        counters.clear()
        pipe = dit_rt.load(folder, device="cpu", dtype=torch.float32, parallel=parallel, compile=True)
        out = pipe.generate(PROMPTS[:1], **REQUEST)
        results[f"{mode}/frames"] = _error(out.frames, reference[0])
        results[f"{mode}/latents"] = _error(out.latents, reference[1])
        blocks = pipe.transformers[0].blocks
        results[f"{mode}/compiled_blocks"] = sum(b._compiled_call_impl is not None for b in blocks)
        results[f"{mode}/graphs"] = counters["stats"]["unique_graphs"]
        results[f"{mode}/graph_breaks"] = sum(counters["graph_break"].values())
        if parallel.get("fsdp"):  # graphs refused on FSDP blocks, whatever the caller
            try:
                apply_cuda_graphs(pipe.transformers[0])
                results["fsdp_graphs_refused"] = 0
            except ValueError as e:
                results["fsdp_graphs_refused"] = float("FSDP" in str(e))
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def world(setup):
    root, folder, reference = setup
    # fork, as test_parallel_pipeline: the children inherit the imported modules and the reference.
    args = (_free_port(), str(root), str(folder), reference)
    mp.start_processes(_worker, args=args, nprocs=WORLD, start_method="fork")
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("mode", MODES)
def test_compiled_parallel_matches_one_process_eager(world, mode):
    for rank, results in enumerate(world):
        for what in ("latents", "frames"):
            error = results[f"{mode}/{what}"]
            assert error <= TOL, f"{mode} {what} on rank {rank}: max abs error {error:.3g}"


@pytest.mark.parametrize("mode", MODES)
def test_each_block_is_one_graph(world, mode):
    for results in world:
        assert results[f"{mode}/compiled_blocks"] == 2
        # One graph serves both blocks and both steps: no graph break, no recompilation per block.
        assert results[f"{mode}/graphs"] == 1 and results[f"{mode}/graph_breaks"] == 0


def test_cuda_graphs_refuse_fsdp(world, setup):
    assert all(results["fsdp_graphs_refused"] == 1 for results in world)
    _, folder, _ = setup
    with pytest.raises(ValueError, match="cuda_graphs=True cannot be combined with parallel fsdp=True"):
        dit_rt.load(str(folder), device="cpu", cuda_graphs=True, parallel=dict(cfg=2, fsdp=True))


@torch.no_grad()
def test_recapture_skips_the_warm_up():
    """A graph recorded again because its weights moved is recorded without the eager warm-up, so a rank
    that recaptures runs the forward's collectives once, like a rank that only replays."""
    calls = []

    def capture(fn, warm_up):
        calls.append(warm_up)
        out = fn()
        return (lambda: out.copy_(fn())), out

    model = torch.nn.Linear(4, 4)
    graphs = StackGraphs(capture)
    x = torch.randn(2, 4)
    graphs._replay(("forward",), ((x,), {}), [model], lambda args, kwargs: model(*args))
    model.weight.data = model.weight.data.clone()  # new addresses: recorded again
    out = graphs._replay(("forward",), ((x,), {}), [model], lambda args, kwargs: model(*args))
    assert calls == [True, False] and torch.equal(out, model(x))
