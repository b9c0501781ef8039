"""The attention seam: one entry point, q/k/v as (batch, seq, heads, head_dim), a registry of backends.

Models hold an `Attention` module and call it; the pipeline picks the backend once and installs it
with `set_attention(model, backend)`. Sequence parallelism wraps the installed op from outside.

Backends (one file each): `sdpa` (always), `fa3` and `fa3-fp8` (FlashAttention-3), `sage`
(sageattention), `trtllm` (TensorRT-LLM), plus any registered with `@register_attention(name)`.
`auto` picks the best lossless one available (fa3, else sdpa). Optional packages import on first
resolution, never at `import dit_rt`.

Attention modes bind to a model instead (`svg`, Sparse VideoGen: `attention=dict(name="svg", ...)`): they
need what only the model and the pipeline know, passed through the seam in the model's `AttentionContext`:
the video token grid of each forward (the model's forward calls `set_video_grid`, and its class declares the
Attention modules over those tokens as `video_attention`) and the denoising step (the pipeline calls
`attention_step`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from dit_rt.ops.attention import fa3, sage, svg, trtllm  # noqa: F401  (registers the backends and modes)
from dit_rt.ops.attention.fp8 import Fp8Tensor, dequantize_fp8, quantize_fp8
from dit_rt.ops.attention.registry import (
    AttentionBackend,
    AttentionMode,
    attention_mode,
    attention_names,
    attention_spec,
    available_attention,
    register_attention,
    resolve_attention,
    unregister_attention,
    unusable_reason,
)
from dit_rt.ops.attention.sdpa import SDPA

__all__ = [
    "Attention",
    "AttentionBackend",
    "AttentionContext",
    "AttentionMode",
    "Fp8Tensor",
    "attention",
    "attention_context",
    "attention_names",
    "attention_step",
    "available_attention",
    "dequantize_fp8",
    "quantize_fp8",
    "register_attention",
    "resolve_attention",
    "set_attention",
    "set_video_grid",
    "unregister_attention",
    "unusable_reason",
]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | AttentionBackend = "sdpa",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention. q (B, Lq, H, D), k/v (B, Lk, Hk, D) with H % Hk == 0.

    scale defaults to 1/sqrt(D). Returns out (B, Lq, H, D) in q's dtype, or with return_lse=True
    (out, lse) where lse is float32 (B, H, Lq): the natural log of sum_k exp(scale * q.k). Backends
    without a log-sum-exp (sage, trtllm) raise NotImplementedError then.
    """
    if isinstance(backend, str):
        backend = resolve_attention(backend, device=q.device, dtype=q.dtype, head_dim=q.shape[-1])
    return backend(q, k, v, scale, return_lse)


class Attention(nn.Module):
    """Parameter-free seam module; `op` is the installed backend, called as op(q, k, v, scale).

    head_dim, when given, lets `set_attention` check the backend against it.
    """

    def __init__(self, head_dim: int | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.op: AttentionBackend = SDPA

    @property
    def takes_fp8_codes(self) -> bool:
        """Whether the installed op takes q/k/v as `Fp8Codes` (per-tensor e4m3 from their producer) as
        well as tensors: a backend declaring `takes_codes` (fa3-fp8), called directly (a sequence-parallel
        wrapper declares nothing, so it gets tensors)."""
        return getattr(self.op, "takes_codes", False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None):
        return self.op(q, k, v, scale)


@dataclass
class AttentionContext:
    """What a model and its pipeline tell attention modes (`svg`) through the seam; one per model.

    grid: (frames, height, width) tokens of the video tokens in this forward, set by the model's forward
    (`set_video_grid`); None before the first forward. step / num_steps: the denoising step (0-based) of
    the next evaluations and the steps of the whole generation, set by the pipeline (`attention_step`);
    None when nothing reported them (a bare transformer call).
    """

    grid: tuple[int, int, int] | None = None
    step: int | None = None
    num_steps: int | None = None


def attention_context(model: nn.Module) -> AttentionContext:
    """The model's AttentionContext, created on first use (a plain attribute: no parameter, no state_dict)."""
    context = model.__dict__.get("_attention_context")
    if context is None:
        context = model.__dict__["_attention_context"] = AttentionContext()
    return context


def set_video_grid(model: nn.Module, grid: tuple[int, int, int]) -> None:
    """Declare the (frames, height, width) token grid of this forward's video tokens (a video model's forward
    calls this before its blocks; the modules named by its `video_attention` attend over exactly those
    tokens, in (t, h, w) row-major order)."""
    attention_context(model).grid = tuple(int(n) for n in grid)


def attention_step(models: nn.Module | Iterable[nn.Module], step: int, num_steps: int) -> None:
    """Tell the models' attention which denoising step (0-based, of num_steps) the next evaluations belong to
    (the shared denoising loop calls this once per step; a mode's dense warm-up reads it)."""
    for m in [models] if isinstance(models, nn.Module) else models:
        context = attention_context(m)
        context.step, context.num_steps = step, num_steps


def _compute_dtype(model: nn.Module) -> torch.dtype:
    # The most common floating parameter dtype: a few fp32-kept norms do not decide it.
    counts = Counter(p.dtype for p in model.parameters() if p.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.get_default_dtype()


def set_attention(
    model: nn.Module,
    backend: str | dict | AttentionBackend = "auto",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
) -> dict[int | None, AttentionBackend]:
    """Resolve `backend` once and install it into every `Attention` module of `model`.

    backend: a backend name or object, "auto", or an attention mode as a name or dict(name=..., **options)
    (`svg`): the mode's ops go into the modules the model declares as video attention, its dense kernel
    into every other. device and dtype default to the model's (most common floating parameter
    dtype); head_dim to each module's own. Returns the (dense) backend chosen per head_dim. Raises before
    touching any module if the backend cannot be used.
    """
    backend, options = attention_spec(backend)
    mode = attention_mode(backend)
    config = mode.parse(options) if mode is not None else None
    if config is not None:
        backend = config.dense
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = dtype or _compute_dtype(model)
    dims = {head_dim or m.head_dim for m in modules} or {head_dim}
    chosen = {
        d: resolve_attention(backend, device=device, dtype=dtype, head_dim=d) for d in sorted(dims, key=str)
    }
    ops = {} if mode is None else mode.bind(model, config, lambda m: chosen[head_dim or m.head_dim])
    for m in modules:
        m.op = ops.get(m) or chosen[head_dim or m.head_dim]
    return chosen
