"""Leaf ops shared by every model: the attention seam and the linear seam."""

from dit_rt.ops.attention import Attention, attention
from dit_rt.ops.linear import Linear, fused

__all__ = ["Attention", "Linear", "attention", "fused"]
