"""The linear seam: a Linear module whose weight format is applied after load."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x W^T + b, with `weight` (out, in) and `bias` (out,) named as in nn.Linear.

    `sources` names the checkpoint projections fused into this one (e.g. ("to_q", "to_k", "to_v")),
    their output sizes in `splits`; the loader concatenates them along the output dimension.
    """

    def __init__(
        self, in_features, out_features, bias=True, *, sources=None, splits=None, device=None, dtype=None
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.sources = tuple(sources) if sources else None
        self.splits = tuple(splits) if splits else (out_features,)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def fused(in_features: int, out_features: int, sources, bias=True, **kw) -> Linear:
    """A projection fusing len(sources) equally sized checkpoint projections into one GEMM."""
    return Linear(
        in_features,
        out_features * len(sources),
        bias,
        sources=sources,
        splits=(out_features,) * len(sources),
        **kw,
    )
