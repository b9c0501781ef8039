"""Real-size Wan transformer forward and VAE decode: dit_rt next to diffusers in the same run, same weights.

    python tools/bench_wan.py --models 1.3b,14b --vae --out /tmp/wan.json

Random bf16 weights (built on the GPU), one forward at the model's published resolution (1.3B: 480x832x81,
14B: 720x1280x81), CUDA-event medians after warm-up, peak memory of each side measured from a clean
allocator. The two sides run one after the other so a 14B pair fits one 80 GB card.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from dit_rt.demo import checkpoint_state
from dit_rt.pipeline import guide


def _hub_config(preset: str) -> dict:
    """A catalog preset as the Hub `transformer/config.json` keys (what both sides are built from)."""
    import dataclasses

    from dit_rt.models.wan import WAN_TRANSFORMER_PRESETS

    config = dataclasses.asdict(WAN_TRANSFORMER_PRESETS[preset])
    config.pop("dim")  # derived, not a config key
    return config


MODELS = {
    "1.3b": (_hub_config("wan2.1-t2v-1.3b"), (480, 832, 81)),
    "14b": (_hub_config("wan2.1-t2v-14b"), (720, 1280, 81)),
    "i2v-14b": (_hub_config("wan2.1-i2v-14b"), (480, 832, 81)),
}
VAE = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
)


def timed(fn, warmup: int, iters: int) -> tuple[float, torch.Tensor]:
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), out


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights with realistic scales, never zeros: the scales of normalization modules (any class whose name
    holds "Norm": LayerNorm, GroupNorm, RMSNorm and the families' own) 1, other vectors N(0, 0.02), matrices
    and convolutions N(0, 1/fan_in). Decided by module type, not by name: adaLN modulation layers
    (`norm1.linear`) are ordinary Linears and stay random. The same seed gives the same values anywhere."""
    g = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = "Norm" in type(module).__name__ or "norm" in type(module).__name__
            for name, p in module.named_parameters(recurse=False):
                if is_norm and name in ("weight", "gamma", "scale"):
                    p.fill_(1.0)
                elif p.ndim == 1:
                    p.normal_(0, 0.02, generator=g)
                else:
                    p.normal_(0, p[0].numel() ** -0.5, generator=g)
    return model


def fresh():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def profile(fn, label: str, rows: int = 25) -> None:
    """Print the CUDA kernels of one call of fn, by total GPU time (where a forward's time goes)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"--- {label}: kernels by GPU time", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=90))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def parse_fast(spec: str) -> tuple[str, tuple[str, ...], str, tuple[str, ...]]:
    """A fast-mode variant "LINEAR[@LAYER/LAYER...]+ATTENTION[+compile][+graphs][+gelu-pass]" -> (format,
    layer name parts, attention, runtime flags).

    LINEAR is a linear format or "bf16" (none); LAYERs restrict it to block linears whose names contain one
    of them (e.g. "ffn/to_qkv"); ATTENTION defaults to fa3-fp8; "compile" applies per-block torch.compile,
    "graphs" CUDA graphs of the block loop, "gelu-pass" the FFN's separate GELU-cast pass instead of the up
    GEMM's cuBLASLt epilogue (an A/B switch). "fp8-per-tensor" = every block linear, fa3-fp8, eager.
    """
    linear, _, rest = spec.partition("+")
    linear, _, layers = linear.partition("@")
    attention, *flags = rest.split("+") if rest else [""]
    unknown = set(flags) - {"compile", "graphs", "gelu-pass"}
    if unknown:
        raise ValueError(
            f"fast variant {spec!r}: unknown flags {sorted(unknown)}; use +compile / +graphs / +gelu-pass"
        )
    return linear, tuple(filter(None, layers.split("/"))), attention or "fa3-fp8", tuple(flags)


def bench_transformer(
    name: str,
    attention: str,
    warmup: int,
    iters: int,
    variants: list[str] = (),
    cfg_step: bool = False,
    show_profile: bool = False,
) -> dict:
    from diffusers import WanTransformer3DModel

    from dit_rt.models.wan import WanTransformer, WanTransformerConfig
    from dit_rt.ops import quantize_
    from dit_rt.ops.attention import set_attention

    config, (h, w, f) = MODELS[name]
    dev, dt = torch.device("cuda"), torch.bfloat16
    lat = (1, config["in_channels"], (f - 1) // 4 + 1, h // 8, w // 8)
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(lat, generator=g, device=dev).to(dt)
    t = torch.tensor([999], device=dev)
    ctx = torch.randn(1, 512, 4096, generator=g, device=dev).to(dt)
    img = torch.randn(1, 257, 1280, generator=g, device=dev).to(dt) if config["image_dim"] else None

    def build(attn: str) -> WanTransformer:
        """Same random weights every time (fixed seed); bf16, keep_fp32 parameters in fp32 as loaded."""
        torch.set_default_dtype(dt)
        try:
            with torch.device(dev):
                model = WanTransformer(WanTransformerConfig.from_config(config)).eval()
        finally:
            torch.set_default_dtype(torch.float32)
        for pname, p in model.named_parameters():
            if any(k in pname for k in model.keep_fp32):
                p.data = p.data.float()
        randomize_(model)
        set_attention(model, attn, device=dev, dtype=dt)
        return model

    fresh()
    ours = build(attention)
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()  # peaks below: weights + one forward's activations
    tokens = lat[2] * (lat[3] // 2) * (lat[4] // 2)
    flops = ours.flops(lat[2], lat[3], lat[4], text_len=512, image_tokens=257 if img is not None else 0)

    def run():
        return ours(x, t, ctx, img) if img is not None else ours(x, t, ctx)

    with torch.no_grad():
        ms, out = timed(run, warmup, iters)
    ours_peak = torch.cuda.max_memory_allocated()
    if show_profile:
        with torch.no_grad():
            profile(run, f"{name} exact ({attention})")
    out_ours = out.float().cpu()
    state = {k: v.cpu() for k, v in checkpoint_state(ours).items()}
    ours = out = None

    def fast_variant(spec: str, with_step: bool) -> dict:
        from dit_rt.ops.linear import cublaslt

        cublaslt.set_enabled("gelu-pass" not in parse_fast(spec)[3])
        try:
            return timed_variant(spec, with_step)
        finally:
            cublaslt.set_enabled(True)

    def timed_variant(spec: str, with_step: bool) -> dict:
        linear, layers, fast_attention, flags = parse_fast(spec)
        fresh()
        model = build(fast_attention)
        if linear != "bf16":
            quantize_(
                model.blocks, linear, filter=(lambda n, m: any(p in n for p in layers)) if layers else None
            )
        if "compile" in flags:  # compiled at the first (warm-up) call
            from dit_rt.compile import apply_compile

            apply_compile(model, cuda_graphs="graphs" in flags)
        elif "graphs" in flags:
            from dit_rt.graphs import apply_cuda_graphs

            apply_cuda_graphs(model)

        def forward(c=ctx):
            return model(x, t, c, img) if img is not None else model(x, t, c)

        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            fast_ms, fast_out = timed(forward, warmup, iters)
            if show_profile:
                profile(forward, f"{name} fast {spec}")
        row = dict(
            spec=spec,
            ms=fast_ms,
            ratio_to_exact=fast_ms / ms,
            peak_gib=torch.cuda.max_memory_allocated() / 2**30,
            rel_err_vs_exact=rel(fast_out.float().cpu(), out_ours),
        )
        fast_out = None
        if with_step:  # one full denoising step with guidance: two forwards + the guided combination
            uncond = ctx.flip(1)  # a different context of the same shape stands in for the negative prompt
            with torch.no_grad():
                row["cfg_step_ms"], _ = timed(lambda: guide(forward(uncond), forward(), 5.0), 1, iters)
        print(json.dumps(row), flush=True)
        return row

    fast = [fast_variant(spec, cfg_step) for spec in variants]
    ours = out = None
    fresh()

    torch.set_default_dtype(dt)  # build the reference straight in bf16 on the GPU, then copy our weights in
    try:
        with torch.device(dev):
            ref = WanTransformer3DModel(**config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    ref.load_state_dict(state, strict=True)
    del state
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        kw = dict(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)
        if img is not None:
            kw["encoder_hidden_states_image"] = img
        ref_ms, ref_out = timed(lambda: ref(**kw)[0], warmup, iters)
    ref_peak = torch.cuda.max_memory_allocated()
    err = rel(out_ours, ref_out.float().cpu())
    ref = ref_out = None
    fresh()
    return dict(
        model=name,
        tokens=tokens,
        attention=attention,
        ms=ms,
        diffusers_ms=ref_ms,
        ratio=ms / ref_ms,
        tflops=flops / ms / 1e9,
        peak_gib=ours_peak / 2**30,
        diffusers_peak_gib=ref_peak / 2**30,
        weights_gib=weights / 2**30,
        rel_err_vs_diffusers=err,
        fast=fast,
    )


def bench_vae(warmup: int, iters: int, dtype: torch.dtype) -> dict:
    from diffusers import AutoencoderKLWan

    from dit_rt.models.wan import WanVAE, WanVAEConfig

    dev = torch.device("cuda")
    z = torch.randn(1, 16, 21, 60, 104, generator=torch.Generator("cuda").manual_seed(2), device=dev).to(
        dtype
    )
    fresh()
    torch.set_default_dtype(dtype)  # build in the timed dtype: the peak below is weights + one decode
    try:
        with torch.device(dev):
            ours = WanVAE(WanVAEConfig.from_config(VAE)).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    randomize_(ours)
    torch.cuda.reset_peak_memory_stats()  # peaks below: weights + one decode's activations
    with torch.no_grad():
        ms, out = timed(lambda: ours.decode(z), warmup, iters)
    peak = torch.cuda.max_memory_allocated()
    out_ours = out.float().cpu()
    state = {k: v.cpu() for k, v in ours.state_dict().items()}
    ours = out = None
    fresh()
    ref = AutoencoderKLWan(**VAE)
    ref.load_state_dict(state, strict=True)
    ref = ref.to(dev, dtype).eval()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        ref_ms, ref_out = timed(lambda: ref.decode(z, return_dict=False)[0], warmup, iters)
    ref_peak = torch.cuda.max_memory_allocated()
    err = rel(out_ours, ref_out.float().cpu())
    ref = ref_out = None
    fresh()
    return dict(
        model=f"vae-decode-{str(dtype).split('.')[-1]}",
        latent="16x21x60x104",
        ms=ms,
        diffusers_ms=ref_ms,
        ratio=ms / ref_ms,
        peak_gib=peak / 2**30,
        diffusers_peak_gib=ref_peak / 2**30,
        rel_err_vs_diffusers=err,
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="1.3b,14b")
    p.add_argument("--attention", default="sdpa")
    p.add_argument("--vae", action="store_true")
    p.add_argument("--fast-linear", help="also time the fast mode: this linear format + fa3-fp8 attention")
    p.add_argument(
        "--fast",
        default="",
        help="comma-separated fast variants LINEAR[@LAYER/...]+ATTENTION[+compile][+graphs][+gelu-pass], "
        "e.g. fp8-rowwise@ffn+fa3-fp8 or fp8-per-tensor+fa3-fp8+compile",
    )
    p.add_argument("--cfg-step", action="store_true", help="also time a full guided step per fast variant")
    p.add_argument("--profile", action="store_true", help="print dit_rt's kernels by GPU time per mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out")
    a = p.parse_args()
    variants = [f"{a.fast_linear}+fa3-fp8"] if a.fast_linear else []
    variants += list(filter(None, a.fast.split(",")))
    rows = []
    for name in filter(None, a.models.split(",")):
        t0 = time.time()
        try:
            rows.append(
                bench_transformer(name, a.attention, a.warmup, a.iters, variants, a.cfg_step, a.profile)
            )
        except Exception as e:  # one failing case must not hide the others
            rows.append(dict(model=name, error=f"{type(e).__name__}: {e}"))
        print(json.dumps(rows[-1]), f"({time.time() - t0:.0f}s)", flush=True)
    if a.vae:
        try:
            rows.append(bench_vae(a.warmup, a.iters, torch.bfloat16))
        except Exception as e:
            rows.append(dict(model="vae", error=f"{type(e).__name__}: {e}"))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__}")
    print("| case | dit_rt ms | diffusers ms | ratio | TFLOP/s | peak GiB (dit_rt / diffusers) | rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | error: {r['error'][:80]} |")
            continue
        tf = f"{r['tflops']:.0f}" if "tflops" in r else "-"
        print(
            f"| {r['model']} | {r['ms']:.0f} | {r['diffusers_ms']:.0f} | {r['ratio']:.2f} | {tf} | "
            f"{r['peak_gib']:.1f} / {r['diffusers_peak_gib']:.1f} | {r['rel_err_vs_diffusers']:.1e} |"
        )
        for v in r.get("fast", []):
            step = f" (guided step {v['cfg_step_ms']:.0f} ms)" if "cfg_step_ms" in v else ""
            print(
                f"| {r['model']} fast {v['spec']}{step} | {v['ms']:.0f} | {r['diffusers_ms']:.0f} "
                f"| {v['ms'] / r['diffusers_ms']:.2f} | - | {v['peak_gib']:.1f} / - "
                f"| {v['rel_err_vs_exact']:.1e} vs exact |"
            )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
