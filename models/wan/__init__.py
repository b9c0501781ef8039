"""Wan 2.1 / 2.2 models: the diffusion transformer (and the VAE)."""

from dit_rt.models.wan.transformer import WAN_TRANSFORMER_PRESETS, WanTransformer, WanTransformerConfig

__all__ = ["WAN_TRANSFORMER_PRESETS", "WanTransformer", "WanTransformerConfig"]
