"""The fused block ops (dit_rt.ops.elementwise) on the GPU: Triton kernels vs the torch path they replace,
at Wan block shapes; checks numerics and prints times and effective bandwidth.

    python tools/bench_elementwise.py --tokens 32760 --dim 1536 --heads 12
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from dit_rt.ops import Linear
from dit_rt.ops import elementwise as E


def timed(fn, iters=20, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def torch_path(fn, *args):
    """Run an op with the Triton dispatch disabled (the eager reference path)."""
    E._use_triton, saved = (lambda x: False), E._use_triton
    try:
        return fn(*args)
    finally:
        E._use_triton = saved


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=32760)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--ffn", type=int, default=8960)
    p.add_argument("--out")
    a = p.parse_args()
    L, D, H, dev, dt = a.tokens, a.dim, a.heads, torch.device("cuda"), torch.bfloat16
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn(1, L, D, device=dev, generator=g).to(dt)
    y = torch.randn(1, L, D, device=dev, generator=g).to(dt)
    shift, scale1, gate = (torch.randn(1, 1, D, device=dev, generator=g) for _ in range(3))
    qkv = torch.randn(1, L, 3 * D, device=dev, generator=g).to(dt)
    w = torch.randn(D, device=dev, generator=g).to(dt)
    ang = torch.randn(L, 1, D // H // 2, device=dev, generator=g)
    cos, sin = ang.cos(), ang.sin()
    cases = {
        "ln_modulate": (E.layer_norm_modulate, (x, shift, scale1, 1e-6), 2 * L * D * 2),
        "gated_residual": (E.gated_residual, (x, y, gate), 3 * L * D * 2),
        "rms_norm_rope(q)": (E.rms_norm_rope, (qkv[..., :D], w, 1e-6, H, cos, sin), 2 * L * D * 2),
    }
    rows = []
    for name, (fn, args, nbytes) in cases.items():
        fused, ref = fn(*args).float(), torch_path(fn, *args).float()
        err = ((fused - ref).norm() / ref.norm()).item()
        ms_f = timed(lambda fn=fn, args=args: fn(*args))
        ms_t = timed(lambda fn=fn, args=args: torch_path(fn, *args))
        rows.append(
            dict(
                op=name,
                fused_ms=ms_f,
                torch_ms=ms_t,
                speedup=ms_t / ms_f,
                rel_err=err,
                fused_GBps=nbytes / ms_f / 1e6,
            )
        )
    lin = Linear(D, a.ffn, device=dev, dtype=dt)
    torch.nn.init.normal_(lin.weight, std=D**-0.5)
    torch.nn.init.normal_(lin.bias, std=0.02)
    fused = lin.gelu_tanh(x).float()
    ref = F.gelu(F.linear(x, lin.weight, lin.bias).float(), approximate="tanh")
    rows.append(
        dict(
            op="linear+gelu_tanh epilogue",
            fused_ms=timed(lambda: lin.gelu_tanh(x)),
            torch_ms=timed(lambda: F.gelu(lin(x), approximate="tanh")),
            rel_err=((fused - ref).norm() / ref.norm()).item(),
        )
    )
    rows[-1]["speedup"] = rows[-1]["torch_ms"] / rows[-1]["fused_ms"]
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}, L={L} D={D} H={H}")
    print("| op | fused ms | torch ms | speedup | rel. err vs torch path |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['op']} | {r['fused_ms']:.3f} | {r['torch_ms']:.3f} | {r['speedup']:.2f} "
            f"| {r['rel_err']:.1e} |"
        )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
