"""NVIDIA Cosmos: the DiT shared by Cosmos-1.0 Diffusion, Cosmos-Predict2 and Cosmos-Predict2.5."""

from dit_rt.models.cosmos.transformer import (
    COSMOS_TRANSFORMER_PRESETS,
    CosmosTransformer,
    CosmosTransformerConfig,
    build_from_folder,
)

__all__ = [
    "COSMOS_TRANSFORMER_PRESETS",
    "CosmosTransformer",
    "CosmosTransformerConfig",
    "build_from_folder",
]
