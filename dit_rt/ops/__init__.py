"""Leaf ops shared by every model: the attention seam and the linear seam."""

from dit_rt.ops.attention import (
    Attention,
    attention,
    available_attention,
    register_attention,
    resolve_attention,
    set_attention,
)
from dit_rt.ops.linear import LINEAR_FORMATS, Linear, fused, quantize_

__all__ = [
    "LINEAR_FORMATS",
    "Attention",
    "Linear",
    "attention",
    "available_attention",
    "fused",
    "quantize_",
    "register_attention",
    "resolve_attention",
    "set_attention",
]
