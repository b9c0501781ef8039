"""Tiny Cosmos DiT configurations and their diffusers reference models (test-only: imports diffusers).

`COSMOS_PREDICT2` (Text2Image / Video2World shape: no learnable position embedding), `COSMOS_PREDICT25`
(Predict2.5: the text projection) and `COSMOS_1` (Cosmos-1.0: learnable position embedding, rope_scale
(2, 1, 1)) are diffusers `CosmosTransformer3DModel` kwargs; `make_cosmos_transformer` builds one with
random weights. diffusers' Cosmos DiT resizes the padding mask with torchvision, which has no CPU wheel
here: `torchvision_stand_in` gives the reference module that one call.
"""

from __future__ import annotations

import contextlib
import enum
import types

import torch
import torch.nn.functional as F

from dit_rt.demo import randomize as _randomize

COSMOS_TEXT_DIM = 32  # the tiny T5 width the cross-attention reads (1024 in the real models)
COSMOS_PREDICT2 = dict(
    in_channels=16,
    out_channels=16,
    num_attention_heads=2,
    attention_head_dim=16,  # RoPE chunks t / h / w = 8 / 4 / 4 channels
    num_layers=2,
    mlp_ratio=2.0,
    text_embed_dim=COSMOS_TEXT_DIM,
    adaln_lora_dim=8,
    max_size=(16, 32, 32),
    patch_size=(1, 2, 2),
    rope_scale=(1.0, 4.0, 4.0),
    concat_padding_mask=True,
    extra_pos_embed_type=None,
)
COSMOS_PREDICT2_V2W = {**COSMOS_PREDICT2, "in_channels": 17, "rope_scale": (1.0, 3.0, 3.0)}
COSMOS_PREDICT25 = {
    **COSMOS_PREDICT2_V2W,
    "use_crossattn_projection": True,
    "crossattn_proj_in_channels": 48,  # 28 x 3584 = 100,352 in the real model
    "encoder_hidden_states_channels": COSMOS_TEXT_DIM,
}
COSMOS_1 = {**COSMOS_PREDICT2, "rope_scale": (2.0, 1.0, 1.0), "extra_pos_embed_type": "learnable"}


def make_cosmos_transformer(config: dict, seed: int = 21):
    """diffusers' CosmosTransformer3DModel with `config` and non-trivial random weights, in eval mode."""
    from diffusers import CosmosTransformer3DModel

    return _randomize(CosmosTransformer3DModel(**config).eval(), seed)


def _resize(img: torch.Tensor, size, interpolation=None, **_) -> torch.Tensor:
    # torchvision's tensor resize with InterpolationMode.NEAREST is F.interpolate(mode="nearest").
    return F.interpolate(img, size=list(size), mode="nearest")


@contextlib.contextmanager
def torchvision_stand_in():
    """Within the block, diffusers' Cosmos DiT module sees `transforms` (torchvision.transforms, which it
    imports only when torchvision is installed) as a stand-in whose `functional.resize` does the one
    nearest-neighbour resize the DiT calls through torch's own F.interpolate. Restores the module after."""
    import diffusers.models.transformers.transformer_cosmos as ref

    missing = object()
    saved = getattr(ref, "transforms", missing)
    ref.transforms = types.SimpleNamespace(
        functional=types.SimpleNamespace(resize=_resize),
        InterpolationMode=enum.Enum("InterpolationMode", {"NEAREST": "nearest"}),
    )
    try:
        yield
    finally:
        if saved is missing:
            del ref.transforms
        else:
            ref.transforms = saved
