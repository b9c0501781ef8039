"""Benchmark the attention backends on one GPU at Wan sizes: numerics first, then CUDA-event timings.

    python tools/bench_attention.py --out $OUT/attention.json
    python tools/bench_attention.py --shapes 1x32760x12x128 --backends sdpa,fa3,fa3-fp8

Each shape is B x S x H x D (bf16, q/k/v as (B, S, H, D)). Variants:
  sdpa               dit_rt's sdpa backend (copies to dense (B, H, S, D), cuDNN first)
  sdpa-view          SDPA on a (B, S, H, D) tensor viewed as (B, H, S, D), cuDNN first
  sdpa-dense         SDPA on tensors already dense in (B, H, S, D), cuDNN first (the ceiling)
  fa3, sage          dit_rt's backends
  fa3-fp8            dit_rt's fa3-fp8 backend, quantization included
  fa3-fp8-noquant    FA3 fp8 on pre-quantized q/k/v (what a fused QK-norm/RoPE -> fp8 would see)
  quant-triton/torch the per-(batch, head) e4m3 quantize of one tensor (time only)
  sdpa-lse, fa3-lse  the return_lse=True paths, LSE checked too
Numerics: relative L2 error of the first --ref-rows query rows against a float64 reference.
TFLOP/s counts 4 * B * H * S * S * D. A failing variant prints its error; the others go on.
"""

import argparse
import json
import statistics
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_rt.ops.attention import attention, quantize_fp8, resolve_attention  # noqa: E402
from dit_rt.ops.attention import fa3 as fa3_mod  # noqa: E402

CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
ALL = "sdpa,sdpa-view,sdpa-dense,fa3,fa3-fp8,fa3-fp8-noquant,quant-triton,quant-torch,sage,sdpa-lse,fa3-lse"


def reference(q, k, v, rows):
    """float64 attention of the first `rows` queries, head by head: out (B, rows, H, D), lse (B, H, rows)."""
    b, _, h, d = q.shape
    out = torch.empty(b, rows, h, d, dtype=torch.float64, device=q.device)
    lse = torch.empty(b, h, rows, dtype=torch.float64, device=q.device)
    for i in range(b):
        for j in range(h):
            s = q[i, :rows, j].double() @ k[i, :, j].double().T * d**-0.5  # [rows, S]
            lse[i, j] = torch.logsumexp(s, -1)
            out[i, :, j] = torch.softmax(s, -1) @ v[i, :, j].double()
    return out, lse


def time_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def variants(q, k, v):
    """name -> zero-argument callable returning out (B, S, H, D), (out, lse), or None (time only)."""
    dense = [x.transpose(1, 2).contiguous() for x in (q, k, v)]  # [B, H, S, D]

    def sdpa_on(tensors):
        with sdpa_kernel(CUDNN_FIRST, set_priority=True):
            return F.scaled_dot_product_attention(*tensors).transpose(1, 2)

    def prequantized():
        fq, fk, fv = (quantize_fp8(x, num_scales=k.shape[2]) for x in (q, k, v))
        args = (fq.data, fk.data, fv.data, q.shape[-1] ** -0.5, fq.descale, fk.descale, fv.descale)
        return lambda: torch.ops.dit_rt.fa3_fwd(*args)[0]

    def quantize(use_triton):
        def run():
            quantize_fp8(q, use_triton=use_triton)  # time only: the output is not an attention result

        return run

    def backend(name, lse=False):
        b = resolve_attention(name, device=q.device, dtype=q.dtype, head_dim=q.shape[-1])
        return lambda: b(q, k, v, None, lse)

    return {
        "sdpa": lambda: backend("sdpa"),
        "sdpa-view": lambda: lambda: sdpa_on([x.transpose(1, 2) for x in (q, k, v)]),
        "sdpa-dense": lambda: lambda: sdpa_on(dense),
        "fa3": lambda: backend("fa3"),
        "fa3-fp8": lambda: backend("fa3-fp8"),
        "fa3-fp8-noquant": prequantized,
        "quant-triton": lambda: quantize(True),
        "quant-torch": lambda: quantize(False),
        "sage": lambda: backend("sage"),
        "sdpa-lse": lambda: backend("sdpa", lse=True),
        "fa3-lse": lambda: backend("fa3", lse=True),
    }


def run_shape(shape, names, args):
    b, s, h, d = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    ref_out, ref_lse = reference(q, k, v, args.ref_rows)
    flops = 4 * b * h * s * s * d
    table = variants(q, k, v)
    results = []
    for name in names:
        row = dict(shape=list(shape), variant=name)
        try:
            fn = table[name]()
            res = fn()
            if isinstance(res, tuple):
                res, lse = res
                row["lse_max_abs_err"] = (lse[:, :, : args.ref_rows].double() - ref_lse).abs().max().item()
            if res is not None:
                got = res[:, : args.ref_rows].double()
                row["rel_err"] = ((got - ref_out).norm() / ref_out.norm()).item()
            ms = time_ms(fn, args.warmup, args.iters)
            row["ms"] = ms
            if res is not None:
                row["tflops"] = flops / ms / 1e9
        except Exception as e:  # a missing package or a kernel failure must not stop the others
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        print(json.dumps(row), flush=True)
        results.append(row)
    del q, k, v
    torch.cuda.empty_cache()
    return results


def markdown(rows):
    lines = ["| shape B,S,H,D | variant | ms | TFLOP/s | rel. err | LSE err |", "|---|---|---|---|---|---|"]
    for r in rows:

        def fmt(key, spec, r=r):
            return spec.format(r[key]) if key in r else ""

        note = r.get("error", "")[:60]
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['variant']} | {fmt('ms', '{:.3f}')} | "
            f"{fmt('tflops', '{:.0f}')} | {fmt('rel_err', '{:.2e}')} | {fmt('lse_max_abs_err', '{:.1e}')}"
            f"{' ' + note if note else ''} |"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1x32760x12x128,1x75600x40x128", help="comma-separated BxSxHxD")
    p.add_argument("--backends", default=ALL, help=f"comma-separated variants (default: {ALL})")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--ref-rows", type=int, default=512, help="query rows checked against float64")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU")
    names = args.backends.split(",")
    unknown = set(names) - set(ALL.split(","))
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}; choose from {ALL}")
    mod = fa3_mod.fa3_module()
    print(
        f"# {torch.cuda.get_device_name()} torch {torch.__version__} cuDNN {torch.backends.cudnn.version()} "
        f"fa3 module: {mod.__name__ if mod else None}",
        flush=True,
    )
    rows = []
    for spec in args.shapes.split(","):
        rows += run_shape(tuple(int(x) for x in spec.lower().split("x")), names, args)
    # A one-call sanity check of the public entry point with `auto`.
    q = torch.randn(1, 256, 2, 128, device="cuda", dtype=torch.bfloat16)
    print("auto ->", resolve_attention("auto", device=q.device, dtype=q.dtype, head_dim=128).name)
    attention(q, q, q, backend="auto")
    table = markdown(rows)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
