"""Real-size FLUX.1-dev / FLUX.2-dev transformer forward and VAE decode: dit_rt next to diffusers in the
same run, same random weights.

    python tools/bench_flux.py --vae --fp32-ref --out /tmp/flux.json                      # H200, one call
    python tools/bench_flux.py --model flux.2-dev --vae --out /tmp/flux2.json             # H200, one call
    python tools/bench_flux.py --tiny --device cpu [--model flux.2-dev]                   # CPU smoke test

One transformer forward at 1024x1024 (4096 image tokens + 512 text tokens, batch 1, embedded guidance 3.5
for FLUX.1, 4.0 for FLUX.2): dit_rt exact (`--attention`, fa3 by default) and its fast variants (`--fast`:
fp8-per-tensor linears + fa3-fp8 attention, eager, then + compile + CUDA graphs), then diffusers'
FluxTransformer2DModel / Flux2Transformer2DModel bf16 on the same weights (dit_rt's, under checkpoint key
names, loaded strictly). The reference is built on `meta` and takes those tensors with `assign=True`, and
dit_rt's model is freed before: FLUX.2 is 32B parameters (64 GB in bf16), and two copies would leave an
H200 almost no room. CUDA-event medians after warm-up, peak memory of each side from a clean allocator,
achieved TFLOP/s from the model's `flops`. Errors: exact against diffusers bf16; with `--fp32-ref` also both
against diffusers float32 (TF32 off) on the same weights, which says whether a gap is dit_rt's or bf16's
(FLUX.2's float32 copy is 129 GB: it fits an H200 only). Fast variants are compared with the exact output.
`--vae`: the decode of a 1024^2 latent (FLUX.1 [1, 16, 128, 128] against diffusers' AutoencoderKL, FLUX.2
[1, 32, 128, 128] against AutoencoderKLFlux2). `--tiny --device cpu`: tiny configurations, float32, sdpa,
a couple of iterations (wall-clock timing).

The comparison itself (`compare_transformer`, `compare_decoder`, `table`) is model-neutral;
tools/bench_cosmos.py runs the Cosmos models through it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling tools when imported by the tests

import bench_wan  # noqa: E402
from bench_e2e import FLUX_TRANSFORMER, FLUX_VAE  # noqa: E402
from bench_wan import parse_fast, randomize_, rel  # noqa: E402


def _flux2_config() -> dict:
    """The flux.2-dev preset as Hub `transformer/config.json` keys (spec flux-encoders-schedulers.md B.2)."""
    from dit_rt.models.flux import FLUX2_TRANSFORMER_PRESETS

    config = dataclasses.asdict(FLUX2_TRANSFORMER_PRESETS["flux.2-dev"])
    for derived in ("dim", "mlp_dim"):
        config.pop(derived)
    return config


FLUX2_TRANSFORMER = _flux2_config()
FLUX2_VAE = dict(  # AutoencoderKLFlux2 vae/config.json (spec B.5)
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=32,
    norm_num_groups=32,
    act_fn="silu",
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
    batch_norm_eps=1e-4,
    patch_size=[2, 2],
)
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
TINY_FLUX2 = dict(
    FLUX2_TRANSFORMER,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=48,
    timestep_guidance_channels=32,
    axes_dims_rope=(4, 4, 4, 4),
)
TINY_VAE = dict(FLUX_VAE, block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4)
TINY_FLUX2_VAE = dict(FLUX2_VAE, block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4)
FAST = "fp8-per-tensor+fa3-fp8,fp8-per-tensor+fa3-fp8+compile+graphs"
GUIDANCE = {"flux.1-dev": 3.5, "flux.2-dev": 4.0}  # each pipeline's default embedded guidance


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
    """factory() constructed straight on `device` (or `meta`) in `dtype` (no float32 copy of a 32B model)."""
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return factory().eval()
    finally:
        torch.set_default_dtype(torch.float32)


def _gib(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def _upcast(kw: dict) -> dict:
    return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}


# ---------------------------------------------------------------------------------------------- transformer


@dataclass
class Case:
    """One transformer forward to compare: both sides are built from `config` (the diffusers kwargs) and
    called with the same keyword arguments."""

    model: str  # row label
    size: str
    tokens: str
    config: dict
    ours: Callable[[dict], nn.Module]  # config -> dit_rt module (weights filled by the bench)
    reference: Callable[..., nn.Module]  # the diffusers class, called with **config
    kwargs: dict  # forward inputs on the device, model dtype
    flops: Callable[[nn.Module], int]  # FLOPs of one forward, from dit_rt's model


def compare_transformer(
    a: argparse.Namespace, device: torch.device, dtype: torch.dtype, variants: list[str], case: Case
) -> dict:
    """dit_rt exact, then each fast variant, then diffusers (bf16, and float32 with `a.fp32_ref`) on the same
    random weights; one model on the device at a time."""
    from dit_rt.demo import checkpoint_state
    from dit_rt.ops import quantize_
    from dit_rt.ops.attention import set_attention

    kw = case.kwargs

    def build(attention: str) -> nn.Module:
        """Same random weights every time (fixed seed); keep_fp32 parameters in fp32, as loaded."""
        model = built(lambda: case.ours(case.config), dtype, device)
        keep = getattr(model, "keep_fp32", ())
        for name, p in model.named_parameters():
            if any(k in name for k in keep):
                p.data = p.data.float()
        randomize_(model, 0)
        set_attention(model, attention, device=device, dtype=dtype)
        return model

    fresh(device)
    ours = build(a.attention)
    weights = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    reset_peak(device)  # the peaks below: weights + one forward's activations
    flops = case.flops(ours)
    with torch.no_grad():
        ms, out = timed(lambda: ours(**kw), a.warmup, a.iters, device)
    ours_peak = peak_gib(device)
    if a.profile and device.type == "cuda":
        with torch.no_grad():
            bench_wan.profile(lambda: ours(**kw), f"{case.model} exact ({a.attention})")
    out_ours = out.float().cpu()
    ours = out = None

    def variant(spec: str) -> dict:
        from dit_rt.ops.linear import cublaslt

        flags = parse_fast(spec)[3]
        cublaslt.set_enabled("gelu-pass" not in flags)
        try:
            return timed_variant(spec)
        finally:
            cublaslt.set_enabled(True)
            if "compile" in flags:  # dynamo's caches must not keep the compiled model's weights alive
                torch._dynamo.reset()

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
                bench_wan.profile(lambda: model(**kw), f"{case.model} fast {spec}")
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

    # The reference takes the exact model's tensors under checkpoint names (fused projections split back);
    # the model itself is dropped first, so only one copy of the weights is ever on the device.
    model = build(a.attention)
    state = checkpoint_state(model)
    model = None
    fresh(device)  # the fused projections' storage goes with the model; their split copies stay in state
    ref = built(lambda: case.reference(**case.config), dtype, torch.device("meta"))
    ref.load_state_dict(state, strict=True, assign=True)
    state = None
    reset_peak(device)
    with torch.no_grad():
        ref_ms, ref_out = timed(lambda: ref(**kw, return_dict=False)[0], a.warmup, a.iters, device)
    ref_peak = peak_gib(device)
    out_ref = ref_out.float().cpu()
    ref_out = None
    row = dict(
        model=case.model + ("-tiny" if a.tiny else ""),
        size=case.size,
        tokens=case.tokens,
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
        state = ref.state_dict()
        ref = None
        fresh(device)
        try:
            out32 = reference_fp32(state, case, device)
            row["rel_err_vs_fp32"] = rel(out_ours, out32)
            row["diffusers_rel_err_vs_fp32"] = rel(out_ref, out32)
        except Exception as e:  # e.g. out of memory: the timings above still count
            traceback.print_exc()
            row["fp32_error"] = f"{type(e).__name__}: {e}"
    ref = None
    fresh(device)
    return row


def reference_fp32(state: dict[str, torch.Tensor], case: Case, device: torch.device) -> torch.Tensor:
    """diffusers' float32 output (CPU) on the weights `state` upcast. `state` is emptied as its float32 copy
    is made, so each bf16 tensor is released as soon as it is upcast (FLUX.2: 64 GB in, 129 GB out)."""
    state = {k: state.pop(k).float() for k in list(state)}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref32 = built(lambda: case.reference(**case.config), torch.float32, torch.device("meta"))
        ref32.load_state_dict(state, strict=True, assign=True)
        state = None
        with torch.no_grad():
            return ref32(**_upcast(case.kwargs), return_dict=False)[0].float().cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def flux_case(a: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Case:
    """FLUX.1-dev or FLUX.2-dev at a.height x a.width: the first step's inputs as each pipeline builds them
    (sigma 1, the default embedded guidance, position ids of the packed latent grid and of the text)."""
    rows, cols = a.height // 16, a.width // 16
    li, lt = rows * cols, a.text_len
    g = torch.Generator(device).manual_seed(1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g, device=device).to(dtype)

    t = torch.tensor([1.0], device=device, dtype=dtype)  # sigma of the first step: timestep / 1000
    guidance = torch.full((1,), GUIDANCE[a.model], device=device)
    if a.model == "flux.1-dev":
        from diffusers import FluxTransformer2DModel

        from dit_rt.models.flux import FluxTransformer, FluxTransformerConfig
        from dit_rt.pipelines.flux import image_ids

        config = dict(TINY_TRANSFORMER if a.tiny else FLUX_TRANSFORMER)
        cfg = FluxTransformerConfig.from_config(config)
        kw = dict(
            hidden_states=rand(1, li, cfg.in_channels),
            encoder_hidden_states=rand(1, lt, cfg.joint_attention_dim),
            pooled_projections=rand(1, cfg.pooled_projection_dim),
            timestep=t,
            img_ids=image_ids(rows, cols, device, dtype),
            txt_ids=torch.zeros(lt, 3, device=device, dtype=dtype),
            guidance=guidance if cfg.guidance_embeds else None,
        )
        return Case(
            "flux.1-dev", f"{a.height}x{a.width}", f"{li}+{lt}", config,
            lambda c: FluxTransformer(FluxTransformerConfig.from_config(c)), FluxTransformer2DModel, kw,
            lambda m: m.flops(li, lt),
        )  # fmt: skip
    from diffusers import Flux2Transformer2DModel

    from dit_rt.models.flux import Flux2Transformer, Flux2TransformerConfig

    config = dict(TINY_FLUX2 if a.tiny else FLUX2_TRANSFORMER)
    cfg = Flux2TransformerConfig.from_config(config)
    img_ids = torch.zeros(rows, cols, 4, device=device, dtype=dtype)  # (t, row, col, l) = (0, r, c, 0)
    img_ids[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None]
    img_ids[..., 2] = torch.arange(cols, device=device, dtype=dtype)[None, :]
    txt_ids = torch.zeros(lt, 4, device=device, dtype=dtype)  # (0, 0, 0, l)
    txt_ids[:, 3] = torch.arange(lt, device=device, dtype=dtype)
    kw = dict(
        hidden_states=rand(1, li, cfg.in_channels),
        encoder_hidden_states=rand(1, lt, cfg.joint_attention_dim),
        timestep=t,
        img_ids=img_ids.reshape(-1, 4),
        txt_ids=txt_ids,
        guidance=guidance if cfg.guidance_embeds else None,
    )
    return Case(
        "flux.2-dev", f"{a.height}x{a.width}", f"{li}+{lt}", config,
        lambda c: Flux2Transformer(Flux2TransformerConfig.from_config(c)), Flux2Transformer2DModel, kw,
        lambda m: m.flops(li, lt),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- VAE


@dataclass
class Decoder:
    """One VAE decode to compare: dit_rt's `ours()` against diffusers' `reference()` (loaded strictly from
    ours' state dict), both called as `.decode(z)`."""

    model: str  # row label
    latent: tuple[int, ...]  # [B, Z, (T,) h, w]
    ours: Callable[[], nn.Module]
    reference: Callable[[], nn.Module]
    flops: bool = True  # dit_rt's model has decode_flops


def compare_decoder(a: argparse.Namespace, device: torch.device, dtype: torch.dtype, case: Decoder) -> dict:
    """dit_rt's decode, then diffusers' (bf16, and float32 with `a.fp32_ref`) of the same latent."""
    g = torch.Generator(device).manual_seed(2)
    z = torch.randn(case.latent, generator=g, device=device).to(dtype)
    fresh(device)
    ours = built(case.ours, dtype, device)
    randomize_(ours, 0)
    reset_peak(device)  # the peaks below: weights + one decode's activations
    with torch.no_grad():
        ms, out = timed(lambda: ours.decode(z), a.warmup, a.iters, device)
        if a.profile and device.type == "cuda":
            bench_wan.profile(lambda: ours.decode(z), f"{case.model} decode")
    peak = peak_gib(device)
    flops = ours.decode_flops(tuple(z.shape)) if case.flops else None
    out_ours = out.float().cpu()
    state = {k: v.cpu() for k, v in ours.state_dict().items()}
    ours = out = None
    fresh(device)
    ref = built(case.reference, dtype, device)
    ref.load_state_dict(state, strict=True)
    reset_peak(device)
    with torch.no_grad():
        ref_ms, ref_out = timed(lambda: ref.decode(z, return_dict=False)[0], a.warmup, a.iters, device)
        if a.profile and device.type == "cuda":
            bench_wan.profile(lambda: ref.decode(z, return_dict=False)[0], f"diffusers {case.model} decode")
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
            ref = built(case.reference, torch.float32, device)
            ref.load_state_dict(state, strict=True)
            with torch.no_grad():
                out32 = ref.decode(z.float(), return_dict=False)[0].float().cpu()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
        ref = None
        fresh(device)
        fp32 = dict(rel_err_vs_fp32=rel(out_ours, out32), diffusers_rel_err_vs_fp32=rel(out_ref, out32))
    return dict(
        model=f"{case.model}-decode-{str(dtype).removeprefix('torch.')}",
        latent="x".join(map(str, case.latent[1:])),
        ms=ms,
        diffusers_ms=ref_ms,
        ratio=ms / ref_ms,
        tflops=None if flops is None else flops / ms / 1e9,
        peak_gib=peak,
        diffusers_peak_gib=ref_peak,
        rel_err_vs_diffusers=err,
        **fp32,
    )


def flux_decoder(a: argparse.Namespace) -> Decoder:
    """The decode of an a.height x a.width latent: FLUX.1's AutoencoderKL or FLUX.2's AutoencoderKLFlux2."""
    h, w = a.height // 8, a.width // 8
    if a.model == "flux.1-dev":
        from diffusers import AutoencoderKL

        from dit_rt.models.flux import FluxVAE, FluxVAEConfig

        config = dict(TINY_VAE if a.tiny else FLUX_VAE)
        return Decoder(
            "vae",
            (1, config["latent_channels"], h, w),
            lambda: FluxVAE(FluxVAEConfig.from_config(config)),
            lambda: AutoencoderKL(**config),
        )
    from diffusers import AutoencoderKLFlux2

    from dit_rt.models.flux.vae2 import Flux2VAE, Flux2VAEConfig

    config = dict(TINY_FLUX2_VAE if a.tiny else FLUX2_VAE)
    return Decoder(
        "flux2-vae",
        (1, config["latent_channels"], h, w),
        lambda: Flux2VAE(Flux2VAEConfig.from_config(config)),
        lambda: AutoencoderKLFlux2(**config),
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
        elif "fp32_error" in r:
            err += f" (fp32 reference failed: {r['fp32_error'][:60]})"
        peaks = f"{_gib(r['peak_gib'])} / {_gib(r['diffusers_peak_gib'])}"
        tflops = "-" if r.get("tflops") is None else f"{r['tflops']:.0f}"
        print(
            f"| {r['model']} {r.get('size', r.get('latent'))} | {r['ms']:.1f} | {r['diffusers_ms']:.1f} "
            f"| {r['ratio']:.2f} | {tflops} | {peaks} | {err} |"
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


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The options bench_flux and bench_cosmos share."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny configurations, float32 (CPU smoke test)")
    p.add_argument("--text-len", type=int, default=512, help="text tokens (the pipelines pad to 512)")
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
    p.add_argument("--out", help="write the rows as JSON here")


def settle(a: argparse.Namespace) -> tuple[torch.device, torch.dtype, list[str]]:
    """(device, dtype, fast variants) from the common options; fills the attention default."""
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    a.attention = a.attention or ("fa3" if cuda else "sdpa")
    variants = [s for s in (a.fast if a.fast is not None else FAST if cuda else "").split(",") if s]
    for spec in variants:
        try:
            parse_fast(spec)
        except ValueError as e:
            raise SystemExit(f"--fast: {e}") from None
    return device, torch.float32 if a.tiny and not cuda else torch.bfloat16, variants


def attempt(rows: list[dict], label: str, fn, *args) -> None:
    """rows += fn(*args), or an error row labelled `label`: one failing case must not hide the others."""
    t0 = time.time()
    try:
        rows.append(fn(*args))
    except Exception as e:
        traceback.print_exc()
        rows.append(dict(model=label, error=f"{type(e).__name__}: {e}"))
    print(json.dumps(rows[-1]), f"({time.time() - t0:.0f}s)", flush=True)


def finish(rows: list[dict], a: argparse.Namespace, device: torch.device) -> list[dict]:
    """Print the markdown table; write the JSON with `--out`."""
    table(rows, device)
    if a.out:
        env = dict(
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            torch=torch.__version__,
            date=time.strftime("%Y-%m-%d"),
        )
        Path(a.out).write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(GUIDANCE), default="flux.1-dev")
    p.add_argument("--height", type=int, help="image height (default 1024; tiny 64)")
    p.add_argument("--width", type=int, help="image width (default 1024; tiny 96)")
    p.add_argument("--warmup", type=int, help="default 2 (tiny 1)")
    p.add_argument("--iters", type=int, help="default 5 (tiny 2)")
    add_common_arguments(p)
    a = p.parse_args(argv)
    device, dtype, variants = settle(a)
    a.height = a.height or (64 if a.tiny else 1024)
    a.width = a.width or (96 if a.tiny else 1024)
    if a.height % 16 or a.width % 16:
        raise SystemExit(f"--height / --width must be multiples of 16 (VAE 8 x 2x2 packing); got {a.height}")
    a.warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 2)
    a.iters = a.iters if a.iters is not None else (2 if a.tiny else 5)

    rows = []
    if not a.no_transformer:
        attempt(  # the case is built inside: its imports may fail too
            rows,
            f"{a.model} transformer",
            lambda: compare_transformer(a, device, dtype, variants, flux_case(a, device, dtype)),
        )
    if a.vae:
        attempt(rows, f"{a.model} vae", lambda: compare_decoder(a, device, dtype, flux_decoder(a)))
    return finish(rows, a, device)


if __name__ == "__main__":
    main()
