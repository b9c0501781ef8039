"""Launch dit_rt on several processes with torchrun, one per GPU, sized from the parallel degrees.

    python tools/launch.py generate --model wan2.1-t2v-1.3b --prompt "a cat" --ulysses 2 --cfg 2 -o cat.mp4
        -> torchrun --standalone --nproc-per-node 4 -m dit_rt generate ... (the product of --dp, --cfg,
           --ulysses, --ring; --nproc-per-node N overrides it)
    python tools/launch.py selftest --ulysses 2 --ring 2 [--seq 32760 --heads 12 --head-dim 128]
        -> every rank checks sequence-parallel attention against one-process attention on its device
           (NCCL on GPUs, gloo on CPU) and rank 0 prints the max error and both times.

Everything after the subcommand is passed to `dit-rt` unchanged; torchrun must be able to run here
(`python -m torch.distributed.run`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

DEGREES = ("dp", "cfg", "ulysses", "ring")


def _degrees(argv: list[str]) -> dict[str, int]:
    p = argparse.ArgumentParser(add_help=False)
    for d in DEGREES:
        p.add_argument(f"--{d}", type=int, default=1)
    known, _ = p.parse_known_args(argv)
    return {d: getattr(known, d) for d in DEGREES}


def _torchrun(nproc: int, target: list[str]) -> int:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *target,
    ]
    print(" ".join(cmd), flush=True)
    os.execv(sys.executable, cmd)  # replaces this process: torchrun's exit status is ours


def _selftest(argv: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from dit_rt.ops.attention import attention, resolve_attention
    from dit_rt.parallel import (
        ParallelMesh,
        SequenceLayout,
        SequenceParallelAttention,
        gather_sequence,
        shard_sequence,
    )

    p = argparse.ArgumentParser()
    for d in DEGREES:
        p.add_argument(f"--{d}", type=int, default=1)
    p.add_argument("--seq", type=int, default=4099, help="sequence length (any; padded to the degree)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--attention", default="sdpa", help="backend under the parallel op")
    p.add_argument("--iters", type=int, default=5)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    mesh = ParallelMesh.build({d: getattr(a, d) for d in DEGREES}, device="cuda" if cuda else "cpu")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device).manual_seed(mesh.rank("dp") * 10 + mesh.rank("cfg"))
    q, k, v = (
        torch.randn(1, a.seq, a.heads, a.head_dim, device=device, dtype=dtype, generator=g) for _ in "qkv"
    )

    def timed(fn):
        fn()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(a.iters):
            out = fn()
        if cuda:
            torch.cuda.synchronize()
        return out, (time.perf_counter() - start) / a.iters * 1e3

    backend = resolve_attention(a.attention, device=device, dtype=dtype, head_dim=a.head_dim)
    ref, t_one = timed(lambda: attention(q, k, v, backend=backend))
    world, rank = mesh.size("sp"), mesh.rank("sp")
    shards = [shard_sequence(x, 1, world, rank) for x in (q, k, v)]
    op = SequenceParallelAttention(backend, mesh, SequenceLayout({"x": a.seq}), ("x",))
    out, t_par = timed(lambda: op(*shards))
    full = gather_sequence(out, 1, mesh.group("sp"), a.seq)
    err = torch.tensor((full.float() - ref.float()).abs().max().item(), device=device)
    if dist.is_initialized():
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(
            f"selftest {mesh.config}: L={a.seq} H={a.heads} D={a.head_dim} {dtype}: "
            f"max abs err {err.item():.3g}; one process {t_one:.2f} ms, "
            f"sequence-parallel {t_par:.2f} ms per call (comm included)"
        )
    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str]) -> None:
    if argv[:1] == ["--worker-selftest"]:
        return _selftest(argv[1:])
    nproc = None
    if argv[:1] and argv[0].startswith("--nproc-per-node"):
        flag = argv.pop(0)
        nproc = int(flag.split("=", 1)[1] if "=" in flag else argv.pop(0))
    if not argv:
        sys.exit(__doc__)
    nproc = nproc or math.prod(_degrees(argv).values())
    if argv[0] == "selftest":
        _torchrun(nproc, [os.path.abspath(__file__), "--worker-selftest", *argv[1:]])
    _torchrun(nproc, ["-m", "dit_rt", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
