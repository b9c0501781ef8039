"""FLUX.1 and FLUX.2: the MM-DiT transformers (double + single stream blocks) and their AutoencoderKLs."""

from dit_rt.models.flux.flux2 import FLUX2_TRANSFORMER_PRESETS, Flux2Transformer, Flux2TransformerConfig
from dit_rt.models.flux.transformer import FLUX_TRANSFORMER_PRESETS, FluxTransformer, FluxTransformerConfig
from dit_rt.models.flux.vae import DiagonalGaussian, FluxVAE, FluxVAEConfig

__all__ = [
    "FLUX2_TRANSFORMER_PRESETS",
    "FLUX_TRANSFORMER_PRESETS",
    "DiagonalGaussian",
    "Flux2Transformer",
    "Flux2TransformerConfig",
    "FluxTransformer",
    "FluxTransformerConfig",
    "FluxVAE",
    "FluxVAEConfig",
]
