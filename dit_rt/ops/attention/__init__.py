"""The attention seam: one entry point, q/k/v as (batch, seq, heads, head_dim), a registry of backends.

Models hold an `Attention` module and call it; the pipeline picks the backend once and installs it
with `set_attention(model, backend)`. Sequence parallelism wraps the installed op from outside.

Backends (one file each): `sdpa` (always), `fa3` and `fa3-fp8` (FlashAttention-3), `sage`
(sageattention), `trtllm` (TensorRT-LLM), plus any registered with `@register_attention(name)`.
`auto` picks the best lossless one available (fa3, else sdpa). Optional packages import on first
resolution, never at `import dit_rt`.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from dit_rt.ops.attention import fa3, sage, trtllm  # noqa: F401  (registers the backends)
from dit_rt.ops.attention.fp8 import Fp8Tensor, dequantize_fp8, quantize_fp8
from dit_rt.ops.attention.registry import (
    AttentionBackend,
    attention_names,
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
    "Fp8Tensor",
    "attention",
    "attention_names",
    "available_attention",
    "dequantize_fp8",
    "quantize_fp8",
    "register_attention",
    "resolve_attention",
    "set_attention",
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


def _compute_dtype(model: nn.Module) -> torch.dtype:
    # The most common floating parameter dtype: a few fp32-kept norms do not decide it.
    counts = Counter(p.dtype for p in model.parameters() if p.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.get_default_dtype()


def set_attention(
    model: nn.Module,
    backend: str | AttentionBackend = "auto",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
) -> dict[int | None, AttentionBackend]:
    """Resolve `backend` once and install it into every `Attention` module of `model`.

    device and dtype default to the model's (most common floating parameter dtype); head_dim to each
    module's own. Returns the backend chosen per head_dim. Raises before touching any module if the
    backend cannot be used.
    """
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = dtype or _compute_dtype(model)
    dims = {head_dim or m.head_dim for m in modules} or {head_dim}
    chosen = {
        d: resolve_attention(backend, device=device, dtype=dtype, head_dim=d) for d in sorted(dims, key=str)
    }
    for m in modules:
        m.op = chosen[head_dim or m.head_dim]
    return chosen
