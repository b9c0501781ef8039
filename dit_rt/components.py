"""Component builders keyed by the class name model_index.json gives each component, so that one builder
serves every family that ships the class (the Wan VAE serves Wan and Cosmos; the T5 encoder Wan, FLUX and
Cosmos).

A builder reads the component's config and returns the model built on `meta`; `build_component` then
streams the weights in (Invariant: build on meta, load with assign). Builders import their models lazily:
`import dit_rt` stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from dit_rt import loaders

Builder = Callable[[Path], nn.Module]
"""builder(component_folder) -> the model, built on the meta device from the folder's config."""

_BUILDERS: dict[str, Builder] = {}


def register_component(*class_names: str):
    """Decorator: `builder` builds components whose model_index.json class name is one of these."""

    def register(builder: Builder) -> Builder:
        for name in class_names:
            _BUILDERS[name] = builder
        return builder

    return register


def component_class(index: dict, component: str) -> str | None:
    """The class name model_index.json lists for `component` (["diffusers", "AutoencoderKLWan"]), or None."""
    entry = index.get(component)
    return entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None


def build_meta(folder: Path, index: dict, component: str) -> nn.Module:
    """The component's model from its config, no weights (call under `torch.device("meta")`)."""
    name = component_class(index, component)
    builder = _BUILDERS.get(name)
    if builder is None:
        raise NotImplementedError(
            f"{folder}: component {component!r} has class {name!r}, which dit_rt cannot build; "
            f"known classes: {', '.join(sorted(_BUILDERS))}"
        )
    return builder(folder / component)


def build_component(
    folder: Path,
    index: dict,
    component: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    linear_format: str | None = None,
) -> nn.Module:
    """The component `component` of the Hub-layout `folder`, weights loaded on `device` in `dtype`, in eval
    mode without gradients. linear_format: the transformer's linear weight format (dit_rt.ops)."""
    with torch.device("meta"):
        model = build_meta(folder, index, component)
    loaders.load_weights(
        model,
        folder / component,
        device=device,
        dtype=dtype,
        linear_format=linear_format,
        component=component,
    )
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- builders


@register_component("AutoencoderKLWan")
def _wan_vae(folder: Path) -> nn.Module:
    from dit_rt.models.wan import WanVAE, WanVAEConfig

    return WanVAE(WanVAEConfig.from_config(loaders.read_config(folder)))


@register_component("AutoencoderKL")
def _autoencoder_kl(folder: Path) -> nn.Module:
    from dit_rt.models.flux.vae import FluxVAE, FluxVAEConfig

    return FluxVAE(FluxVAEConfig.from_config(loaders.read_config(folder)))


@register_component("WanTransformer3DModel")
def _wan_transformer(folder: Path) -> nn.Module:
    from dit_rt.models.wan import WanTransformer, WanTransformerConfig

    config = WanTransformerConfig.from_config(loaders.read_config(folder))
    return WanTransformer(_clip_branch_from_keys(config, folder))


@register_component("FluxTransformer2DModel")
def _flux_transformer(folder: Path) -> nn.Module:
    from dit_rt.models.flux import FluxTransformer, FluxTransformerConfig

    return FluxTransformer(FluxTransformerConfig.from_config(loaders.read_config(folder)))


def _t5_family(folder: Path, model_type: str) -> nn.Module:
    # One code path for both: model_type ("umt5" / "t5") decides whether every block owns a relative-position
    # bias table (UMT5, Wan) or block 0's is shared by all (T5 v1.1 for FLUX.1, T5-11B for Cosmos). The
    # config's own model_type wins; the class name only fills it in when absent.
    from dit_rt.models.text import T5Config, T5Encoder

    return T5Encoder(T5Config.from_config({"model_type": model_type, **loaders.read_config(folder)}))


@register_component("UMT5EncoderModel")
def _umt5_encoder(folder: Path) -> nn.Module:
    return _t5_family(folder, "umt5")


@register_component("T5EncoderModel")
def _t5_encoder(folder: Path) -> nn.Module:
    return _t5_family(folder, "t5")


@register_component("CLIPTextModel")
def _clip_text(folder: Path) -> nn.Module:
    from dit_rt.models.text import CLIPTextConfig, CLIPTextEncoder

    return CLIPTextEncoder(CLIPTextConfig.from_config(loaders.read_config(folder)))


@register_component("CLIPVisionModel")
def _clip_vision(folder: Path) -> nn.Module:
    from dit_rt.models.text import CLIPVisionConfig, CLIPVisionEncoder

    return CLIPVisionEncoder(CLIPVisionConfig.from_config(loaders.read_config(folder)))


def _clip_branch_from_keys(config, folder: Path):
    """The weights decide whether a Wan transformer has the CLIP image branch (Wan 2.1 I2V) or not (Wan 2.2
    I2V): Hub configs of the same model have been published both ways (spec A.1)."""
    keys = loaders.scan(*loaders.find_weight_files(folder))
    has_clip = any(".attn2.add_k_proj." in k for k in keys)
    if has_clip and config.image_dim is None:
        image_dim = keys["condition_embedder.image_embedder.norm1.weight"].shape[0]
        return replace(
            config,
            image_dim=image_dim,
            added_kv_proj_dim=config.num_attention_heads * config.attention_head_dim,
        )
    if not has_clip and config.image_dim is not None:
        return replace(config, image_dim=None, added_kv_proj_dim=None)
    return config


# FLUX.2


@register_component("Flux2Transformer2DModel")
def _flux2_transformer(folder: Path) -> nn.Module:
    from dit_rt.models.flux import Flux2Transformer, Flux2TransformerConfig

    return Flux2Transformer(Flux2TransformerConfig.from_config(loaders.read_config(folder)))


@register_component("AutoencoderKLFlux2")
def _flux2_vae(folder: Path) -> nn.Module:
    from dit_rt.models.flux.vae2 import Flux2VAE, Flux2VAEConfig

    return Flux2VAE(Flux2VAEConfig.from_config(loaders.read_config(folder)))


@register_component("Mistral3ForConditionalGeneration")
def _mistral3_text(folder: Path) -> nn.Module:
    # FLUX.2-dev's text encoder: the language stack up to its last output layer (models/text/mistral.py).
    from dit_rt.models.text.mistral import build_from_folder

    return build_from_folder(folder)


# Cosmos


@register_component("CosmosTransformer3DModel")
def _cosmos_transformer(folder: Path) -> nn.Module:
    from dit_rt.models.cosmos.transformer import build_from_folder

    return build_from_folder(folder)


@register_component("Qwen2_5_VLForConditionalGeneration")
def _qwen_text(folder: Path) -> nn.Module:
    # Cosmos-Predict2.5's text encoder: only the language stack is built (models/text/qwen.py).
    from dit_rt.models.text.qwen import build_from_folder

    return build_from_folder(folder)


@register_component("AutoencoderKLCosmos")
def _cosmos_tokenizer(folder: Path) -> nn.Module:
    # Cosmos-1.0's continuous video tokenizer (CV8x8x8; models/cosmos/tokenizer.py).
    from dit_rt.models.cosmos.tokenizer import build_from_folder

    return build_from_folder(folder)
