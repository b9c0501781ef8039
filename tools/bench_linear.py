"""Benchmark the linear weight formats against bf16 F.linear on the GPU, at DiT GEMM sizes.

For each (M, N, K) = (tokens, out, in) it times, with CUDA events (median of --iters after warm-up):
bf16 F.linear (the baseline), each format's Linear.forward (activation quantization included), and
for the fp8 formats the GEMM alone on pre-quantized activations. It checks the relative error of
every output against an fp32 reference first (a format failing the check is still timed, and
flagged), checks the Triton activation quantizer against the torch path, prints TFLOP/s and the
speedup over bf16 as a markdown table, and writes everything as JSON to --out. A format that raises
prints its error and the script moves on.

    python tools/bench_linear.py --out $OUT/linear.json
    python tools/bench_linear.py --formats fp8-per-tensor --shapes 32760x8960x1536 --gelu-epilogue
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from dit_rt.ops.linear import Linear, fp8, triton_quant

SHAPES = [(32760, 1536, 1536), (32760, 8960, 1536), (75600, 5120, 5120)]
FORMATS = [
    "fp8-per-tensor",
    "fp8-rowwise",
    "fp8-blockwise",
    "nvfp4",
    "svdquant",
    "trtllm-fp8-per-tensor",
    "trtllm-fp8-blockwise",
]
ERROR_BOUNDS = {"nvfp4": 0.12, "svdquant": 0.15}  # fp8 formats: 4e-2 (see tests/test_linear.py)
REF_ROWS = 4096  # error checked on the first rows: the fp32 reference of all 75600 costs more than it tells


def time_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y[:REF_ROWS].float() - ref).norm() / ref.norm())


def gemm_only(lin: Linear, x: torch.Tensor):
    """A closure running just the fp8 GEMM of `lin` on activations quantized beforehand, or None."""
    Np, Kp = lin.qweight.shape
    if lin.fmt in ("fp8-per-tensor", "fp8-rowwise"):
        mode = "tensor" if lin.fmt == "fp8-per-tensor" else "row"
        q, s = fp8.quantize_act(x, mode, Kp)
        if lin.fmt == "fp8-per-tensor" and lin.single_scale:
            return lambda: fp8._scaled_mm(
                q, lin.qweight.t(), s, "tensor", lin.weight_scale[0], "tensor", lin.bias, x.dtype
            )
        s = s.expand(q.shape[0], 1).contiguous()
        w_s = lin.weight_scale.view(1, Np)
        return lambda: fp8._scaled_mm(q, lin.qweight.t(), s, "row", w_s, "row", lin.bias, x.dtype)
    if lin.fmt == "fp8-blockwise":
        q, s = fp8.quantize_act(x, "block", Kp)
        if s.stride(0) != 1:
            s = s.t().contiguous().t()
        w_s = lin.weight_scale.t()
        return lambda: fp8._scaled_mm(q, lin.qweight.t(), s, "1x128", w_s, "128x128", None, x.dtype)
    return None


def check_triton_quant(x: torch.Tensor) -> dict:
    """Fraction of fp8 codes and max scale difference between the Triton and torch quantizers."""
    if not triton_quant.available():
        return {"triton": False}
    out = {}
    Kp = x.shape[1]
    for mode in ("tensor", "row", "block"):
        q_t, s_t = triton_quant.quantize(x, mode, Kp)
        q_r, s_r = _torch_quant(x, mode, Kp)
        out[mode] = {
            "code_mismatch": float((q_t.view(torch.uint8) != q_r.view(torch.uint8)).float().mean()),
            "scale_max_rel_diff": float(((s_t - s_r).abs() / s_r).max()),
        }
    return out


def _torch_quant(x, mode, Kp):
    # The torch path of fp8.quantize_act, forced on a CUDA tensor.
    available = triton_quant.available
    triton_quant.available = lambda: False
    try:
        return fp8.quantize_act(x, mode, Kp)
    finally:
        triton_quant.available = available


def bench_format(fmt: str, x, w, b, ref, base_ms: float, warmup: int, iters: int) -> dict:
    """Error, full-forward time and (fp8) GEMM-only time of one format."""
    (M, K), N = x.shape, w.shape[0]
    flop = 2 * M * N * K
    lin = Linear(K, N, device=x.device, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    lin.convert(fmt)
    entry = {}
    with torch.no_grad():
        entry["rel_err"] = rel_err(lin(x), ref)
        entry["within_bound"] = entry["rel_err"] < ERROR_BOUNDS.get(fmt, 4e-2)
        ms = time_ms(lambda: lin(x), warmup, iters)
        entry.update(ms=ms, tflops=flop / ms / 1e9, speedup=base_ms / ms)
        gemm = gemm_only(lin, x) if lin.fmt.startswith("fp8") else None
        if gemm is not None:
            g_ms = time_ms(gemm, warmup, iters)
            entry.update(gemm_ms=g_ms, gemm_tflops=flop / g_ms / 1e9, gemm_speedup=base_ms / g_ms)
    return entry


def bench_gelu_epilogue(x, w, b, warmup: int, iters: int) -> dict:
    """A DiT FFN's up projection in fp8-per-tensor, both ways dit_rt runs it: scaled-mm writing bf16 (bias
    left out) + the Triton pass adding bias, GELU and casting to e4m3; and cuBLASLt's bias + GELU + e4m3
    epilogue (`cublaslt.gemm_gelu_fp8`). Error of each's dequantized hidden activation vs an fp32 GELU of
    the same codes' product, on the first rows; the per-tensor scale is a bound 1.25x the measured max."""
    from dit_rt.ops.linear import cublaslt

    (M, K), N = x.shape, w.shape[0]
    lin = Linear(K, N, device=x.device, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    lin.convert("fp8-per-tensor")
    q, s = fp8.quantize_act(x, "tensor", K)
    w_s = lin.weight_scale[0]

    def gemm():
        return fp8._scaled_mm(q, lin.qweight.t(), s, "tensor", w_s, "tensor", None, x.dtype, lin.fast_accum)

    h = gemm()
    bound = (F.gelu(h.float() + lin.bias.float(), approximate="tanh").abs().amax() * 1.25).reshape(1)
    ref = F.gelu((q[:REF_ROWS].float() @ lin.qweight.float().t()) * (s * w_s) + b.float(), approximate="tanh")

    def with_pass():
        return triton_quant.quantize_bounded(gemm(), bound, gelu=True, bias=lin.bias)[0]

    def epilogue():
        return cublaslt.gemm_gelu_fp8(q, lin.qweight, s, w_s, lin.bias, 448.0 / bound, lin.fast_accum)

    entry = {}
    for name, fn in (("gemm_bf16_out", gemm), ("gemm_and_gelu_pass", with_pass), ("epilogue", epilogue)):
        entry[f"{name}_ms"] = time_ms(fn, warmup, iters)
    for name, fn in (("gemm_and_gelu_pass", with_pass), ("epilogue", epilogue)):
        entry[f"{name}_rel_err"] = rel_err(fn().float() * (bound / 448.0), ref)
    entry["epilogue_tflops"] = 2 * M * N * K / entry["epilogue_ms"] / 1e9
    return entry


def bench_shape(M: int, N: int, K: int, formats: list[str], warmup: int, iters: int) -> dict:
    """Baseline, every format and the quantizer check at one GEMM size."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    with dev:
        x = torch.randn(M, K, dtype=torch.bfloat16)
        w = (torch.randn(N, K) / K**0.5).to(torch.bfloat16)
        b = (torch.randn(N) * 0.1).to(torch.bfloat16)
    flop = 2 * M * N * K
    ref = x[:REF_ROWS].float() @ w.float().t() + b.float()
    base_ms = time_ms(lambda: F.linear(x, w, b), warmup, iters)
    row = {"shape": [M, N, K], "bf16_ms": base_ms, "bf16_tflops": flop / base_ms / 1e9}
    row["bf16_rel_err"] = rel_err(F.linear(x, w, b), ref)
    row["triton_quant_check"] = check_triton_quant(x)
    row["formats"] = {}
    for fmt in formats:
        try:
            entry = bench_format(fmt, x, w, b, ref, base_ms, warmup, iters)
        except Exception as e:  # one format failing must not stop the others
            entry = {"error": f"{type(e).__name__}: {e}"}
            print(f"[{M}x{N}x{K}] {fmt}: {entry['error']}")
        row["formats"][fmt] = entry
        torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_linear.json")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--shapes", default=None, help="e.g. 32760x8960x1536,75600x5120x5120 (M x N x K)")
    ap.add_argument(
        "--gelu-epilogue",
        action="store_true",
        help="also time the fp8 FFN up projection with the GELU-cast pass against cuBLASLt's GELU epilogue",
    )
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    dev = torch.device("cuda")
    results = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "rows": []}
    print(f"# {results['device']}, torch {results['torch']}")
    for M, N, K in shapes:
        results["rows"].append(bench_shape(M, N, K, args.formats.split(","), args.warmup, args.iters))
        if args.gelu_epilogue:
            torch.manual_seed(0)
            x = torch.randn(M, K, dtype=torch.bfloat16, device=dev)
            w = (torch.randn(N, K, device=dev) / K**0.5).to(torch.bfloat16)
            b = (torch.randn(N, device=dev) * 0.1).to(torch.bfloat16)
            results["rows"][-1]["gelu_epilogue"] = bench_gelu_epilogue(x, w, b, args.warmup, args.iters)
            del x, w, b
            torch.cuda.empty_cache()

    lines = [
        "| M x N x K | format | ms | TFLOP/s | speedup vs bf16 | GEMM-only TFLOP/s | GEMM-only speedup "
        "| rel. error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        shape = "x".join(map(str, row["shape"]))
        lines.append(
            f"| {shape} | bf16 F.linear | {row['bf16_ms']:.3f} | {row['bf16_tflops']:.0f} | 1.00 | | | "
            f"{row['bf16_rel_err']:.2e} |"
        )
        for fmt, e in row["formats"].items():
            if "error" in e:
                lines.append(f"| {shape} | {fmt} | failed: {e['error'][:80]} | | | | | |")
                continue
            gemm = f"{e['gemm_tflops']:.0f} | {e['gemm_speedup']:.2f}" if "gemm_ms" in e else " | "
            flag = "" if e["within_bound"] else " (over bound)"
            lines.append(
                f"| {shape} | {fmt} | {e['ms']:.3f} | {e['tflops']:.0f} | {e['speedup']:.2f} | {gemm} | "
                f"{e['rel_err']:.2e}{flag} |"
            )
    if args.gelu_epilogue:
        lines += [
            "",
            "| M x N x K | fp8 GEMM, bf16 out | + GELU-cast pass | cuBLASLt GELU epilogue | epilogue TFLOP/s "
            "| rel. error: pass / epilogue |",
            "|---|---|---|---|---|---|",
        ]
        for row in results["rows"]:
            e = row["gelu_epilogue"]
            lines.append(
                f"| {'x'.join(map(str, row['shape']))} | {e['gemm_bf16_out_ms']:.3f} | "
                f"{e['gemm_and_gelu_pass_ms']:.3f} | {e['epilogue_ms']:.3f} | {e['epilogue_tflops']:.0f} | "
                f"{e['gemm_and_gelu_pass_rel_err']:.2e} / {e['epilogue_rel_err']:.2e} |"
            )
    table = "\n".join(lines)
    results["table"] = table
    print(table)
    for row in results["rows"]:
        print("triton quantizer vs torch:", "x".join(map(str, row["shape"])), row["triton_quant_check"])
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
