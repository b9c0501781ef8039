"""Multi-GPU CUDA graphs (and torch.compile inside them) against one GPU, on the tiny random Wan pipeline.

    torchrun --standalone --nproc-per-node 2 tools/check_parallel_graphs.py [--modes ulysses2,ring2,cfg2,dp2]
        [--dtype float32|bfloat16] [--steps 3]

Every rank writes the tiny random Wan T2V checkpoint (`dit_rt.demo.write_tiny_wan`: same seeds, same files)
into a temporary folder of its own and generates from it on its GPU without parallel=: the reference. Then
for each mode (modes whose degrees do not multiply to the world size are skipped) it generates with
parallel= and each of these variants:

    eager            parallel= alone: the baseline of the graphed variants below;
    graphs           cuda_graphs=True: the whole forward as one graph, collectives (Ulysses all-to-alls,
                     Ring isend / irecv, the sequence gather) recorded in it; must equal `eager` bit for bit;
    eager+fbcache    a First-Block Cache with threshold 0 (never skips, so the same output): the cache's
                     decisions run in eager code, with an all-reduce over the sequence group;
    graphs+fbcache   the same with cuda_graphs=True: graphs of block ranges with the eager all-reduce
                     between them; must equal `eager+fbcache` bit for bit;
    compile          compile=True: the per-block inductor graphs;
    compile+graphs   compile=True, cuda_graphs=True: the compiled blocks recorded in the graph; must equal
                     `compile` bit for bit.

Every variant's latents must also be within --tol of the reference (max abs error over the reference's
largest magnitude; default 1e-4 in float32, where the split attention and inductor's fusions change the
rounding, 3e-2 in bfloat16), and every graphed variant must have recorded and replayed graphs. One more row
checks that cuda_graphs=True with fsdp=True is refused with a clear error. Rank 0 prints a markdown table
(errors are the largest over the ranks); every rank exits 1 if any check failed. NCCL_NVLS_ENABLE=0
(NVLink multicast off, see device/README.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from bench_parallel import parse_mode  # tools/, the script's folder, is on sys.path

import dit_rt
from dit_rt.demo import write_tiny_wan
from dit_rt.parallel import init_distributed

PROMPTS = ["a cat and a dog baking a cake", "the dog on a cake"]
# 48x80 pixels x 9 frames -> latents (3, 6, 10) -> 3 x 3 x 5 = 45 tokens: an odd length, so sequence
# shards are padded and Ring drops padded keys.
REQUEST = dict(negative_prompt="blurry", height=48, width=80, num_frames=9, guidance_scale=5.0, seed=0)
FBCACHE = dict(kind="fbcache", threshold=0.0)
# variant -> (runtime options, the variant it must equal bit for bit, or None)
VARIANTS = {
    "eager": (dict(), None),
    "graphs": (dict(cuda_graphs=True), "eager"),
    "eager+fbcache": (dict(cache=FBCACHE), None),
    "graphs+fbcache": (dict(cuda_graphs=True, cache=FBCACHE), "eager+fbcache"),
    "compile": (dict(compile=True), None),
    "compile+graphs": (dict(compile=True, cuda_graphs=True), "compile"),
}


def worst(values) -> float | None:
    return None if None in values else max(values)


def error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error over the reference's largest magnitude (at least 1)."""
    if out.shape != ref.shape:
        return float("inf")
    out, ref = out.float().cpu(), ref.float().cpu()
    return (out - ref).abs().max().item() / max(1.0, ref.abs().max().item())


def generate(folder: Path, dtype: torch.dtype, steps: int, **options):
    pipe = dit_rt.load(str(folder), device="cuda", dtype=dtype, **options)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = pipe.generate(PROMPTS, num_inference_steps=steps, progress_bar=False, **REQUEST)
    torch.cuda.synchronize()
    return pipe, out, time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="ulysses2,ring2,cfg2,dp2")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--tol", type=float, default=None, help="default: 1e-4 (float32), 3e-2 (bfloat16)")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    tol = args.tol if args.tol is not None else (1e-4 if dtype == torch.float32 else 3e-2)
    if "WORLD_SIZE" not in os.environ:
        raise SystemExit("run under torchrun: torchrun --standalone --nproc-per-node 2 " + sys.argv[0])
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    _, world = init_distributed("cuda")  # NCCL, and this process on cuda:LOCAL_RANK

    rows = []  # (mode, variant, error vs reference, error vs its eager twin, captures, replays, seconds, ok)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_wan(Path(tmp) / "tiny-wan")
        _, reference, _ = generate(folder, dtype, args.steps)  # no parallel=: the one-GPU pipeline
        for mode in args.modes.split(","):
            config = parse_mode(mode)
            if config.world_size != world:
                continue
            parallel = {k: v for k, v in vars(config).items() if k != "fsdp"}
            outputs = {}
            for variant, (options, twin) in VARIANTS.items():
                torch._dynamo.reset()
                pipe, out, seconds = generate(folder, dtype, args.steps, parallel=parallel, **options)
                outputs[variant] = out.latents
                graphs = pipe.transformers[0].runner.graphs
                captures, replays = (graphs.captures, graphs.replays) if graphs is not None else (0, 0)
                vs_ref = error(out.latents, reference.latents)
                vs_twin = error(out.latents, outputs[twin]) if twin else None
                ok = vs_ref <= tol and (twin is None or (vs_twin == 0.0 and captures > 0 and replays > 0))
                rows.append((mode, variant, vs_ref, vs_twin, captures, replays, seconds, ok))
                del pipe
        try:  # refused before anything is loaded
            dit_rt.load(str(folder), device="cuda", cuda_graphs=True, parallel=dict(dp=world, fsdp=True))
            rows.append(("fsdp", "graphs refused", None, None, 0, 0, 0.0, False))
        except ValueError as e:
            rows.append(("fsdp", "graphs refused", None, None, 0, 0, 0.0, "fsdp=True" in str(e)))

    # Every rank's rows in the same order: the worst error, the fewest graphs, the slowest time.
    per_rank = [None] * world
    dist.all_gather_object(per_rank, rows)
    merged = []
    for cells in zip(*per_rank):
        _, _, vs_ref, vs_twin, captures, replays, seconds, ok = zip(*cells)  # one column per field
        merged.append(
            (*cells[0][:2], worst(vs_ref), worst(vs_twin), min(captures), min(replays), max(seconds), all(ok))
        )
    failed = [r for r in merged if not r[7]]
    if dist.get_rank() == 0:
        fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
        print(f"world {world}, {args.dtype}, {args.steps} steps, tolerance vs 1 GPU {tol:g}\n")
        print("| mode | variant | vs 1 GPU | vs eager twin | captures | replays | s | ok |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for mode, variant, vs_ref, vs_twin, captures, replays, seconds, ok in merged:
            print(
                f"| {mode} | {variant} | {fmt(vs_ref)} | {fmt(vs_twin)} | {captures} | {replays} | "
                f"{seconds:.2f} | {'ok' if ok else 'FAIL'} |"
            )
        print(
            f"\n{len(failed)} of {len(merged)} checks failed"
            if failed
            else f"\nall {len(merged)} checks passed"
        )
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
