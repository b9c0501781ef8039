"""Block offload and per-block compile on the GPU, random bf16 weights, one transformer forward = one step.

Part 1 (offload): Wan2.1-14B at 480x832x81 (latent 21x60x104, 32,760 tokens, 512 text tokens). The same
model and inputs are timed resident on the GPU, then with offload="block" for a few (resident, buffers)
settings: per-forward time (median of --iters after a warm-up) and peak GPU memory of the forward
(torch.cuda.max_memory_allocated, weights included). Targets: peak <= 1/3 of resident, time <= 1.15x.

Part 2 (compile): Wan2.1-1.3B at 480p (same token count): eager vs apply_compile (inductor, per block):
compile time (the first call minus an eager first call) and the steady-state speedup against an eager twin
timed in alternation; --cuda-graphs adds a
run with the block loop replayed from CUDA graphs (dit_rt.graphs), eager and compiled; --latents adds smaller
latents, where launch overhead weighs more.

    python tools/bench_offload.py --out bench_offload.json            # both parts, ~5 minutes on an H100
    python tools/bench_offload.py --parts compile --cuda-graphs
    python tools/bench_offload.py --preset tiny --device cpu --parts offload --iters 1   # smoke test
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import time

import torch
from bench_wan import profile  # tools/ is on the path when a tool runs as a script

from dit_rt.compile import apply_compile, remove_compile
from dit_rt.graphs import apply_cuda_graphs, remove_cuda_graphs
from dit_rt.models.wan import WanTransformer, WanTransformerConfig
from dit_rt.offload import BlockOffload, apply_offload
from dit_rt.ops import quantize_
from dit_rt.ops.attention import set_attention

LATENT = (21, 60, 104)  # 480x832x81 through the Wan VAE (4x temporal, 8x spatial)
TINY = WanTransformerConfig(
    num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=4, text_dim=64
)


def build(cfg: WanTransformerConfig, device: torch.device, dtype: torch.dtype) -> WanTransformer:
    """Random weights straight on `device`: std 0.02 matrices, unit norms, fp32 where the loader keeps it."""
    with torch.device(device):
        model = WanTransformer(cfg)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            keep = any(k in name for k in WanTransformer.keep_fp32)
            p.data = p.data.to(torch.float32 if keep else dtype)
            if p.ndim == 1 and "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval().requires_grad_(False)


def make_inputs(cfg, latent, device, dtype):
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(1, cfg.in_channels, *latent, generator=g, device=device).to(dtype)
    ctx = torch.randn(1, 512, cfg.text_dim, generator=g, device=device).to(dtype)
    return x, torch.tensor([500.0], device=device), ctx


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def measure(model, inputs, device, iters: int) -> dict:
    """Warm-up call, then the median of `iters` forwards and the peak memory over them."""
    with torch.no_grad():
        timed(lambda: model(*inputs), device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = [timed(lambda: model(*inputs), device) for _ in range(iters)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"step_s": statistics.median(times), "peak_gib": peak}


def remove_offload(model, hook: BlockOffload) -> None:
    hook.detach()
    model.runner.block_hooks.remove(hook)


def bench_offload(args, device, dtype) -> list[dict]:
    cfg = TINY if args.preset == "tiny" else WanTransformerConfig.preset("wan2.1-t2v-14b")
    latent = (3, 8, 8) if args.preset == "tiny" else LATENT
    model = build(cfg, device, dtype)
    backend = set_attention(model, args.attention)
    inputs = make_inputs(cfg, latent, device, dtype)
    tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)
    rows = [
        {
            "run": "resident",
            "model": args.preset,
            "tokens": tokens,
            **measure(model, inputs, device, args.iters),
        }
    ]
    print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    for setting in args.settings.split(","):
        resident, buffers = (int(v) for v in setting.split(":"))
        t0 = time.perf_counter()
        hook = apply_offload(model, "block", device=device, resident=resident, buffers=buffers)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        pack_s = time.perf_counter() - t0
        r = measure(model, inputs, device, args.iters)
        r.update(
            run=f"offload block resident={resident} buffers={buffers}",
            model=args.preset,
            tokens=tokens,
            pack_s=pack_s,
            copies_per_step=(hook.copies / (args.iters + 1)),
            time_ratio=r["step_s"] / base["step_s"],
            memory_ratio=r["peak_gib"] / base["peak_gib"] if device.type == "cuda" else float("nan"),
        )
        rows.append(r)
        print(json.dumps(r), flush=True)
        remove_offload(model, hook)
        del hook
        gc.collect()
    rows[0]["attention"] = str(next(iter(backend.values())))
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def bench_compile(args, device, dtype) -> list[dict]:
    """Per latent and variant: the variant's model and an eager twin with the same weights, timed in
    alternation (eager, variant, eager, ...) so clock drift over the run hits both sides alike."""
    cfg = TINY if args.preset == "tiny" else WanTransformerConfig.preset("wan2.1-t2v-1.3b")
    base, model = build(cfg, device, dtype), build(cfg, device, dtype)  # same seed: same weights
    for m in (base, model):
        set_attention(m, args.attention)
        if args.linear:  # compile over quantized block linears (the fast mode)
            quantize_(m.blocks, args.linear)
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    variants = [("compile", dict(compile=True))]
    if args.cuda_graphs:
        variants += [
            ("cuda-graphs", dict(graphs=True)),
            ("compile+cuda-graphs", dict(compile=True, graphs=True)),
        ]
    latents = [(3, 8, 8)] if args.preset == "tiny" else [LATENT]
    latents += [tuple(int(n) for n in s.split("x")) for s in filter(None, args.latents.split(","))]
    rows = []
    for latent in latents:
        inputs = make_inputs(cfg, latent, device, dtype)
        tokens = latent[0] * latent[1] * latent[2] // 4
        label = f"{args.preset} {tokens} tok {args.attention}" + (f" {args.linear}" if args.linear else "")
        with torch.no_grad():
            eager_first = timed(functools.partial(base, *inputs), device)
            ref = base(*inputs).float()
        if args.profile and device.type == "cuda":
            profile(functools.partial(base, *inputs), f"eager {label}")
        for name, kw in variants:
            torch._dynamo.reset()
            if kw.get("compile"):
                apply_compile(model, backend=backend, cuda_graphs=kw.get("graphs", False))
            else:
                apply_cuda_graphs(model)
            with torch.no_grad():
                first = timed(functools.partial(model, *inputs), device)
                timed(functools.partial(model, *inputs), device)
                pairs = [
                    (
                        timed(functools.partial(base, *inputs), device),
                        timed(functools.partial(model, *inputs), device),
                    )
                    for _ in range(args.iters)
                ]
                out = model(*inputs).float()
            if args.profile and device.type == "cuda" and name == "compile":
                profile(functools.partial(model, *inputs), f"{name} {label}")
            eager_s, step_s = (statistics.median(p[i] for p in pairs) for i in (0, 1))
            r = dict(
                run=name,
                model=label,
                eager_s=eager_s,
                step_s=step_s,
                first_call_s=first,
                compile_s=first - eager_first,
                speedup=eager_s / step_s,
                rel_diff_vs_eager=((out - ref).norm() / ref.norm()).item(),
            )
            rows.append(r)
            print(json.dumps(r), flush=True)
            remove_compile(model)
            remove_cuda_graphs(model)
    return rows


def table(rows: list[dict]) -> str:
    cols = ["run", "model", "step_s", "peak_gib", "time_ratio", "memory_ratio", "eager_s", "compile_s"]
    cols += ["speedup", "rel_diff_vs_eager"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r.get(c, "") for c in cols]
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="offload,compile")
    ap.add_argument("--preset", default="real", choices=["real", "tiny"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--attention", default="auto")
    ap.add_argument(
        "--settings", default="0:2,0:3,4:2", help="offload runs as resident:buffers, comma separated"
    )
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--cuda-graphs", action="store_true", help="compile part: also CUDA graphs, +/- compile")
    ap.add_argument(
        "--latents", default="", help="compile part: more latent sizes TxHxW after 21x60x104, e.g. 21x30x52"
    )
    ap.add_argument("--profile", action="store_true", help="compile part: kernels of eager and compiled")
    ap.add_argument("--linear", default=None, help="compile part: convert the block linears to this format")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), torch.bfloat16
    rows = []
    if "offload" in args.parts:
        rows += bench_offload(args, device, dtype)
    if "compile" in args.parts:
        rows += bench_compile(args, device, dtype)
    env = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    result = {"env": env, "args": vars(args), "rows": rows}
    print(json.dumps(result, indent=1))
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
