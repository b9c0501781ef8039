"""Split and gather helpers: the token sequence across sequence-parallel ranks, the batch across data-
parallel groups, the conditional / unconditional passes across the two CFG ranks.

A sequence the degree does not divide is zero-padded at its end to a multiple of it, so every shard has
the same length (collectives want equal sizes) and padding only ever sits after the last real token.
The attention ops drop padded keys by position (see ring.py), padded queries compute throwaway rows, and
`gather_sequence` trims them.

A joint sequence of several streams (FLUX's [text; image]) is split stream by stream: each stream is padded
and sharded on its own, and a rank holds its shard of every stream, concatenated in stream order (what a
model's `cat([txt, img])` of its shards gives). Attention is order-free over keys, so the ranks' shards
together are the joint sequence permuted; `ShardLayout` says where the real tokens are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


def real_keys(valid_len: int | None, chunk: int, index: int) -> int:
    """Real (non-padding) tokens in chunk `index` of `chunk` tokens when the sequence has `valid_len`."""
    if valid_len is None:
        return chunk
    return min(max(valid_len - index * chunk, 0), chunk)


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


@dataclass(frozen=True)
class ShardLayout:
    """Where the real tokens sit in the sequence shards of a joint sequence of streams.

    lengths: the real length of each stream, in the order a shard concatenates them; world: the number of
    shards. Each stream is padded at its end and split evenly (`shard_sequence`), so shard r holds
    `shard_len(n, world)` tokens of every stream n, the real ones in front.
    """

    lengths: tuple[int, ...]
    world: int

    @property
    def shard(self) -> int:
        """Tokens per shard, padding included."""
        return sum(shard_len(n, self.world) for n in self.lengths)

    def real_runs(self, first: int, count: int = 1) -> list[tuple[int, int]]:
        """(start, length) runs of real tokens in shards first .. first + count - 1 concatenated in rank
        order (what a Ulysses all-to-all gathers), adjacent runs merged; empty when all are padding."""
        runs: list[tuple[int, int]] = []
        pos = 0
        for r in range(first, first + count):
            for n in self.lengths:
                size = shard_len(n, self.world)
                real = real_keys(n, size, r)
                if real and runs and sum(runs[-1]) == pos:
                    runs[-1] = (runs[-1][0], runs[-1][1] + real)
                elif real:
                    runs.append((pos, real))
                pos += size
        return runs


def shard_streams(x: torch.Tensor, dim: int, world: int, rank: int, lengths: Sequence[int]) -> torch.Tensor:
    """This rank's shard of a joint sequence x = cat(streams of `lengths`) along `dim`: the concatenation
    of its shard of every stream (each padded on its own). One stream: `shard_sequence`."""
    if x.shape[dim] != sum(lengths):
        raise ValueError(
            f"a joint sequence of streams {tuple(lengths)} has {x.shape[dim]} tokens along dim {dim}"
        )
    if len(lengths) == 1:
        return shard_sequence(x, dim, world, rank)
    return torch.cat([shard_sequence(s, dim, world, rank) for s in x.split(list(lengths), dim)], dim)


def gather_streams(
    x: torch.Tensor, dim: int, group: dist.ProcessGroup | None, lengths: Sequence[int]
) -> torch.Tensor:
    """Inverse of `shard_streams`: every rank's shard gathered, each stream's padding trimmed, the streams
    concatenated in order. One stream: `gather_sequence`."""
    if len(lengths) == 1:
        return gather_sequence(x, dim, group, lengths[0])
    world = _world(group)
    sizes = [shard_len(n, world) for n in lengths]
    if x.shape[dim] != sum(sizes):
        raise ValueError(
            f"a shard of streams {tuple(lengths)} over {world} ranks has {sum(sizes)} tokens, got "
            f"{x.shape[dim]}"
        )
    whole = gather_sequence(x, dim, group)  # [.., world * sum(sizes), ..]: rank r's shards of every stream
    parts = [p.split(sizes, dim) for p in whole.chunk(world, dim)]
    return torch.cat(
        [torch.cat([p[i] for p in parts], dim).narrow(dim, 0, n) for i, n in enumerate(lengths)], dim
    )


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
