"""SVDQuant (Li et al., 2024): 4-bit weights and activations, a 16-bit low-rank branch absorbing outliers.

With W (out, in) and per-input-channel smoothing factors lam:
  1. smoothing moves activation outliers into the weight: x' = x / lam, W' = W * lam, where
     lam_j = amax(x_j)^alpha / amax(W_:,j)^(1 - alpha) (alpha = 0.5), amax(x_j) from calibration;
  2. the top-`rank` singular directions of W' (where the migrated outliers now live) form a
     high-precision branch L1 L2 = U_r S_r V_r^T, kept in the model dtype;
  3. the residual R = W' - L1 L2, whose range is now small, is quantized to signed 4-bit integers,
     symmetric per group of 64 inputs (scale = group amax / 7, codes in [-8, 7]);
  4. activations x' are quantized per token per group of 64 the same way (W4A4; `w4a4=False` keeps
     them in 16 bits).
  y = Q(x') Q(R)^T + (x' L2^T) L1^T + b.

Calibration: `record_act_absmax(model)` is a context manager; forwards run inside it store each
Linear's running per-channel |x| max, which `convert("svdquant")` uses for the smoothing (without it,
lam = 1 and only the low-rank branch helps). Kernels: no int4 tensor-core GEMM exists in torch, so
every device runs this emulation (dequantize -> matmul); the Nunchaku fused kernels would be the
fast path. Codes are stored packed, two per byte (low nibble first, offset by 8).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from dit_rt.ops.linear.base import LinearFormat, pad2d, round_up

INT4_MAX = 7.0


def quantize_int4(x: torch.Tensor, group: int):
    """x (R, K), K % group == 0 -> codes (R, K) int8 in [-8, 7] and scales (R, K / group) fp32."""
    g = x.float().unflatten(1, (-1, group))  # [R, K/group, group]
    s = g.abs().amax(dim=2, keepdim=True).clamp(min=1e-12) / INT4_MAX
    q = torch.round(g / s).clamp(-8, INT4_MAX).to(torch.int8)
    return q.flatten(1), s.squeeze(2)


def dequantize_int4(q: torch.Tensor, s: torch.Tensor, group: int) -> torch.Tensor:
    return (q.float().unflatten(1, (-1, group)) * s[..., None]).flatten(1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    u = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
    return u.to(torch.int8) - 8


@contextlib.contextmanager
def record_act_absmax(model: torch.nn.Module):
    """Record, per dit_rt Linear in `model`, the running max of |x| per input channel as `act_absmax`."""
    from dit_rt.ops.linear import Linear

    def hook(m, args):
        x = args[0].detach()
        cur = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        m.act_absmax = cur if getattr(m, "act_absmax", None) is None else torch.maximum(m.act_absmax, cur)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, Linear)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


class SVDQuant(LinearFormat):
    """Options: rank (32), group_size (64), w4a4 (True), alpha (0.5), act_absmax (per-input-channel
    calibration maxima; default: what `record_act_absmax` stored on the module, else no smoothing)."""

    name = "svdquant"

    def convert(self, m, w, *, rank=32, group_size=64, w4a4=True, alpha=0.5, act_absmax=None):
        N, K = w.shape
        if act_absmax is None:
            act_absmax = getattr(m, "act_absmax", None)
        lam = torch.ones(K, device=w.device)
        if act_absmax is not None:
            if act_absmax.shape != (K,):
                raise ValueError(f"act_absmax must have shape ({K},), got {tuple(act_absmax.shape)}")
            a = act_absmax.float().to(w.device).clamp(min=1e-5)
            lam = (a**alpha / w.abs().amax(dim=0).clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        w_s = w * lam  # [N, K]
        rank = min(int(rank), N, K)
        low = torch.zeros_like(w_s)
        if rank > 0:
            U, S, Vh = torch.linalg.svd(w_s, full_matrices=False)
            up, down = U[:, :rank] * S[:rank], Vh[:rank]  # [N, r], [r, K]
            # The branch runs in the model dtype: subtract what it computes, not the fp32 factors.
            up, down = up.to(m.orig_dtype), down.to(m.orig_dtype)
            low = up.float() @ down.float()
            m.register_buffer("lora_up", up)
            m.register_buffer("lora_down", down)
        Kp = round_up(K, group_size)
        q, s = quantize_int4(pad2d(w_s - low, N, Kp), group_size)
        m.register_quant_buffer("qweight", pack_int4(q))
        m.register_quant_buffer("weight_scale", s)
        m.register_quant_buffer("smooth", (1.0 / lam).float())
        m.rank, m.group_size, m.w4a4 = rank, group_size, bool(w4a4)

    def forward(self, m, x):
        Kp = m.qweight.shape[1] * 2
        xs = x.float() * m.smooth  # [M, K], smoothed
        xq = pad2d(xs, xs.shape[0], Kp)
        if m.w4a4:
            xq = dequantize_int4(*quantize_int4(xq, m.group_size), m.group_size)
        w = dequantize_int4(unpack_int4(m.qweight), m.weight_scale, m.group_size)  # [N, Kp]
        y = xq @ w.t()
        if m.rank > 0:
            # 16-bit branch on the unquantized smoothed input, as the fused kernel computes it.
            xl = xs.to(m.lora_down.dtype)
            y = y + F.linear(F.linear(xl, m.lora_down), m.lora_up).float()
        if m.bias is not None:
            y = y + m.bias.float()
        return y.to(x.dtype)
