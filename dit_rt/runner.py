"""The block seam: every transformer runs its stack of blocks through a BlockRunner.

Offload prefetch, per-block compilation and step caches attach here from outside (DESIGN.md,
invariant 4), so model files keep a plain loop.
"""

from __future__ import annotations

import torch
from torch import nn


class BlockRunner(nn.Module):
    """Runs `x = block(x, *args, **kwargs)` over a ModuleList. Holds no parameters."""

    def forward(self, blocks: nn.ModuleList, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        for block in blocks:
            x = block(x, *args, **kwargs)
        return x
