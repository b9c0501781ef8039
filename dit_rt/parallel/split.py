"""Split and gather helpers: the token sequence across sequence-parallel ranks, the batch across data-
parallel groups, the conditional / unconditional passes across the two CFG ranks.

A sequence the degree does not divide is zero-padded at its end to a multiple of it, so every shard has
the same length (collectives want equal sizes) and padding only ever sits after the last real token.
The attention ops drop padded keys by position (see ring.py), padded queries compute throwaway rows, and
`gather_sequence` trims them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _world(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def shard_len(length: int, world: int) -> int:
    """Tokens per shard when `length` tokens are split over `world` ranks (padding included)."""
    return -(-length // world)


def pad_to(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Zero-pad x at the end of `dim` to `length` (no copy when it already has that length)."""
    extra = length - x.shape[dim]
    if extra == 0:
        return x
    if extra < 0:
        raise ValueError(f"cannot pad dim {dim} of size {x.shape[dim]} down to {length}")
    pad = [0, 0] * (x.ndim - dim % x.ndim - 1) + [0, extra]
    return F.pad(x, pad)


def shard_sequence(x: torch.Tensor, dim: int, world: int, rank: int) -> torch.Tensor:
    """This rank's contiguous shard of x along `dim`, padded so all `world` shards are equally long."""
    n = shard_len(x.shape[dim], world)
    shard = pad_to(x, dim, n * world).narrow(dim, rank * n, n)
    # A copy with the standard strides: `.contiguous()` would keep a size-1 batch dim's stride of the whole
    # sequence, and a compiled block (dynamo guards on strides) would compile again for the next block.
    return shard.clone(memory_format=torch.contiguous_format)


def gather_sequence(
    x: torch.Tensor, dim: int, group: dist.ProcessGroup | None, length: int | None = None
) -> torch.Tensor:
    """Concatenate every rank's shard along `dim` (rank order) and trim the padding to `length` tokens."""
    if _world(group) > 1:
        parts = [torch.empty_like(x) for _ in range(_world(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        x = torch.cat(parts, dim=dim)
    return x if length is None else x.narrow(dim, 0, length)


def split_sizes(n: int, world: int) -> list[int]:
    """Sizes of `n` items split into `world` contiguous parts, the first ones one larger when uneven."""
    return [n // world + (i < n % world) for i in range(world)]


def split_batch(items: torch.Tensor | Sequence, group: dist.ProcessGroup | None):
    """Data parallel: this rank's contiguous part of a batch (a tensor along dim 0, or a list of prompts).

    Batches the degree does not divide are split unevenly (`split_sizes`); a rank may get an empty part
    when there are fewer items than ranks.
    """
    sizes = split_sizes(len(items), _world(group))
    start = sum(sizes[: _rank(group)])
    return items[start : start + sizes[_rank(group)]]


def gather_batch(x: torch.Tensor, group: dist.ProcessGroup | None, batch: int) -> torch.Tensor:
    """Inverse of `split_batch` for tensors: every rank gets the whole batch of `batch` items in order."""
    world = _world(group)
    if world == 1:
        return x
    sizes = split_sizes(batch, world)
    padded = pad_to(x, 0, sizes[0])  # all_gather wants equal shapes: pad to the largest part
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def cfg_select(cond, uncond, group: dist.ProcessGroup | None):
    """CFG parallel: the inputs of the pass this rank runs, `cond` on rank 0 of the 2-rank cfg group and
    `uncond` on rank 1. Without CFG parallel the caller runs both passes and does not call this."""
    if _world(group) != 2:
        raise ValueError(f"a CFG group has 2 ranks, this one has {_world(group)}")
    return cond if _rank(group) == 0 else uncond


def cfg_gather(pred: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
    """CFG parallel: (conditional, unconditional) predictions on both ranks from each rank's own pass."""
    if _world(group) != 2:
        raise ValueError(f"a CFG group has 2 ranks, this one has {_world(group)}")
    parts = [torch.empty_like(pred) for _ in range(2)]
    dist.all_gather(parts, pred.contiguous(), group=group)
    return parts[0], parts[1]
