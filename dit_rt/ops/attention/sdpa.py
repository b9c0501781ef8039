"""`sdpa`: PyTorch scaled_dot_product_attention, the always-available backend.

On CUDA the inputs are copied to contiguous (B, H, L, D) and cuDNN is put first: on sm90 cuDNN reaches
629 TFLOP/s on contiguous (B, H, S, D) but 568 on a (B, S, H, D) tensor viewed as (B, H, S, D), and
the three copies cost ~2% of the attention at Wan sizes (shared/device/README.md).

The log-sum-exp comes from the fused kernels that produce it anyway (cuDNN or FlashAttention-2 on
CUDA, the flash kernel on CPU); other cases (float32 on CUDA, head_dim > 256) take an explicit
O(Lq * Lk) memory path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dit_rt.ops.attention.registry import AttentionBackend, Result, register_backend

_CUDA_PRIORITY = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    # [B, Hk, L, D] -> [B, H, L, D]: the LSE kernels take no grouped-query heads.
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def math_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax attention on (B, H, L, D) in float32 (or float64); returns (out, lse (B, H, Lq))."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    s = torch.einsum("bhqd,bhkd->bhqk", q.to(acc), k.to(acc)) * scale  # [B, H, Lq, Lk]
    lse = torch.logsumexp(s, dim=-1)  # [B, H, Lq]
    out = torch.einsum("bhqk,bhkd->bhqd", torch.exp(s - lse[..., None]), v.to(acc))
    return out.to(q.dtype), lse.float()


def _lse_attention(q, k, v, scale) -> tuple[torch.Tensor, torch.Tensor]:
    # q/k/v [B, H, L, D]
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    half = q.dtype in (torch.bfloat16, torch.float16)
    if q.is_cuda and half and q.shape[-1] <= 128:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, scale=scale)[:2]
    elif q.is_cuda and half and q.shape[-1] <= 256:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[:2]
    elif q.device.type == "cpu" and q.dtype != torch.float64:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
    else:
        return math_attention(q, k, v, scale)
    # cuDNN returns the statistics as [B, H, Lq, 1] in some versions.
    return out, lse.reshape(q.shape[:3]).float()


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, return_lse: bool) -> Result:
    """q (B, Lq, H, D), k/v (B, Lk, Hk, D) -> (B, Lq, H, D) [, lse float32 (B, H, Lq)]."""
    gqa = k.shape[2] != q.shape[2]
    if q.is_cuda:
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, H, L, D], dense for cuDNN
    else:
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, L, D] views
    if return_lse:
        out, lse = _lse_attention(q, k, v, scale)
        return out.transpose(1, 2), lse
    if q.is_cuda:
        with sdpa_kernel(_CUDA_PRIORITY, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)  # [B, Lq, H, D]


SDPA = register_backend(AttentionBackend("sdpa", sdpa, auto_rank=100))
