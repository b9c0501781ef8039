"""`sage`: SageAttention 1.0.6 (Triton; int8 Q.K per block, fp16 P.V).

sageattention 1.0.6 "smooths" K by subtracting its mean over the sequence *in place* (`k -= km`),
which would corrupt the caller's K (reused by CFG, Ring attention, the next block's cache). We
subtract the mean out of place and call it with smooth_k=False: softmax is unchanged because
q.mean_k is the same for every key of a query. The kernel returns no log-sum-exp.
Measured 422-450 TFLOP/s on an H200 (slower than cuDNN there), so `auto` never picks it.
"""

import functools

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
from dit_rt.ops.attention.sdpa import math_attention
from dit_rt.ops.custom import kernel_op

HEAD_DIMS = (64, 96, 128)
Q_BLOCK, K_BLOCK = 128, 64  # the token blocks that share one int8 scale in sageattention 1.0.6


@functools.cache
def sage_module():
    """sageattention, or None when not installed; BrokenPackage when installed but failing to import."""
    return optional_import("sageattention")


def _requires() -> Reason:
    try:
        module = sage_module()
    except BrokenPackage as e:
        return str(e)
    return None if module is not None else "sageattention is not installed (pip install sageattention==1.0.6)"


def _supports(device: torch.device, dtype: torch.dtype, head_dim: int | None) -> Reason:
    capability = cuda_capability(device)
    if capability is None:
        return needs_cuda(device)
    if capability[0] < 8:
        return "needs sm80 or newer"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} is not float16/bfloat16/float32"
    if head_dim is not None and head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} not in {HEAD_DIMS}"
    return None


def call_sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The package call on (B, L, H, D) ("NHD") tensors; never writes to q, k or v."""
    reason = _requires()
    if reason is not None:
        raise RuntimeError(reason)
    mod = sage_module()
    k = k - k.mean(dim=1, keepdim=True)  # a new tensor: the smoothing sageattn would do in place
    q, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, v))
    return mod.sageattn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=scale, smooth_k=False)


@kernel_op("dit_rt::sage_fwd", mutates_args=(), device_types="cuda")
def sage_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return call_sage(q, k, v, scale).contiguous()


def _int8_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    # x [B, H, L, D] float32 -> int8-rounded values, one scale per (b, h, block of tokens)
    b, h, length, d = x.shape
    nb = -(-length // block)
    xp = torch.nn.functional.pad(x, (0, 0, 0, nb * block - length)).view(b, h, nb, block, d)
    s = xp.abs().amax(dim=(3, 4), keepdim=True).clamp_min(1e-12) / 127.0
    r = xp / s
    r = torch.trunc(r + 0.5 * torch.sign(r))  # round half away from zero, as the kernel does
    return (r * s).view(b, h, nb * block, d)[:, :, :length]


@sage_fwd.register_kernel("cpu")
def _sage_emulated(q, k, v, scale):
    """SageAttention's numerics: smoothed K, int8 per-block (scale * Q) and K, fp16 V."""
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))  # [B, H, L, D]
    kf = kf - kf.mean(dim=2, keepdim=True)
    qi, ki = _int8_blocks(qf * scale, Q_BLOCK), _int8_blocks(kf, K_BLOCK)
    out, _ = math_attention(qi, ki, vf.half().float(), scale=1.0)
    return out.transpose(1, 2).to(q.dtype).contiguous()


@sage_fwd.register_fake
def _(q, k, v, scale):
    return q.new_empty((*q.shape[:3], v.shape[-1]))


def sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, return_lse: bool) -> Result:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return sage_fwd(q, k, v, scale)


SAGE = register_backend(AttentionBackend("sage", sage, _requires, _supports, lse=False))
