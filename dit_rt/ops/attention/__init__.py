"""The attention seam: one entry point, q/k/v as (batch, seq, heads, head_dim), a registry of backends.

Models hold an `Attention` module and call it; the pipeline picks the backend once and installs it
with `set_attention(model, backend)`. Sequence parallelism wraps the installed op from outside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    # [B, L, H, D] -> [B, H, L, D] for SDPA and back.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """Attention over (B, L, H, D) tensors; returns (B, Lq, H, D)."""
    return _sdpa(q, k, v, scale)


class Attention(nn.Module):
    """Parameter-free seam module; `op` is the installed backend callable."""

    def __init__(self):
        super().__init__()
        self.op = _sdpa

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None):
        return self.op(q, k, v, scale)
