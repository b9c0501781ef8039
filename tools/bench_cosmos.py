"""Real-size Cosmos DiT forward and VAE decode: dit_rt next to diffusers in the same run, same random weights.

    python tools/bench_cosmos.py --model predict2-2b-v2w,predict2.5-2b --vae --out /tmp/p2.json   # H200
    python tools/bench_cosmos.py --model predict2-2b-t2i,predict2-14b-t2i --fast "" --fp32-ref
    python tools/bench_cosmos.py --model predict2-14b-v2w
    python tools/bench_cosmos.py --model cosmos1-7b --vae
    python tools/bench_cosmos.py --tiny --device cpu --model all                              # CPU smoke

One transformer forward per model at its published size, batch 1, 512 text tokens, with the first step's
inputs as its pipeline builds them: Predict2 Video2World (704x1280x93: 24 x 88 x 160 latents, 84,480
tokens) with one conditioning latent frame (condition-mask channel, per-frame timesteps [1, 1, T, 1, 1],
fps 16); Predict2.5 likewise, without fps and with the 100,352-wide Qwen context; Text2Image at 768x1360
(one frame, one timestep); Cosmos-1.0 7B at 704x1280x121 (16 x 88 x 160 latents through the 8x8x8
tokenizer, EDM c_noise timestep, fps 30). dit_rt exact (`--attention`, fa3 by default) and its fast
variants (`--fast`), then diffusers' CosmosTransformer3DModel bf16 on the same weights (the comparison of
tools/bench_flux.py: CUDA-event medians, peaks from a clean allocator, TFLOP/s from `CosmosTransformer.flops`,
`--fp32-ref`). diffusers' Cosmos DiT imports torchvision (one nearest resize of the padding mask).

`--vae`: the Wan 2.1 VAE decode at 704x1280x93 (latent [1, 16, 24, 88, 160]) against AutoencoderKLWan when a
Predict2 / 2.5 model is listed, and the Cosmos tokenizer decode of the 121-frame latent [1, 16, 16, 88, 160]
against AutoencoderKLCosmos when cosmos1-7b is. `--tiny --device cpu`: tiny configurations, float32, sdpa.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling tools when imported by the tests

import bench_wan  # noqa: E402
from bench_flux import (  # noqa: E402
    Case,
    Decoder,
    add_common_arguments,
    attempt,
    compare_decoder,
    compare_transformer,
    finish,
    settle,
)


@dataclass(frozen=True)
class Model:
    """A benchmarked catalog model: its preset and the first denoising step's inputs."""

    preset: str  # key of COSMOS_TRANSFORMER_PRESETS
    size: tuple[int, int, int]  # height, width, frames
    timestep: float  # the DiT timestep of the generated frames at the first step
    fps: float | None  # what the pipeline passes (None: none)
    video2world: bool  # one conditioning latent frame: condition mask + per-frame timesteps
    vae: str  # "wan" (4x temporal) or "cosmos" (the 8x8x8 tokenizer)


FLOW_T = 80 / 81  # Predict2: sigma_max 80 as flow time sigma / (sigma + 1)
MODELS = {
    "predict2-2b-v2w": Model("cosmos-predict2-2b-video2world", (704, 1280, 93), FLOW_T, 16, True, "wan"),
    "predict2-14b-v2w": Model("cosmos-predict2-14b-video2world", (704, 1280, 93), FLOW_T, 16, True, "wan"),
    "predict2-2b-t2i": Model("cosmos-predict2-2b-text2image", (768, 1360, 1), FLOW_T, None, False, "wan"),
    "predict2-14b-t2i": Model("cosmos-predict2-14b-text2image", (768, 1360, 1), FLOW_T, None, False, "wan"),
    "predict2.5-2b": Model("cosmos-predict2.5-2b", (704, 1280, 93), 200 / 201, None, True, "wan"),
    "cosmos1-7b": Model(
        "cosmos-1.0-diffusion-7b-text2world", (704, 1280, 121), 0.25 * math.log(80), 30, False, "cosmos"
    ),  # EDM c_noise at sigma_max 80
}
COND_TIMESTEP = 1e-4 / (1 + 1e-4)  # the conditioning frames' timestep (sigma_conditioning 1e-4)
TINY = dict(  # tests/tiny_cosmos.py's sizes; RoPE chunks t / h / w = 8 / 4 / 4 channels
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    mlp_ratio=2.0,
    text_embed_dim=32,
    adaln_lora_dim=8,
    max_size=(16, 32, 32),
)
TINY_SIZE = (32, 48, 9)  # height, width, frames (Text2Image: one frame)
TINY_WAN_VAE = dict(bench_wan.VAE, base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
TINY_COSMOS_VAE = dict(
    encoder_block_out_channels=(8, 16, 16, 16),
    decode_block_out_channels=(16, 16, 16, 16),
    attention_resolutions=(8,),
    resolution=64,
    num_layers=1,
)
TEMPORAL = {"wan": 4, "cosmos": 8}  # latent frame = 1 + (frames - 1) / this


def hub_config(name: str, tiny: bool) -> dict:
    """The preset as Hub `transformer/config.json` keys (what both sides are built from)."""
    from dit_rt.models.cosmos import COSMOS_TRANSFORMER_PRESETS

    config = dataclasses.asdict(COSMOS_TRANSFORMER_PRESETS[MODELS[name].preset])
    for derived in ("dim", "ffn_dim"):
        config.pop(derived)
    if tiny:
        config.update(TINY)
        if config["use_crossattn_projection"]:  # 28 x 3584 Qwen features in the real model
            config["crossattn_proj_in_channels"] = 48
            config["encoder_hidden_states_channels"] = config["text_embed_dim"]
    return config


def size(name: str, a: argparse.Namespace) -> tuple[int, int, int]:
    """(height, width, frames) of a model: its published size, the tiny one, or the command line's."""
    h, w, f = TINY_SIZE if a.tiny else MODELS[name].size
    if MODELS[name].size[2] == 1:  # Text2Image
        f = 1
    elif a.frames:
        f = a.frames
    return a.height or h, a.width or w, f


def cosmos_case(name: str, a: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Case:
    """The first step's DiT inputs: noise, text states, timestep(s), condition mask and zero padding mask."""
    import diffusers.models.transformers.transformer_cosmos as reference
    from diffusers import CosmosTransformer3DModel

    from dit_rt.models.cosmos import CosmosTransformer, CosmosTransformerConfig

    if not hasattr(reference, "transforms"):  # checked before dit_rt's side spends its time
        raise RuntimeError("diffusers' Cosmos DiT needs torchvision (its padding-mask resize); install it")
    m = MODELS[name]
    config = hub_config(name, a.tiny)
    cfg = CosmosTransformerConfig.from_config(config)
    H, W, F = size(name, a)
    T, h, w = (F - 1) // TEMPORAL[m.vae] + 1, H // 8, W // 8
    g = torch.Generator(device).manual_seed(1)
    cin = cfg.in_channels - int(m.video2world)  # Video2World's condition mask is the last input channel
    x = torch.randn(1, cin, T, h, w, generator=g, device=device).to(dtype)
    ctx = torch.randn(1, a.text_len, cfg.context_dim, generator=g, device=device).to(dtype)
    kw = dict(
        hidden_states=x,
        encoder_hidden_states=ctx,
        fps=m.fps,
        padding_mask=torch.zeros(1, 1, H, W, device=device, dtype=dtype),  # what every pipeline passes
    )
    if m.video2world:  # the first latent frame conditions (an input picture)
        indicator = torch.zeros(1, 1, T, 1, 1, device=device, dtype=dtype)
        indicator[:, :, :1] = 1.0
        kw["condition_mask"] = indicator.expand(1, 1, T, h, w).contiguous()
        kw["timestep"] = indicator * COND_TIMESTEP + (1 - indicator) * m.timestep  # [1, 1, T, 1, 1]
    else:
        kw["timestep"] = torch.full((1,), m.timestep, device=device, dtype=dtype)
    tokens = T * h * w // math.prod(cfg.patch_size)
    return Case(
        name, f"{H}x{W}x{F}", f"{tokens}+{a.text_len}", config,
        lambda c: CosmosTransformer(CosmosTransformerConfig.from_config(c)), CosmosTransformer3DModel, kw,
        lambda model: model.flops(T, h, w, a.text_len),
    )  # fmt: skip


def transformer_row(
    name: str, a: argparse.Namespace, device: torch.device, dtype: torch.dtype, variants: list[str]
) -> dict:
    """The model's case, compared; built here so that a failing import becomes an error row."""
    return compare_transformer(a, device, dtype, variants, cosmos_case(name, a, device, dtype))


def decoder_row(make, a: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """make(a) -> Decoder, compared; built here so that a failing import becomes an error row."""
    return compare_decoder(a, device, dtype, make(a))


def wan_decoder(a: argparse.Namespace) -> Decoder:
    """AutoencoderKLWan with the Wan 2.1 config (Predict2's `vae/`), 704x1280x93 by default."""
    from diffusers import AutoencoderKLWan

    from dit_rt.models.wan import WanVAE, WanVAEConfig

    config = dict(TINY_WAN_VAE if a.tiny else bench_wan.VAE)
    return Decoder(
        "wan-vae",
        latent("wan", a),
        lambda: WanVAE(WanVAEConfig.from_config(config)),
        lambda: AutoencoderKLWan(**config),
    )


def tokenizer_decoder(a: argparse.Namespace) -> Decoder:
    """AutoencoderKLCosmos CV8x8x8-1.0 (its defaults), 704x1280x121 by default."""
    from diffusers import AutoencoderKLCosmos

    from dit_rt.models.cosmos.tokenizer import CosmosVAE, CosmosVAEConfig

    config = dict(TINY_COSMOS_VAE if a.tiny else {})
    return Decoder(
        "cosmos-tokenizer",
        latent("cosmos", a),
        lambda: CosmosVAE(CosmosVAEConfig.from_config(config)),
        lambda: AutoencoderKLCosmos(**config),
        flops=False,
    )


def latent(vae: str, a: argparse.Namespace) -> tuple[int, ...]:
    """[1, 16, T, h, w] of the VAE's default clip (704x1280, 93 frames for Wan, 121 for the tokenizer), or of
    the tiny / command-line size."""
    H, W, F = TINY_SIZE if a.tiny else (704, 1280, 93 if vae == "wan" else 121)
    H, W, F = a.height or H, a.width or W, a.frames or F
    return (1, 16, (F - 1) // TEMPORAL[vae] + 1, H // 8, W // 8)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default="predict2-2b-v2w",
        help=f"comma-separated, or 'all': {', '.join(MODELS)} (default predict2-2b-v2w)",
    )
    p.add_argument("--height", type=int, help="video height (default: the model's; tiny 32)")
    p.add_argument("--width", type=int, help="video width (default: the model's; tiny 48)")
    p.add_argument("--frames", type=int, help="video frames (default: the model's; tiny 9; Text2Image 1)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, help="default 3 (Text2Image 10; tiny 1)")
    add_common_arguments(p)
    a = p.parse_args(argv)
    device, dtype, variants = settle(a)
    names = list(MODELS) if a.model == "all" else [n for n in a.model.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise SystemExit(f"--model: unknown {unknown}; choose from {', '.join(MODELS)} or 'all'")
    if (a.height or 16) % 16 or (a.width or 16) % 16:
        raise SystemExit(f"--height / --width must be multiples of 16 (VAE 8 x patch 2); got {a.height}")
    for n in names:
        if a.frames and MODELS[n].size[2] > 1 and (a.frames - 1) % TEMPORAL[MODELS[n].vae]:
            raise SystemExit(f"--frames {a.frames}: {n} needs 1 + {TEMPORAL[MODELS[n].vae]}k frames")

    rows = []
    for name in [] if a.no_transformer else names:
        iters = a.iters or (1 if a.tiny else 10 if MODELS[name].size[2] == 1 else 3)
        run = argparse.Namespace(**{**vars(a), "iters": iters})
        attempt(rows, f"{name} transformer", transformer_row, name, run, device, dtype, variants)
    if a.vae:
        run = argparse.Namespace(**{**vars(a), "iters": a.iters or (1 if a.tiny else 3)})
        for kind, make in (("wan", wan_decoder), ("cosmos", tokenizer_decoder)):
            if any(MODELS[n].vae == kind for n in names):
                attempt(rows, f"{kind} vae decode", decoder_row, make, run, device, dtype)
    return finish(rows, a, device)


if __name__ == "__main__":
    main()
