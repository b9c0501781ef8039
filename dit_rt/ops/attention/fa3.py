"""`fa3` and `fa3-fp8`: the FlashAttention-3 forward kernels (Hopper).

The kernel comes from `flash_attn_interface` (a flash-attention/hopper build) when installed, else
from the prebuilt `fa3-fwd` wheel (`fa3_fwd_interface`, bf16 and fp8 only). Both take (B, S, H, D)
directly, so no layout copies. Measured on an H200: 668-704 TFLOP/s bf16, 926-943 fp8.

The call goes through the custom op `dit_rt::fa3_fwd` so torch.compile(fullgraph=True) traces it.
Its CPU kernel is an emulation (fp8 inputs dequantized with their descales, then exact attention in
float32) that gives CI the numerics of the fp8 path and lets opcheck run without a GPU.
"""

import functools

import torch

from dit_rt.ops.attention.fp8 import quantize_fp8
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
from dit_rt.ops.attention.sdpa import math_attention
from dit_rt.ops.codes import Fp8Codes
from dit_rt.ops.custom import kernel_op

FP8 = (torch.float8_e4m3fn,)
MODULES = ("flash_attn_interface", "fa3_fwd_interface")


@functools.cache
def fa3_module():
    """The first importable FA3 interface module, or None when none is installed; raises BrokenPackage
    when one is installed but none imports (fa3-fwd under a CPU-only torch: libc10_cuda.so). Imported on
    first use only."""
    broken = None
    for name in MODULES:
        try:
            module = optional_import(name)
        except BrokenPackage as e:
            broken = broken or e
            continue
        if module is not None:
            return module
    if broken is not None:
        raise broken
    return None


def _requires() -> Reason:
    try:
        module = fa3_module()
    except BrokenPackage as e:
        return str(e)
    if module is None:
        return "FlashAttention-3 is not installed (pip install fa3-fwd==0.0.3, or flash-attention's hopper/)"
    return None


def _head_dim_reason(head_dim: int | None) -> Reason:
    if head_dim is not None and (head_dim > 256 or head_dim % 8):
        return f"head_dim {head_dim} is not a multiple of 8 up to 256"
    return None


def _capability(device: torch.device) -> tuple[int, int] | None:
    return cuda_capability(device)


def _supports(device: torch.device, dtype: torch.dtype, head_dim: int | None) -> Reason:
    capability = None if device.type != "cuda" else _capability(device)
    if capability is None:
        return needs_cuda(device)
    if capability[0] < 8:
        return "needs sm80 or newer"
    # The fa3-fwd wheel is built without fp16 kernels.
    ok = (
        (torch.bfloat16,) if fa3_module().__name__ == "fa3_fwd_interface" else (torch.bfloat16, torch.float16)
    )
    if dtype not in ok:
        return f"dtype {dtype} not in {ok}"
    return _head_dim_reason(head_dim)


def _supports_fp8(device: torch.device, dtype: torch.dtype, head_dim: int | None) -> Reason:
    capability = None if device.type != "cuda" else _capability(device)
    if capability is None:
        return needs_cuda(device) + "; fp8 attention needs an sm90 (Hopper) GPU"
    if capability != (9, 0):
        return f"fp8 attention needs an sm90 (Hopper) GPU, this one is sm{capability[0]}{capability[1]}"
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {dtype} is not a float type to quantize from"
    return _head_dim_reason(head_dim)


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if dtype in FP8 else dtype


def call_fa3(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The package call: q (B, Lq, H, D), k/v (B, Lk, Hk, D), descales float32 (B, Hk)."""
    reason = _requires()
    if reason is not None:
        raise RuntimeError(reason)
    mod = fa3_module()
    res = mod.flash_attn_func(
        q, k, v, softmax_scale=scale, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
        return_attn_probs=True,
    )  # fmt: skip
    out, lse = res[0], res[1]  # -> (out [B, Lq, H, D], lse [B, H, Lq]); some builds add more outputs
    return out, lse


@kernel_op("dit_rt::fa3_fwd", mutates_args=(), device_types="cuda")
def fa3_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = call_fa3(q, k, v, scale, q_descale, k_descale, v_descale)
    return out, lse.contiguous()


def _dequant(x: torch.Tensor, descale: torch.Tensor | None) -> torch.Tensor:
    # x [B, L, H, D]; descale [B, Hk] shared by the H // Hk heads of each kv group
    if descale is None:
        return x.float()
    d = descale.repeat_interleave(x.shape[2] // descale.shape[1], dim=1)
    return x.float() * d[:, None, :, None]


@fa3_fwd.register_kernel("cpu")
def _fa3_emulated(q, k, v, scale, q_descale=None, k_descale=None, v_descale=None):
    dtype = _out_dtype(q.dtype)
    # [B, L, H, D] -> [B, H, L, D], float32
    qf, kf, vf = (_dequant(x, d).transpose(1, 2) for x, d in ((q, q_descale), (k, k_descale), (v, v_descale)))
    out, lse = math_attention(qf, kf, vf, scale)
    return out.transpose(1, 2).to(dtype).contiguous(), lse


@fa3_fwd.register_fake
def _(q, k, v, scale, q_descale=None, k_descale=None, v_descale=None):
    b, lq, h, _ = q.shape
    out = q.new_empty((b, lq, h, v.shape[-1]), dtype=_out_dtype(q.dtype))
    return out, q.new_empty((b, h, lq), dtype=torch.float32)


def fa3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, return_lse: bool) -> Result:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = fa3_fwd(q, k, v, scale)
    return (out, lse) if return_lse else out


# Short key sequences (text / image cross-attention: 257-514 keys) run in bf16 under `fa3-fp8`: there the
# fp8 kernel is slower (H100, 32,760 queries: 718 vs 656 us at 512 keys and 40 heads, 563 vs 510 us at
# 257; 310 vs 258 us at 512 keys and 12 heads; the pipeline's fill and the softmax dominate, not the
# GEMMs) and it adds e4m3 rounding for nothing. Self-attention over 32,760 keys: fp8 1.17-1.25x faster.
BF16_BELOW_KEYS = 1024


def fp8_operand(x: torch.Tensor | Fp8Codes, heads_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 data [B, L, H, D], descale [B, heads_kv]) for FA3: codes as their producer made them (one
    scale for every head), a tensor quantized here with one scale per (batch, kv head)."""
    if isinstance(x, Fp8Codes):
        return x.q, x.scale.float().view(1, 1).expand(x.q.shape[0], heads_kv).contiguous()
    f = quantize_fp8(x, num_scales=heads_kv)
    return f.data, f.descale


def fa3_fp8(
    q: torch.Tensor | Fp8Codes,
    k: torch.Tensor | Fp8Codes,
    v: torch.Tensor | Fp8Codes,
    scale: float | None,
    return_lse: bool,
) -> Result:
    """Quantize q/k/v to e4m3 with per-(batch, kv head) scales (or take them as producer-made Fp8Codes),
    run FA3 fp8; out in q's (model) dtype. Attention over fewer than `BF16_BELOW_KEYS` keys given as bf16
    / fp16 tensors runs the bf16 kernel instead (see there)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    codes = any(isinstance(x, Fp8Codes) for x in (q, k, v))
    if k.shape[1] < BF16_BELOW_KEYS and not codes and q.dtype in (torch.bfloat16, torch.float16):
        return fa3(q, k, v, scale, return_lse)
    heads_kv = k.shape[2]
    (fq, sq), (fk, sk), (fv, sv) = (fp8_operand(x, heads_kv) for x in (q, k, v))
    out, lse = fa3_fwd(fq, fk, fv, scale, sq, sk, sv)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


FA3 = register_backend(AttentionBackend("fa3", fa3, _requires, _supports, auto_rank=10))
FA3_FP8 = register_backend(AttentionBackend("fa3-fp8", fa3_fp8, _requires, _supports_fp8, takes_codes=True))
