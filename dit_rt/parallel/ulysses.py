"""Ulysses (DeepSpeed-Ulysses) attention: an all-to-all trades the sequence shard for a head shard.

Each of the U ranks holds (B, L/U, H, D); after the all-to-all it holds (B, L, H/U, D), runs ordinary
attention over the whole sequence for its heads, and a second all-to-all returns (B, L/U, H, D).
Head counts U does not divide (Wan 1.3B has 12 heads, 14B has 40) are zero-padded to a multiple of U:
a zero head attends uniformly to zero values, its output is dropped, and the real heads are untouched.
Padding costs the same wall time as an uneven head split (the busiest rank has ceil(H/U) heads either
way) and keeps every message the same size.
With a ring group the attention after the all-to-all is Ring attention over the ring's chunks (the
Ulysses x Ring hybrid); see mesh.py for the rank layout that makes those chunks contiguous.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dit_rt.ops.attention import AttentionBackend
from dit_rt.ops.attention.sdpa import SDPA
from dit_rt.parallel.ring import ring_attention
from dit_rt.parallel.split import ShardLayout


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split x into world equal chunks along scatter_dim, send chunk i to rank i, and concatenate what
    arrives along gather_dim in source-rank order."""
    world = dist.get_world_size(group)
    inp = x.unflatten(scatter_dim, (world, -1)).movedim(scatter_dim, 0).contiguous()  # [U, ...]
    out = torch.empty_like(inp)
    dist.all_to_all_single(out, inp, group=group)  # out[i]: rank i's chunk for this rank
    return out.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


def _pad_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, heads - x.shape[2])) if x.shape[2] != heads else x


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    group: dist.ProcessGroup,
    backend: AttentionBackend = SDPA,
    valid_len: int | ShardLayout | None = None,
    ring_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Sequence-parallel attention over `group`: q (B, Ls, H, D), k/v (B, Ls, Hk, D*) -> (B, Ls, H, Dv).

    Every rank holds an equal contiguous shard of the sequence in group-rank order (the ring group, if
    any, splits the sequence further: shard index = ring_rank * U + ulysses_rank). valid_len: the real
    length of the whole sequence when it was padded at its end, the ShardLayout of a joint sequence of
    streams, or None when it was not padded.
    """
    world = dist.get_world_size(group)
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % world or kv_heads % world:
        # Grouped K/V heads only stay aligned with their query heads when both counts split evenly.
        k = k.repeat_interleave(heads // kv_heads, dim=2) if kv_heads != heads else k
        v = v.repeat_interleave(heads // kv_heads, dim=2) if kv_heads != heads else v
        padded = -(-heads // world) * world
        q, k, v = (_pad_heads(x, padded) for x in (q, k, v))
    dq, dk = q.shape[-1], k.shape[-1]
    if q.shape[:3] == k.shape[:3] == v.shape[:3]:
        # One all-to-all for q, k and v: heads are split along dim 2, the concatenation is along dim 3.
        qkv = all_to_all(torch.cat([q, k, v], dim=-1), group, scatter_dim=2, gather_dim=1)
        q, k, v = qkv.split([dq, dk, qkv.shape[-1] - dq - dk], dim=-1)  # [B, L, H/U, D*]
    else:
        q, k, v = (all_to_all(x, group, scatter_dim=2, gather_dim=1) for x in (q, k, v))
    out = ring_attention(q, k, v, scale, group=ring_group, backend=backend, valid_len=valid_len)
    out = all_to_all(out, group, scatter_dim=1, gather_dim=2)  # [B, Ls, H(padded), Dv]
    return out[:, :, :heads]
