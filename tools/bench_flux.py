"""Real-size FLUX.1-dev transformer forward and VAE decode: dit_rt next to diffusers in the same run, same
random weights.

    python tools/bench_flux.py --vae --fp32-ref --out /tmp/flux.json            # H200, one call
    python tools/bench_flux.py --tiny --device cpu                               # CPU smoke test

One transformer forward at 1024x1024 (4096 image tokens + 512 T5 tokens, batch 1, embedded guidance 3.5):
dit_rt exact (`--attention`, fa3 by default) and its fast variants (`--fast`: fp8-per-tensor linears +
fa3-fp8 attention, eager, then + compile + CUDA graphs), then diffusers' FluxTransformer2DModel bf16 on the
same weights (dit_rt's, under checkpoint key names, loaded strictly). CUDA-event medians after warm-up, peak
memory of each side from a clean allocator, achieved TFLOP/s from `FluxTransformer.flops`. Errors: exact
against diffusers bf16; with `--fp32-ref` also both against diffusers float32 (TF32 off) on the same
weights, which says whether a gap is dit_rt's or bf16's. Fast variants are compared with the exact output.
`--vae`: the decode of a 1024^2 latent [1, 16, 128, 128], dit_rt FluxVAE against diffusers' AutoencoderKL.
`--tiny --device cpu`: tiny configurations, float32, sdpa, a couple of iterations (wall-clock timing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling tools when imported by the tests

import bench_wan  # noqa: E402
from bench_e2e import FLUX_TRANSFORMER, FLUX_VAE  # noqa: E402
from bench_wan import parse_fast, randomize_, rel  # noqa: E402

TINY_TRANSFORMER = dict(
    FLUX_TRANSFORMER,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    axes_dims_rope=[4, 6, 6],
)
TINY_VAE = dict(FLUX_VAE, block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4)
FAST = "fp8-per-tensor+fa3-fp8,fp8-per-tensor+fa3-fp8+compile+graphs"
GUIDANCE = 3.5


# ---------------------------------------------------------------------------------------------- helpers


def timed(fn, warmup: int, iters: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """bench_wan's CUDA-event median (ms) on the GPU; a wall-clock median elsewhere."""
    if device.type == "cuda":
        return bench_wan.timed(fn, warmup, iters)
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def fresh(device: torch.device) -> None:
    if device.type == "cuda":
        bench_wan.fresh()
    else:
        import gc

        gc.collect()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def built(factory, dtype: torch.dtype, device: torch.device):
    """factory() constructed straight on `device` in `dtype` (no float32 copy of a 12B model first)."""
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return factory().eval()
    finally:
        torch.set_default_dtype(torch.float32)


def _gib(x) -> str:
    return "-" if x is None else f"{x:.1f}"


# ---------------------------------------------------------------------------------------------- transformer


def bench_transformer(
    a: argparse.Namespace, device: torch.device, dtype: torch.dtype, variants: list[str]
) -> dict:
    from diffusers import FluxTransformer2DModel

    from dit_rt.demo import checkpoint_state
    from dit_rt.models.flux import FluxTransformer, FluxTransformerConfig
    from dit_rt.ops import quantize_
    from dit_rt.ops.attention import set_attention
    from dit_rt.pipelines.flux import image_ids

    config = dict(TINY_TRANSFORMER if a.tiny else FLUX_TRANSFORMER)
    cfg = FluxTransformerConfig.from_config(config)
    rows, cols = a.height // 16, a.width // 16
    li, lt = rows * cols, a.text_len
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(1, li, cfg.in_channels, generator=g, device=device).to(dtype)
    ctx = torch.randn(1, lt, cfg.joint_attention_dim, generator=g, device=device).to(dtype)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g, device=device).to(dtype)
    t = torch.tensor([1.0], device=device, dtype=dtype)  # sigma of the first step: timestep / 1000
    img_ids = image_ids(rows, cols, device, dtype)
    txt_ids = torch.zeros(lt, 3, device=device, dtype=dtype)
    guidance = torch.full((1,), GUIDANCE, device=device) if cfg.guidance_embeds else None
    kw = dict(
        hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
        img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
    )  # fmt: skip

    def build(attention: str) -> FluxTransformer:
        """Same random weights every time (fixed seed)."""
        model = built(lambda: FluxTransformer(cfg), dtype, device)
        randomize_(model, 0)
        set_attention(model, attention, device=device, dtype=dtype)
        return model

    fresh(device)
    ours = build(a.attention)
    weights = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    reset_peak(device)  # the peaks below: weights + one forward's activations
    flops = ours.flops(li, lt)
    with torch.no_grad():
        ms, out = timed(lambda: ours(**kw), a.warmup, a.iters, device)
    ours_peak = peak_gib(device)
    if a.profile and device.type == "cuda":
        with torch.no_grad():
            bench_wan.profile(lambda: ours(**kw), f"flux exact ({a.attention})")
    out_ours = out.float().cpu()
    state = {k: v.cpu() for k, v in checkpoint_state(ours).items()}
    ours = out = None

    def variant(spec: str) -> dict:
        from dit_rt.ops.linear import cublaslt

        cublaslt.set_enabled("gelu-pass" not in parse_fast(spec)[3])
        try:
            return timed_variant(spec)
        finally:
            cublaslt.set_enabled(True)

    def timed_variant(spec: str) -> dict:
        linear, layers, attention, flags = parse_fast(spec)
        fresh(device)
        model = build(attention)
        if linear != "bf16":  # every dit_rt Linear, as the pipeline's linear= converts them
            quantize_(model, linear, filter=(lambda n, m: any(p in n for p in layers)) if layers else None)
        if "compile" in flags:  # compiled at the first (warm-up) call
            from dit_rt.compile import apply_compile

            apply_compile(model, cuda_graphs="graphs" in flags)
        elif "graphs" in flags:
            from dit_rt.graphs import apply_cuda_graphs

            apply_cuda_graphs(model)
        reset_peak(device)
        with torch.no_grad():
            v_ms, v_out = timed(lambda: model(**kw), a.warmup, a.iters, device)
            if a.profile and device.type == "cuda":
                bench_wan.profile(lambda: model(**kw), f"flux fast {spec}")
        row = dict(
            spec=spec,
            ms=v_ms,
            ratio_to_exact=v_ms / ms,
            tflops=flops / v_ms / 1e9,
            peak_gib=peak_gib(device),
            rel_err_vs_exact=rel(v_out.float().cpu(), out_ours),
        )
        print(json.dumps(row), flush=True)
        return row

    fast = []
    for spec in variants:
        try:
            fast.append(variant(spec))
        except Exception as e:  # one failing variant must not hide the others
            traceback.print_exc()
            fast.append(dict(spec=spec, error=f"{type(e).__name__}: {e}"))
            print(json.dumps(fast[-1]), flush=True)
    fresh(device)

    ref = built(lambda: FluxTransformer2DModel(**config), dtype, device)
    ref.load_state_dict(state, strict=True)
    reset_peak(device)
    with torch.no_grad():
        ref_ms, ref_out = timed(lambda: ref(**kw, return_dict=False)[0], a.warmup, a.iters, device)
    ref_peak = peak_gib(device)
    out_ref = ref_out.float().cpu()
    ref = ref_out = None
    fresh(device)
    row = dict(
        model="flux.1-dev" + ("-tiny" if a.tiny else ""),
        size=f"{a.height}x{a.width}",
        tokens=f"{li}+{lt}",
        attention=a.attention,
        dtype=str(dtype).removeprefix("torch."),
        ms=ms,
        diffusers_ms=ref_ms,
        ratio=ms / ref_ms,
        tflops=flops / ms / 1e9,
        diffusers_tflops=flops / ref_ms / 1e9,
        gflop=flops / 1e9,
        peak_gib=ours_peak,
        diffusers_peak_gib=ref_peak,
        weights_gib=weights,
        rel_err_vs_diffusers=rel(out_ours, out_ref),
        fast=fast,
    )
    if a.fp32_ref:  # diffusers float32 on the same weights (the bf16 values upcast), TF32 off
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            ref = built(lambda: FluxTransformer2DModel(**config), torch.float32, device)
            ref.load_state_dict(state, strict=True)
            kw32 = {k: v.float() if v is not None and v.is_floating_point() else v for k, v in kw.items()}
            with torch.no_grad():
                out32 = ref(**kw32, return_dict=False)[0].float().cpu()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        ref = None
        fresh(device)
        row["rel_err_vs_fp32"] = rel(out_ours, out32)
        row["diffusers_rel_err_vs_fp32"] = rel(out_ref, out32)
    return row


# ---------------------------------------------------------------------------------------------- VAE


def bench_vae(a: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    from diffusers import AutoencoderKL

    from dit_rt.models.flux import FluxVAE, FluxVAEConfig

    config = dict(TINY_VAE if a.tiny else FLUX_VAE)
    h, w = a.height // 8, a.width // 8
    z = torch.randn(1, 16, h, w, generator=torch.Generator(device).manual_seed(2), device=device).to(dtype)
    fresh(device)
    ours = built(lambda: FluxVAE(FluxVAEConfig.from_config(config)), dtype, device)
    randomize_(ours, 0)
    reset_peak(device)  # the peaks below: weights + one decode's activations
    with torch.no_grad():
        ms, out = timed(lambda: ours.decode(z), a.warmup, a.iters, device)
        if a.profile and device.type == "cuda":
            bench_wan.profile(lambda: ours.decode(z), "flux vae decode")
    peak = peak_gib(device)
    flops = ours.decode_flops(tuple(z.shape))
    out_ours = out.float().cpu()
    state = {k: v.cpu() for k, v in ours.state_dict().items()}
    ours = out = None
    fresh(device)
    ref = built(lambda: AutoencoderKL(**config), dtype, device)
    ref.load_state_dict(state, strict=True)
    reset_peak(device)
    with torch.no_grad():
        ref_ms, ref_out = timed(lambda: ref.decode(z, return_dict=False)[0], a.warmup, a.iters, device)
        if a.profile and device.type == "cuda":
            bench_wan.profile(lambda: ref.decode(z, return_dict=False)[0], "diffusers vae decode")
    ref_peak = peak_gib(device)
    out_ref = ref_out.float().cpu()
    err = rel(out_ours, out_ref)
    ref = ref_out = None
    fresh(device)
    fp32 = {}
    if a.fp32_ref:  # diffusers float32 (cuDNN / matmul TF32 off) on the same weights and latent
        flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            ref = built(lambda: AutoencoderKL(**config), torch.float32, device)
            ref.load_state_dict(state, strict=True)
            with torch.no_grad():
                out32 = ref.decode(z.float(), return_dict=False)[0].float().cpu()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
        ref = None
        fresh(device)
        fp32 = dict(rel_err_vs_fp32=rel(out_ours, out32), diffusers_rel_err_vs_fp32=rel(out_ref, out32))
    return dict(
        model=f"vae-decode-{str(dtype).removeprefix('torch.')}",
        latent=f"16x{h}x{w}",
        ms=ms,
        diffusers_ms=ref_ms,
        ratio=ms / ref_ms,
        tflops=flops / ms / 1e9,
        peak_gib=peak,
        diffusers_peak_gib=ref_peak,
        rel_err_vs_diffusers=err,
        **fp32,
    )


# ---------------------------------------------------------------------------------------------- main


def table(rows: list[dict], device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{name} torch {torch.__version__}")
    print("| case | dit_rt ms | diffusers ms | ratio | TFLOP/s | peak GiB (dit_rt / diffusers) | rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | error: {r['error'][:100]} |")
            continue
        err = f"{r['rel_err_vs_diffusers']:.1e}"
        if "rel_err_vs_fp32" in r:
            ours, theirs = r["rel_err_vs_fp32"], r["diffusers_rel_err_vs_fp32"]
            err += f" (vs fp32: dit_rt {ours:.1e}, diffusers {theirs:.1e})"
        peaks = f"{_gib(r['peak_gib'])} / {_gib(r['diffusers_peak_gib'])}"
        print(
            f"| {r['model']} {r.get('size', r.get('latent'))} | {r['ms']:.1f} | {r['diffusers_ms']:.1f} "
            f"| {r['ratio']:.2f} | {r['tflops']:.0f} | {peaks} | {err} |"
        )
        for v in r.get("fast", []):
            if "error" in v:
                print(f"| {r['model']} fast {v['spec']} | error: {v['error'][:100]} |")
                continue
            print(
                f"| {r['model']} fast {v['spec']} | {v['ms']:.1f} | {r['diffusers_ms']:.1f} "
                f"| {v['ms'] / r['diffusers_ms']:.2f} | {v['tflops']:.0f} | {_gib(v['peak_gib'])} / - "
                f"| {v['rel_err_vs_exact']:.1e} vs exact |"
            )


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny configurations, float32 (CPU smoke test)")
    p.add_argument("--height", type=int, help="image height (default 1024; tiny 64)")
    p.add_argument("--width", type=int, help="image width (default 1024; tiny 96)")
    p.add_argument("--text-len", type=int, default=512, help="T5 tokens (FluxPipeline pads to 512)")
    p.add_argument("--attention", help="dit_rt exact attention (default fa3 on CUDA, sdpa elsewhere)")
    p.add_argument(
        "--fast",
        help="comma-separated fast variants LINEAR[@LAYER/...]+ATTENTION[+compile][+graphs][+gelu-pass] "
        f"(bench_wan's syntax; default on CUDA: {FAST}; none elsewhere; '' for none)",
    )
    p.add_argument("--fp32-ref", action="store_true", help="also the error of both sides vs diffusers fp32")
    p.add_argument("--vae", action="store_true", help="also the VAE decode of a latent of this size")
    p.add_argument("--no-transformer", action="store_true", help="skip the transformer (e.g. --vae only)")
    p.add_argument("--profile", action="store_true", help="print dit_rt's kernels by GPU time per mode")
    p.add_argument("--warmup", type=int, help="default 2 (tiny 1)")
    p.add_argument("--iters", type=int, help="default 5 (tiny 2)")
    p.add_argument("--out", help="write the rows as JSON here")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    dtype = torch.float32 if a.tiny and not cuda else torch.bfloat16
    a.height = a.height or (64 if a.tiny else 1024)
    a.width = a.width or (96 if a.tiny else 1024)
    if a.height % 16 or a.width % 16:
        raise SystemExit(f"--height / --width must be multiples of 16 (VAE 8 x 2x2 packing); got {a.height}")
    a.attention = a.attention or ("fa3" if cuda else "sdpa")
    a.warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 2)
    a.iters = a.iters if a.iters is not None else (2 if a.tiny else 5)
    variants = [s for s in (a.fast if a.fast is not None else FAST if cuda else "").split(",") if s]
    for spec in variants:
        try:
            parse_fast(spec)
        except ValueError as e:
            raise SystemExit(f"--fast: {e}") from None

    rows = []
    if not a.no_transformer:
        t0 = time.time()
        try:
            rows.append(bench_transformer(a, device, dtype, variants))
        except Exception as e:  # the VAE row still comes
            traceback.print_exc()
            rows.append(dict(model="flux.1-dev transformer", error=f"{type(e).__name__}: {e}"))
        print(json.dumps(rows[-1]), f"({time.time() - t0:.0f}s)", flush=True)
    if a.vae:
        try:
            rows.append(bench_vae(a, device, dtype))
        except Exception as e:
            traceback.print_exc()
            rows.append(dict(model="vae", error=f"{type(e).__name__}: {e}"))
        print(json.dumps(rows[-1]), flush=True)
    table(rows, device)
    if a.out:
        env = dict(
            device=torch.cuda.get_device_name(device) if cuda else "cpu",
            torch=torch.__version__,
            date=time.strftime("%Y-%m-%d"),
        )
        Path(a.out).write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
