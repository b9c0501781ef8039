"""Multi-GPU Wan2.1-14B at 720x1280x81: one CFG denoising step per parallel mode, and the parallel VAE decode.

    torchrun --standalone --nproc-per-node 1 tools/bench_parallel.py --modes single --vae
    torchrun --standalone --nproc-per-node 2 tools/bench_parallel.py --modes cfg2,ulysses2,ring2 --vae \
        --baseline-ms <single step ms> --vae-baseline-ms <single decode ms>
    torchrun --standalone --nproc-per-node 4 tools/bench_parallel.py \
        --modes ulysses4,cfg2xulysses2,ulysses2xring2 --vae --baseline-ms ... --vae-baseline-ms ...

Random bf16 weights with the same seed on every rank (LayerNorms, modulation and timestep MLP in fp32 as
the loader keeps them), built once per process on its GPU (or sharded with --fsdp) and re-wrapped per
mode: sequence parallelism is installed and removed around each mode's timing. A step is the two guided
forwards of the real loop (conditional and unconditional, 512 text tokens each; one per rank under cfg2)
plus the guidance combine; the scheduler update is negligible and left out. Times are medians of CUDA
events over --iters steps after --warmup, the slowest rank's median. Modes whose degrees do not multiply
to the world size are skipped. --check first compares each mode's output with one-GPU forwards at a small
latent. Rank 0 prints one JSON line per measurement and a markdown table. NCCL_NVLS_ENABLE=0 (NVLink
multicast off, see device/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dit_rt.parallel import (
    ParallelConfig,
    ParallelMesh,
    SequenceParallel,
    cfg_gather,
    cfg_select,
    init_distributed,
    shard_blocks,
)
from dit_rt.parallel.vae import parallel_decode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling tools
from bench_wan import randomize_  # noqa: E402

WAN14B = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096)
VAE = dict(
    base_dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2, temperal_downsample=(False, True, True)
)
# --tiny: the same code path at toy sizes, on the CPU (gloo) without a GPU: a smoke test of this script.
TINY_WAN = dict(num_attention_heads=3, attention_head_dim=16, ffn_dim=64, num_layers=2, text_dim=4096)
TINY_VAE = dict(VAE, base_dim=8, num_res_blocks=1)
GUIDANCE = 5.0


def parse_mode(mode: str) -> ParallelConfig:
    """ "single" | "cfg2" | "ulysses4" | "cfg2xulysses2" | "ulysses2xring2" ... -> ParallelConfig."""
    degrees = {}
    if mode != "single":
        for part in mode.split("x"):
            m = re.fullmatch(r"(dp|cfg|ulysses|ring)(\d+)", part)
            if not m:
                raise SystemExit(f"mode {mode!r}: parts are dp<N>, cfg<N>, ulysses<N>, ring<N> joined by 'x'")
            degrees[m.group(1)] = int(m.group(2))
    return ParallelConfig(**degrees)


def build_model(cls, config, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """`cls(config)` in `dtype` on `device` (the model's keep_fp32 parts in fp32), random weights."""
    with torch.device("meta"):
        model = cls(config).to(dtype)
    model.to_empty(device=device)
    keep = tuple(getattr(model, "keep_fp32", ()) or ())
    for name, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if any(k in f"{name}.{pname}" for k in keep):
                setattr(module, pname, torch.nn.Parameter(p.float(), requires_grad=False))
    randomize_(model, seed)
    return model.eval().requires_grad_(False)


def timed(fn, warmup: int, iters: int, device: torch.device) -> float:
    """Median ms of `fn` over `iters` calls after `warmup`, the slowest rank's (CUDA events on GPUs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if dist.is_initialized():
            dist.barrier()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    ms = torch.tensor(statistics.median(times), device=device)
    if dist.is_initialized():
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return ms.item()


def make_step(model, mesh: ParallelMesh, x, t, cond, uncond):
    """One guided step's transformer work: returns uncond + s * (cond - uncond), [B, 16, T, h, w]."""
    cfg_group = mesh.group("cfg")

    def step():
        if cfg_group is not None:
            c, u = cfg_gather(model(x, t, cfg_select(cond, uncond, cfg_group)), cfg_group)
        else:
            c, u = model(x, t, cond), model(x, t, uncond)
        return u + GUIDANCE * (c - u)

    return step


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--modes", default="auto", help="comma-separated modes; auto = the usual ones for the world"
    )
    p.add_argument("--attention", default=None, help="backend (default: fa3 if usable, else sdpa)")
    p.add_argument("--size", default="720x1280x81", help="HxWxF in pixels / frames")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--fsdp", action="store_true", help="shard the transformer blocks over all ranks")
    p.add_argument("--vae", action="store_true", help="also time the (parallel) VAE decode")
    p.add_argument("--vae-iters", type=int, default=1)
    p.add_argument("--check", action="store_true", help="compare each mode with one GPU at a small latent")
    p.add_argument("--baseline-ms", type=float, help="one-GPU step time, for speedup and efficiency")
    p.add_argument("--vae-baseline-ms", type=float, help="one-GPU decode time, for the decode speedup")
    p.add_argument("--out", help="append the JSON rows to this file (rank 0)")
    p.add_argument("--tiny", action="store_true", help="toy sizes (CPU without a GPU): a smoke test")
    a = p.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off, before any NCCL communicator

    from dit_rt.models.wan import WanTransformer, WanTransformerConfig, WanVAE, WanVAEConfig
    from dit_rt.ops.attention import set_attention

    cuda = torch.cuda.is_available()
    _, world = init_distributed("cuda" if cuda else "cpu")
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    gpu = torch.cuda.get_device_name() if cuda else "CPU"
    if a.tiny and a.size == p.get_default("size"):
        a.size = "48x80x9"
    say = print if rank == 0 else (lambda *args, **kw: None)
    auto = {
        1: "single",
        2: "cfg2,ulysses2,ring2",
        4: "ulysses4,cfg2xulysses2,ulysses2xring2",
        8: "cfg2xulysses4",
    }
    modes = (auto.get(world, f"ulysses{world}") if a.modes == "auto" else a.modes).split(",")

    t0 = time.time()
    wan = TINY_WAN if a.tiny else WAN14B
    model = build_model(WanTransformer, WanTransformerConfig(**wan), device, dtype, seed=0)
    names = [a.attention] if a.attention else ["fa3", "sdpa"]
    for name in names:
        try:
            set_attention(model, name, device=device, dtype=dtype)
            attention = name
            break
        except (ImportError, ValueError, RuntimeError, NotImplementedError) as e:
            if a.attention:
                raise
            say(f"attention {name} not usable here ({e}); trying the next")
    if a.fsdp:
        shard_blocks(model)
    name = "tiny Wan" if a.tiny else "Wan2.1-14B"
    say(
        f"built {name} ({attention}, fsdp={a.fsdp}) in {time.time() - t0:.0f}s on {world} x {gpu}", flush=True
    )

    H, W, F = (int(v) for v in a.size.split("x"))
    lat = (1, 16, (F - 1) // 4 + 1, H // 8, W // 8)
    g = torch.Generator(device).manual_seed(1)  # the same inputs on every rank
    x = torch.randn(lat, generator=g, device=device).to(dtype)
    cond = torch.randn(1, 512, 4096, generator=g, device=device).to(dtype)
    uncond = torch.randn(1, 512, 4096, generator=g, device=device).to(dtype)
    t = torch.tensor([900.0], device=device)
    small = (1, 16, 3, 6, 10) if a.tiny else (1, 16, 5, 30, 52)  # 45 / 1950 tokens: no degree divides them
    xs = torch.randn(small, generator=g, device=device).to(dtype)
    tokens = lat[2] * (lat[3] // 2) * (lat[4] // 2)
    step_flops = 2 * model.flops(lat[2], lat[3], lat[4], text_len=512)

    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        say(json.dumps(row), flush=True)

    for mode in modes:
        config = parse_mode(mode)
        if config.world_size != world:
            say(f"skip {mode}: needs {config.world_size} GPUs, this run has {world}")
            continue
        mesh = ParallelMesh.build(config, device)
        row = dict(mode=mode, gpus=world, attention=attention, fsdp=a.fsdp, tokens=tokens)
        with torch.no_grad():
            if a.check:
                single = make_step(model, ParallelMesh(ParallelConfig()), xs, t, cond, uncond)()
            sp = SequenceParallel.apply(model, mesh) if config.sp > 1 else None
            try:
                if a.check:
                    row["check_rel_err"] = rel_err(make_step(model, mesh, xs, t, cond, uncond)(), single)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                ms = timed(make_step(model, mesh, x, t, cond, uncond), a.warmup, a.iters, device)
            finally:
                if sp is not None:
                    sp.remove()
        row.update(step_ms=ms, tflops_per_gpu=step_flops / ms / 1e9 / world, peak_gib=peak_gib())
        if a.baseline_ms:
            row.update(speedup=a.baseline_ms / ms, efficiency=a.baseline_ms / ms / world)
        emit(row)

    if a.vae:
        model = None
        if cuda:
            torch.cuda.empty_cache()
        vae = build_model(WanVAE, WanVAEConfig(**(TINY_VAE if a.tiny else VAE)), device, dtype, seed=2)
        z = torch.randn(1, 16, lat[2], lat[3], lat[4], generator=g, device=device).to(dtype)
        group = dist.group.WORLD if world > 1 else None
        row = dict(mode=f"vae-decode x{world}", gpus=world, latent="x".join(map(str, z.shape[1:])))
        if a.check:
            zs = torch.randn(1, 16, 3, 30 if not a.tiny else 7, 52, generator=g, device=device).to(dtype)
            row["check_rel_err"] = rel_err(parallel_decode(vae, zs, group), vae.decode(zs))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        ms = timed(lambda: parallel_decode(vae, z, group), 1, a.vae_iters, device)
        row.update(ms=ms, peak_gib=peak_gib())
        if a.vae_baseline_ms:
            row.update(speedup=a.vae_baseline_ms / ms, efficiency=a.vae_baseline_ms / ms / world)
        emit(row)

    say(f"\n{gpu} x{world}, torch {torch.__version__}, {name} {a.size}")
    say("| mode | GPUs | ms | speedup | efficiency | TFLOP/s per GPU | peak GiB |")
    say("|---|---|---|---|---|---|---|")
    for r in rows:
        ms = r.get("step_ms", r.get("ms"))
        sp, eff = r.get("speedup"), r.get("efficiency")
        tf = f"{r['tflops_per_gpu']:.0f}" if "tflops_per_gpu" in r else "-"
        say(
            f"| {r['mode']} | {r['gpus']} | {ms:.0f} | {f'{sp:.2f}x' if sp else '-'} | "
            f"{f'{eff:.0%}' if eff else '-'} | {tf} | {r['peak_gib']:.1f} |"
        )
    if a.out and rank == 0:
        with open(a.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
