"""Leaf ops shared by every model: the attention seam and the linear seam; fused elementwise kernels
(`elementwise`) and the fused producer -> consumer ops a block names (`fused_ops`, where the fp8 dataflow
lives)."""

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
