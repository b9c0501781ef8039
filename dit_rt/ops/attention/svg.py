"""`svg`: Sparse VideoGen (Xi et al., ICML 2025), training-free sparse self-attention for video DiTs.

Most heads of a video DiT are spatial (a query attends to its own frame and the nearest ones) or temporal (a
query attends to the same place, and its neighbours, in every frame). Per call, each (batch, head) of a video
self-attention is classified by online profiling: `samples` evenly spaced query rows are attended exactly and
under both sparse patterns, and the pattern with the smaller mean squared error against the exact rows wins.

Both patterns are one window pattern: the video tokens are cut into query chunks of `chunk` tokens, and chunk
[a, b) attends to the keys [a - r, b + r), with r the widest radius whose share of the query x key pairs is
within `budget`. A spatial head applies it to the tokens in the model's frame-major order ((t, h, w)
row-major), where the window covers the chunk's frames and the nearest ones; a temporal head applies it after
the token-major transform (position p of frame f moves to p * frames + f), where it covers every frame of
nearby positions. As the windows are the same for every head, each chunk is one call of the dense kernel
(FA3 on Hopper) over all heads, on its contiguous key slice: the kernel computes only the chunk x window
blocks, at its full rate (FlexAttention's block-sparse kernel ran this band at ~60% of FA3's rate on an
H100, BENCHMARKS.md). The transform is a per-head gather on the way in and its inverse on the way out, one
pass each way.

Dense (the `dense` kernel, "auto": FA3 on Hopper): the first `dense_layers` fraction of the video attention
layers, the first `dense_steps` fraction of the denoising steps, and every other Attention (cross-attention
over text or image tokens). Defaults are the SVG repository's Wan settings: budget 0.25, dense_steps 0.075,
dense_layers 0.025, 64 profiling rows; chunks of 2048 tokens (16 FA3 query tiles: a chunk's window is at
most 2048 tokens wider than its narrowest row needs, 2.4% of the keys at 84,480 tokens).

The geometry comes from the model, never from the sequence length: the model class declares `video_attention`
(fnmatch patterns of its Attention modules whose q/k/v are its video tokens alone, in (t, h, w) row-major
order) and its forward calls `set_video_grid(self, (t, h, w))`. The step comes from the pipeline
(`attention_step`). Under Ulysses each rank holds whole sequences of its own heads, which svg classifies and
runs as in one process; Ring splits the sequence (a rank would see some frames only): svg refuses it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import itertools
import logging
import math
import warnings
import weakref
from dataclasses import dataclass

import torch

from dit_rt.ops.attention.registry import AttentionBackend, AttentionMode, register_mode
from dit_rt.ops.custom import kernel_op

log = logging.getLogger("dit_rt")

# Score elements per profiling chunk (B x heads x samples x keys): bounds its memory at 128-256 MiB.
_PROFILE_CHUNK = 1 << 26


@dataclass(frozen=True)
class SvgConfig:
    """Options of `attention=dict(name="svg", ...)`.

    budget: share of the video query x key pairs each head computes (0 < budget <= 1; 1 is dense).
    dense_steps: the first floor(dense_steps x steps) denoising steps run dense. dense_layers: the first
    floor(dense_layers x layers) video attention layers run dense. samples: query rows profiled per call.
    chunk: the query rows sharing one key window, in tokens. dense: the kernel for everything dense and for
    each chunk ("auto" or a name). mode: "svg" (spatial / temporal windows) or "svg2" (semantic clusters,
    `dit_rt.ops.attention.svg2`: budget is then the share of keys each query cluster keeps; q_clusters /
    k_clusters / kmeans_iters its k-means, fitted on kmeans_sample evenly spaced tokens per head, 0 for all;
    block the block size of its FlexAttention mask, in tokens).
    """

    budget: float = 0.25
    dense_steps: float = 0.075
    dense_layers: float = 0.025
    samples: int = 64
    chunk: int = 2048
    block: int = 128
    dense: str = "auto"
    mode: str = "svg"
    q_clusters: int = 64
    k_clusters: int = 256
    kmeans_iters: int = 5
    kmeans_sample: int = 8192

    @classmethod
    def parse(cls, options: dict) -> SvgConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(f"attention 'svg' takes options {names}; unknown: {unknown}")
        config = cls(**options)
        for name in ("budget", "dense_steps", "dense_layers"):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"attention 'svg': {name} must be a number in [0, 1], got {value!r}")
        if config.budget == 0:
            raise ValueError("attention 'svg': budget must be > 0 (the share of query-key pairs computed)")
        for name in ("samples", "chunk", "block", "q_clusters", "k_clusters", "kmeans_iters"):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"attention 'svg': {name} must be a positive int, got {value!r}")
        n = config.kmeans_sample
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(
                f"attention 'svg': kmeans_sample must be an int >= 0 (0: every token), got {n!r}"
            )
        if config.mode not in ("svg", "svg2"):
            raise ValueError(f"attention 'svg': mode must be 'svg' or 'svg2', got {config.mode!r}")
        if not isinstance(config.dense, str):
            raise ValueError(f"attention 'svg': dense must be a backend name, got {config.dense!r}")
        return config


# ------------------------------------------------------------------------------------------------ layout


def to_token_major(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """[B, F*S, ...] frame-major (the model's order) -> [B, S*F, ...] token-major: the tokens of one place
    in every frame become neighbours (S = height * width tokens per frame)."""
    frames = grid[0]
    return x.unflatten(1, (frames, -1)).transpose(1, 2).flatten(1, 2)


def to_frame_major(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """The inverse of `to_token_major`."""
    frames = grid[0]
    return x.unflatten(1, (-1, frames)).transpose(1, 2).flatten(1, 2)


def chunks(tokens: int, chunk: int, radius: int) -> list[tuple[int, int, int, int]]:
    """(a, b, lo, hi) per query chunk [a, b): its key window [lo, hi) = [a - radius, b + radius) clipped."""
    return [
        (a, min(a + chunk, tokens), max(0, a - radius), min(tokens, a + chunk + radius))
        for a in range(0, tokens, chunk)
    ]


def window_share(tokens: int, chunk: int, radius: int) -> float:
    """The share of the tokens x tokens query-key pairs the windows compute."""
    return sum((b - a) * (hi - lo) for a, b, lo, hi in chunks(tokens, chunk, radius)) / tokens**2


def window_radius(tokens: int, chunk: int, budget: float) -> int:
    """The widest radius r (tokens) with window_share <= budget; at least 0 (each chunk's own keys alone)."""
    lo, hi = 0, tokens  # share(0) may exceed the budget: 0 is the floor; share(tokens) = 1
    if window_share(tokens, chunk, hi) <= budget:
        return hi
    while hi - lo > 1:  # invariant: share(hi) > budget, and share(lo) <= budget unless lo == 0
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if window_share(tokens, chunk, mid) <= budget else (lo, mid)
    return lo


def window_mask(rows: torch.Tensor, cols: torch.Tensor, chunk: int, radius: int, tokens: int) -> torch.Tensor:
    """[len(rows), len(cols)] bool: the keys (positions cols) in the window of each query position in rows."""
    a = rows // chunk * chunk
    lo, hi = (a - radius).clamp(min=0), (a + chunk + radius).clamp(max=tokens)
    return (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])


@dataclass(frozen=True)
class SvgPlan:
    """Everything svg needs for one geometry, built once: perm[p] is the frame-major index of token-major
    position p, inv its inverse, ident the identity; rows the profiled query rows; masks [2, rows, N] the
    spatial and temporal window of those rows over the keys in frame-major order; windows (a, b, lo, hi) per
    query chunk."""

    grid: tuple[int, int, int]
    chunk: int
    radius: int
    perm: torch.Tensor
    inv: torch.Tensor
    ident: torch.Tensor
    rows: torch.Tensor
    masks: torch.Tensor
    windows: tuple[tuple[int, int, int, int], ...]

    @property
    def share(self) -> float:
        """The share of query-key pairs computed."""
        return window_share(len(self.ident), self.chunk, self.radius)


@functools.lru_cache(maxsize=16)
def make_plan(
    grid: tuple[int, int, int], chunk: int, budget: float, samples: int, device: torch.device
) -> SvgPlan:
    n = math.prod(grid)
    ident = torch.arange(n, device=device)
    perm = to_token_major(ident[None], grid)[0]
    inv = torch.empty_like(perm)
    inv[perm] = ident
    radius = window_radius(n, chunk, budget)
    m = min(samples, n)
    rows = (torch.arange(m, device=device) * n) // m + (n // m) // 2  # evenly spaced
    masks = torch.stack([window_mask(x[rows], x, chunk, radius, n) for x in (ident, inv)])
    return SvgPlan(grid, chunk, radius, perm, inv, ident, rows, masks, tuple(chunks(n, chunk, radius)))


# ------------------------------------------------------------------------------------------------ math


def profile(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SvgPlan, scale: float) -> torch.Tensor:
    """Mean squared error of the plan's sampled rows under the spatial and the temporal pattern against exact
    attention: q/k/v [B, N, H, D] -> err float32 [B, H, 2] (0: spatial, 1: temporal).

    One softmax per row over all keys; a pattern's attention is those weights restricted to its keys and
    renormalised (the same distribution as a softmax over the kept keys alone), so the scores [B, h, m, N]
    are formed and exponentiated once, in the model dtype: at 84,480 keys these few passes over them are the
    whole cost. A pattern that keeps no weight at all (every kept logit ~87 below the row's largest) gets a
    zero output, hence the largest error."""
    B, N, H, _ = q.shape
    qs = (q[:, plan.rows] * scale).transpose(1, 2)  # [B, H, m, D]
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # [B, H, N, D] views
    chunk = max(1, _PROFILE_CHUNK // (B * len(plan.rows) * N))
    errs = []
    for h in range(0, H, chunk):
        p = (qs[:, h : h + chunk] @ kt[:, h : h + chunk].transpose(-1, -2)).softmax(-1)  # [B, h, m, N]
        vh = vt[:, h : h + chunk]
        exact = (p @ vh).float()  # [B, h, m, D]
        err = []
        for mask in plan.masks:  # [m, N]
            kept = p * mask
            total = kept.sum(-1, keepdim=True, dtype=torch.float32)  # [B, h, m, 1]
            o = (kept @ vh).float() / total.clamp_min(torch.finfo(torch.float32).tiny)
            err.append((o - exact).square().mean(dim=(-1, -2)))  # [B, h]
        errs.append(torch.stack(err, dim=-1))
    return torch.cat(errs, dim=1)


def place(x: torch.Tensor, temporal: torch.Tensor, plan: SvgPlan) -> torch.Tensor:
    """x [B, N, H, D] frame-major -> [B, N, H, D] with the heads where temporal [B, H] is True in token-major
    order: one gather."""
    idx = torch.where(temporal[:, None], plan.perm[:, None], plan.ident[:, None])  # [B, N, H]
    return x.gather(1, idx[..., None].expand(-1, -1, -1, x.shape[-1]))


def unplace(o: torch.Tensor, temporal: torch.Tensor, plan: SvgPlan) -> torch.Tensor:
    """The inverse of `place`: o [B, N, H, D] -> [B, N, H, D] frame-major: one gather."""
    idx = torch.where(temporal[:, None], plan.inv[:, None], plan.ident[:, None])  # [B, N, H]
    return o.gather(1, idx[..., None].expand(-1, -1, -1, o.shape[-1]))


def window_attention(q, k, v, plan: SvgPlan, scale: float, kernel) -> torch.Tensor:
    """Attention under the plan's windows: q/k/v [B, N, H, D] -> [B, N, H, D]; per query chunk one call of
    kernel(q, k, v, scale) (a dense backend) on the chunk's queries and its window's keys, every head."""
    parts = [kernel(q[:, a:b], k[:, lo:hi], v[:, lo:hi], scale) for a, b, lo, hi in plan.windows]
    return torch.cat(parts, dim=1)


@functools.cache
def _flex(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def block_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scale: float) -> torch.Tensor:
    """FlexAttention under a BlockMask: q/k/v [B, H, N, D] -> [B, H, N, D]; one kernel call."""
    flex = _flex(q.device.type)
    if q.device.type == "cuda":
        return flex(q, k, v, block_mask=block_mask, scale=scale)
    with warnings.catch_warnings():  # "called without torch.compile": expected here, see the module docstring
        warnings.simplefilter("ignore", UserWarning)
        return flex(q, k, v, block_mask=block_mask, scale=scale)


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SvgPlan, scale: float, kernel
) -> tuple[torch.Tensor, torch.Tensor]:
    """Profile, place, attend, unplace: q/k/v [B, N, H, D] -> (out [B, N, H, D], temporal bool [B, H]);
    kernel the dense backend each window runs on."""
    temporal = profile(q, k, v, plan, scale).argmin(dim=-1).bool()  # [B, H]
    o = window_attention(*(place(x, temporal, plan) for x in (q, k, v)), plan, scale, kernel)
    return unplace(o, temporal, plan), temporal


# ------------------------------------------------------------------------------------------------ the op


_warned: set[str] = set()
# handle -> op, for the opaque custom op (which takes no Python objects; see SvgAttention).
_OPS: weakref.WeakValueDictionary[int, SvgAttention] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


class SvgAttention:
    """The op of one video self-attention module: called like a backend, op(q, k, v, scale, return_lse),
    q/k/v [B, L, H, D] over the model's video tokens (L may exceed them by Ulysses' end padding: those query
    rows run dense, their output is dropped by the gather). `temporal` keeps the last classification.

    Under torch.compile it is one opaque custom op, `dit_rt::svg_attention`: its choices (dense or sparse at
    this step, the per-head classification) would otherwise become guards and recompile every step.
    """

    name = "svg"
    lse = True  # so that Ring attention calls this op and gets its error, not a silent dense fallback
    takes_codes = False

    def __init__(self, config: SvgConfig, dense: AttentionBackend, context, dense_layer: bool):
        self.config = config
        self.dense = dense
        self.context = context  # the model's AttentionContext: grid and step
        self.dense_layer = dense_layer
        self.temporal: torch.Tensor | None = None
        self.handle = next(_HANDLES)
        _OPS[self.handle] = self

    def runs_dense(self) -> bool:
        if self.dense_layer:
            return True
        c = self.context
        if c.num_steps is None:
            if self.config.dense_steps > 0 and "step" not in _warned:
                _warned.add("step")
                log.warning(
                    "svg: no denoising step was reported (dit_rt.ops.attention.attention_step), so the dense "
                    "warm-up steps are skipped"
                )
            return False
        return c.step < math.floor(self.config.dense_steps * c.num_steps)

    def __call__(self, q, k, v, scale: float | None = None, return_lse: bool = False):
        if return_lse:
            raise NotImplementedError(
                "attention 'svg' does not run under Ring attention: Ring splits the video tokens over ranks, "
                "so a rank would classify and mask heads on some frames only; use parallel ulysses= instead"
            )
        if torch.compiler.is_compiling():
            return _opaque_svg(q, k, v, scale, self.handle)
        return self.run(q, k, v, scale)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        grid = self.context.grid
        if grid is None:
            raise RuntimeError(
                "attention 'svg': the model declared no video grid (its forward must call "
                "dit_rt.ops.attention.set_video_grid(self, (frames, height, width)) before its blocks)"
            )
        n = math.prod(grid)
        if k.shape[1] != n or q.shape[1] < n:
            raise ValueError(
                f"attention 'svg': {q.shape[1]} queries and {k.shape[1]} keys, but the declared video grid "
                f"{grid} has {n} tokens (a sequence split over ranks, as by Ring attention, is not supported)"
            )
        if k.shape[2] != q.shape[2]:
            raise NotImplementedError("attention 'svg' takes no grouped key/value heads")
        if self.runs_dense():
            return self.dense(q, k, v, scale)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        c = self.config
        if c.mode == "svg2":
            from dit_rt.ops.attention.svg2 import semantic_attention

            args = (
                c.budget,
                c.q_clusters,
                c.k_clusters,
                c.kmeans_iters,
                c.block,
                block_sparse,
                c.kmeans_sample,
            )
            out, _ = semantic_attention(q[:, :n], k, v, scale, *args)
        else:
            plan = make_plan(grid, c.chunk, c.budget, c.samples, q.device)
            out, self.temporal = sparse_attention(q[:, :n], k, v, plan, scale, self.dense)
        if q.shape[1] > n:  # Ulysses' padding queries
            out = torch.cat([out, self.dense(q[:, n:], k, v, scale)], dim=1)
        return out


@kernel_op("dit_rt::svg_attention", mutates_args=())
def _opaque_svg(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, handle: int
) -> torch.Tensor:
    return _OPS[handle].run(q, k, v, scale).contiguous()


@_opaque_svg.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, handle: int) -> torch.Tensor:
    return q.new_empty((*q.shape[:3], v.shape[-1]))  # [B, L, H, Dv] in q's dtype


def video_attention_modules(model) -> list:
    """The Attention modules the model declares (`video_attention` name patterns) as attending over its video
    tokens, in layer order; [] for a model that declares none."""
    from dit_rt.ops.attention import Attention

    patterns = getattr(model, "video_attention", None) or ()
    return [
        m
        for name, m in model.named_modules()
        if isinstance(m, Attention) and any(fnmatch.fnmatchcase(name, p) for p in patterns)
    ]


def bind(model, config: SvgConfig, dense) -> dict:
    """The svg ops for the model's declared video attention modules (see the module docstring)."""
    from dit_rt.ops.attention import attention_context

    owner = type(model).__name__
    patterns = getattr(model, "video_attention", None)
    if not patterns:
        raise ValueError(
            f"attention 'svg' needs a video model: {owner} declares no `video_attention` (the Attention "
            "modules over its video tokens) and no video grid"
        )
    modules = video_attention_modules(model)
    if not modules:
        raise ValueError(f"attention 'svg': no Attention module of {owner} matches {list(patterns)}")
    context = attention_context(model)
    first = math.floor(config.dense_layers * len(modules))
    return {m: SvgAttention(config, dense(m), context, i < first) for i, m in enumerate(modules)}


SVG = register_mode(AttentionMode("svg", SvgConfig.parse, bind, ring=False))
