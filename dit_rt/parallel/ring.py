"""Ring attention: each rank keeps its query chunk and K/V chunks travel around the ring.

At step s rank r attends its queries to K/V chunk (r - s) mod R while the chunk for step s + 1 is
already in flight (isend to r + 1, irecv from r - 1), and the partial outputs are merged exactly with
their log-sum-exps: out = sum_j exp(lse_j - lse) out_j, lse = logsumexp_j lse_j, accumulated in fp32.

Padding is handled by position, not by a mask: a sequence is padded only at its end (split.py), so
chunk j holds min(max(valid_len - j * chunk, 0), chunk) real keys, all in front. Slicing them off keeps
every backend exact (no backend has to take a mask) and skips all-padding chunks entirely. A joint
sequence of several streams (a `ShardLayout`) has each stream's padding at that stream's end inside the
chunk, so the real keys are a few runs, sliced and concatenated.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from dit_rt.ops.attention import AttentionBackend, attention
from dit_rt.ops.attention.sdpa import SDPA
from dit_rt.parallel.split import ShardLayout, real_keys

log = logging.getLogger("dit_rt")
_warned: set[str] = set()


def real_runs(valid: int | ShardLayout | None, chunk: int, index: int, chunks: int) -> list[tuple[int, int]]:
    """(start, length) runs of the real keys in chunk `index` (of `chunks`, `chunk` tokens each)."""
    if not isinstance(valid, ShardLayout):
        return [(0, real_keys(valid, chunk, index))]
    per = valid.world // chunks  # sequence shards per chunk (a Ulysses all-to-all gathers several)
    if per * chunks != valid.world or per * valid.shard != chunk:
        raise ValueError(
            f"ring attention: {chunks} chunks of {chunk} tokens do not hold the shards of {valid}"
        )
    return valid.real_runs(index * per, per)


def _take(x: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    """The tokens of `runs` of x [B, L, ...]: a view for one run, else the runs concatenated."""
    if len(runs) <= 1:
        return x[:, runs[0][0] : sum(runs[0])] if runs else x[:, :0]
    return torch.cat([x[:, start : start + n] for start, n in runs], dim=1)


def _lse_backend(backend: AttentionBackend) -> AttentionBackend:
    # The merge needs each partial's log-sum-exp; backends without one (sage, trtllm) fall back to sdpa,
    # whose LSE path is plain PyTorch on every device.
    if getattr(backend, "lse", False):
        return backend
    name = getattr(backend, "name", repr(backend))
    if name not in _warned:
        _warned.add(name)
        log.warning("ring attention: backend %r returns no log-sum-exp; its partials use 'sdpa'", name)
    return SDPA


def merge_partial(
    out: torch.Tensor | None, lse: torch.Tensor | None, out_j: torch.Tensor, lse_j: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one partial (out_j (B, L, H, D), lse_j fp32 (B, H, L)) into the fp32 running (out, lse)."""
    if out is None:
        return out_j.float(), lse_j
    new = torch.logaddexp(lse, lse_j)  # [B, H, L]
    w_old = torch.exp(lse - new).transpose(1, 2)[..., None]  # [B, L, H, 1]
    w_new = torch.exp(lse_j - new).transpose(1, 2)[..., None]
    return out * w_old + out_j.float() * w_new, new


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    group: dist.ProcessGroup | None,
    backend: AttentionBackend = SDPA,
    valid_len: int | ShardLayout | None = None,
) -> torch.Tensor:
    """Attention of this rank's query chunk over the K/V chunks of every rank of `group`.

    q (B, Lc, H, D), k/v (B, Lc, Hk, D*): chunk `rank` of a sequence split into equal contiguous chunks in
    group-rank order. valid_len: the real length of the whole sequence, when it was padded at its end
    (keys past it are ignored), or the ShardLayout of a joint sequence of streams (each chunk is then
    `world / chunks` consecutive shards of it); None means no padding. Returns (B, Lc, H, Dv) in q's
    dtype. With no group (or one rank) this is local attention over the real keys, and any backend works.
    """
    world = 1 if group is None else dist.get_world_size(group)
    if world == 1:
        runs = real_runs(valid_len, k.shape[1], 0, 1)
        return attention(q, _take(k, runs), _take(v, runs), scale=scale, backend=backend)
    backend = _lse_backend(backend)
    rank = dist.get_rank(group)
    send_to = dist.get_global_rank(group, (rank + 1) % world)
    recv_from = dist.get_global_rank(group, (rank - 1) % world)
    dk = k.shape[-1]
    kv = torch.cat([k, v], dim=-1).contiguous()  # [B, Lc, Hk, Dk + Dv]: one message per step
    out = lse = None
    for step in range(world):
        if step < world - 1:
            nxt = torch.empty_like(kv)
            reqs = dist.batch_isend_irecv(
                [dist.P2POp(dist.isend, kv, send_to, group), dist.P2POp(dist.irecv, nxt, recv_from, group)]
            )
        runs = real_runs(valid_len, kv.shape[1], (rank - step) % world, world)
        if sum(n for _, n in runs) > 0:
            kj, vj = _take(kv, runs).split([dk, kv.shape[-1] - dk], dim=-1)
            out_j, lse_j = attention(q, kj, vj, scale=scale, return_lse=True, backend=backend)
            out, lse = merge_partial(out, lse, out_j, lse_j)
        if step < world - 1:
            for req in reqs:
                req.wait()
            kv = nxt
    if out is None:
        raise ValueError(f"ring attention: valid_len={valid_len} leaves no real key in any chunk")
    return out.to(q.dtype)
