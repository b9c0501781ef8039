"""`trtllm`: TensorRT-LLM's fused attention (its PyTorch-flow `TrtllmAttention` backend).

tensorrt_llm cannot be installed on our machines, so this follows its documented PyTorch API and is
exercised only where it is installed; the import stays lazy. TensorRT-LLM attends over packed tokens:
q/k/v as (B * L, H * D) with per-request metadata (every request a full "context" of L tokens, no KV
cache) and a FULL predefined mask. Self-attention only (Lq == Lk); no log-sum-exp.
Its softmax scale is 1 / (q_scaling * sqrt(D)), so a caller's scale s maps to q_scaling = 1 / (s sqrt(D)).
"""

import functools
import importlib
import math

import torch

from dit_rt.ops.attention.registry import (
    AttentionBackend,
    BrokenPackage,
    Reason,
    Result,
    cuda_capability,
    needs_cuda,
    optional_import,
    register_backend,
)
from dit_rt.ops.custom import kernel_op


@functools.cache
def trtllm_api():
    """(get_attention_backend, PredefinedAttentionMask) from tensorrt_llm, or None when it is not installed;
    BrokenPackage when it is installed but fails to import or lacks that API (another version)."""
    utils = optional_import("tensorrt_llm._torch.attention_backend.utils")
    if utils is None:
        return None
    for where in ("tensorrt_llm._torch.attention_backend.interface", "tensorrt_llm._torch.modules.attention"):
        try:
            mask = importlib.import_module(where).PredefinedAttentionMask
        except (ImportError, AttributeError):
            continue
        return utils.get_attention_backend, mask
    raise BrokenPackage(
        "tensorrt_llm is installed but has no PredefinedAttentionMask (an unsupported version)"
    )


def _requires() -> Reason:
    try:
        api = trtllm_api()
    except BrokenPackage as e:
        return str(e)
    return None if api is not None else "tensorrt_llm is not installed (NVIDIA TensorRT-LLM)"


def _supports(device: torch.device, dtype: torch.dtype, head_dim: int | None) -> Reason:
    if cuda_capability(device) is None:
        return needs_cuda(device)
    if dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {dtype} is not bfloat16/float16"
    return None


@functools.cache
def _layer(heads: int, heads_kv: int, head_dim: int, q_scaling: float):
    get_backend, _ = trtllm_api()
    cls = get_backend("TRTLLM")
    return cls(0, heads, head_dim, heads_kv, q_scaling=q_scaling)


@functools.cache
def _metadata(batch: int, length: int):
    get_backend, _ = trtllm_api()
    meta = get_backend("TRTLLM").Metadata(
        max_num_requests=batch,
        max_num_tokens=batch * length,
        kv_cache_manager=None,
        mapping=None,
        runtime_features=None,
    )
    meta.seq_lens = torch.full((batch,), length, dtype=torch.int)
    meta.num_contexts = batch  # every request is a prefill of its whole sequence
    meta.request_ids = list(range(batch))
    meta.max_seq_len = length
    meta.prepare()
    return meta


def call_trtllm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, L, H, D), k/v (B, L, Hk, D) -> (B, L, H, D)."""
    reason = _requires()
    if reason is not None:
        raise RuntimeError(reason)
    api = trtllm_api()
    b, length, heads, d = q.shape
    if k.shape[1] != length:
        raise ValueError(f"trtllm attention is self-attention only: Lq={length}, Lk={k.shape[1]}")
    layer = _layer(heads, k.shape[2], d, 1.0 / (scale * math.sqrt(d)))
    q2, k2, v2 = (x.reshape(b * length, -1) for x in (q, k, v))  # [B * L, H * D], packed tokens
    if layer.support_fused_qkv():
        q2, k2, v2 = torch.cat([q2, k2, v2], dim=-1), None, None
    out = layer.forward(q2, k2, v2, metadata=_metadata(b, length), attention_mask=api[1].FULL)
    return out.view(b, length, heads, d)


@kernel_op("dit_rt::trtllm_fwd", mutates_args=(), device_types="cuda")
def trtllm_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return call_trtllm(q, k, v, scale).contiguous()


@trtllm_fwd.register_fake
def _(q, k, v, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def trtllm(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, return_lse: bool
) -> Result:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return trtllm_fwd(q, k, v, scale)


TRTLLM = register_backend(AttentionBackend("trtllm", trtllm, _requires, _supports, lse=False))
