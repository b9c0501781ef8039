"""Wan 2.1 / 2.2 models: the diffusion transformer and the VAE."""

from dit_rt.models.wan.transformer import WAN_TRANSFORMER_PRESETS, WanTransformer, WanTransformerConfig
from dit_rt.models.wan.vae import LatentDist, VAETiling, WanVAE, WanVAEConfig

__all__ = [
    "WAN_TRANSFORMER_PRESETS",
    "LatentDist",
    "VAETiling",
    "WanTransformer",
    "WanTransformerConfig",
    "WanVAE",
    "WanVAEConfig",
]
