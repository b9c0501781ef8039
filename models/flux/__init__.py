"""FLUX.1: the MM-DiT transformer (double + single stream blocks) and its 16-channel AutoencoderKL."""

from dit_rt.models.flux.transformer import FLUX_TRANSFORMER_PRESETS, FluxTransformer, FluxTransformerConfig
from dit_rt.models.flux.vae import DiagonalGaussian, FluxVAE, FluxVAEConfig

__all__ = [
    "FLUX_TRANSFORMER_PRESETS",
    "FluxTransformer",
    "FluxTransformerConfig",
    "DiagonalGaussian",
    "FluxVAE",
    "FluxVAEConfig",
]
