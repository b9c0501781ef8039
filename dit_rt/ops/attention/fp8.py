"""FP8 (e4m3) quantization of attention inputs with real scales, for `fa3-fp8` given model-dtype tensors.

A raw cast to e4m3 clips at 448 and flushes small values; instead each (batch, head group) - or each
(batch, head group, block of tokens) - gets descale = amax / 448, and x ~ data * descale. FA3 takes
the per-(batch, kv head) descales directly. Plain torch costs ~0.5 ms per tensor at Wan 1.3B size
(abs, amax, divide, cast: several full passes); the Triton path reads x twice (block amax, then
quantize) and writes one byte per element. Inputs that arrive as `Fp8Codes` skip this: their producer
(the QK-norm + RoPE kernel, `dit_rt.ops.fused_ops`) wrote e4m3 with a static per-tensor scale already.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch

from dit_rt.ops.custom import kernel_op

E4M3_MAX = 448.0
_TINY = 1e-12  # an all-zero group still gets a finite descale


@dataclass
class Fp8Tensor:
    """data (B, L, H, D) float8_e4m3fn; descale float32 (B, S) or (B, S, ceil(L / block)), where the
    S scale groups each cover H // S consecutive heads; x ~ data * descale."""

    data: torch.Tensor
    descale: torch.Tensor
    block: int | None = None


def _check(x: torch.Tensor, num_scales: int | None, block: int | None) -> int:
    if x.ndim != 4:
        raise ValueError(f"expected (B, L, H, D), got shape {tuple(x.shape)}")
    heads = x.shape[2]
    num_scales = heads if num_scales is None else num_scales
    if heads % num_scales:
        raise ValueError(f"{heads} heads do not split into {num_scales} scale groups")
    if block is not None and (block < 16 or block & (block - 1)):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    return num_scales


def _descale(partial: torch.Tensor, num_scales: int, per_block: bool) -> torch.Tensor:
    # partial amax [B, H, NB] -> descale [B, S, NB] (per block) or [B, S]
    b, h, nb = partial.shape
    amax = partial.view(b, num_scales, h // num_scales, nb).amax(dim=2)
    if not per_block:
        amax = amax.amax(dim=-1)
    return amax.float().clamp_min(_TINY) / E4M3_MAX


def _expand(descale: torch.Tensor, length: int, heads: int, block: int | None) -> torch.Tensor:
    # descale [B, S] or [B, S, NB] -> [B, L or 1, H, 1], broadcastable against x
    d = descale.repeat_interleave(heads // descale.shape[1], dim=1)  # [B, H(, NB)]
    if block is None:
        return d[:, None, :, None]
    d = d.repeat_interleave(block, dim=2)[:, :, :length]  # [B, H, L]
    return d.transpose(1, 2)[..., None]


def _quantize_torch(x: torch.Tensor, num_scales: int, block: int | None) -> Fp8Tensor:
    b, length, heads, dim = x.shape
    if block is None:
        partial = x.abs().amax(dim=(1, 3))[..., None]  # [B, H, 1]
    else:
        nb = -(-length // block)
        padded = torch.nn.functional.pad(x.abs(), (0, 0, 0, 0, 0, nb * block - length))
        partial = padded.view(b, nb, block, heads, dim).amax(dim=(2, 4)).transpose(1, 2)  # [B, H, NB]
    descale = _descale(partial, num_scales, block is not None)
    y = (x.float() / _expand(descale, length, heads, block)).clamp(-E4M3_MAX, E4M3_MAX)
    return Fp8Tensor(y.to(torch.float8_e4m3fn), descale, block)


@functools.cache
def _kernels():
    """Build the Triton kernels on first use (triton is imported here, never at `import dit_rt`)."""
    import triton
    import triton.language as tl

    @triton.jit
    def amax_kernel(x_ptr, out_ptr, L, H, sb, sl, sh, D: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr):
        # One program per (token block, batch * head): out[b, h, block] = max |x| over the tile.
        pid_l, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // H, pid_bh % H
        rows = pid_l * BL + tl.arange(0, BL)
        cols = tl.arange(0, BD)
        mask = (rows[:, None] < L) & (cols[None, :] < D)
        x = tl.load(x_ptr + b * sb + h * sh + rows[:, None] * sl + cols[None, :], mask=mask, other=0.0)
        tl.store(out_ptr + pid_bh * tl.num_programs(0) + pid_l, tl.max(tl.abs(x.to(tl.float32))))

    @triton.jit
    def quant_kernel(
        x_ptr,
        y_ptr,
        d_ptr,
        L,
        H,
        G,
        NB,
        sb,
        sl,
        sh,
        yb,
        yl,
        yh,
        D: tl.constexpr,
        BL: tl.constexpr,
        BD: tl.constexpr,
        PER_BLOCK: tl.constexpr,
    ):
        pid_l, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // H, pid_bh % H
        blk = pid_l if PER_BLOCK else 0
        d = tl.load(d_ptr + (b * (H // G) + h // G) * NB + blk)
        rows = pid_l * BL + tl.arange(0, BL)
        cols = tl.arange(0, BD)
        mask = (rows[:, None] < L) & (cols[None, :] < D)
        x = tl.load(x_ptr + b * sb + h * sh + rows[:, None] * sl + cols[None, :], mask=mask, other=0.0)
        y = tl.clamp(x.to(tl.float32) / d, -448.0, 448.0)
        tl.store(y_ptr + b * yb + h * yh + rows[:, None] * yl + cols[None, :], y.to(tl.float8e4nv), mask=mask)

    return triton, amax_kernel, quant_kernel


def _quantize_triton(x: torch.Tensor, num_scales: int, block: int | None) -> Fp8Tensor:
    # Through a custom op (fake below), so compiled blocks trace through the quantization.
    y, descale = _quantize_triton_op(x, num_scales, block or 0)
    return Fp8Tensor(y, descale, block)


@kernel_op("dit_rt::fp8_quantize_heads", mutates_args=())
def _quantize_triton_op(x: torch.Tensor, num_scales: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = _quantize_triton_eager(x, num_scales, block or None)
    return t.data, t.descale


@_quantize_triton_op.register_fake
def _(x, num_scales, block):
    b, length = x.shape[:2]
    y = x.new_empty(x.shape, dtype=torch.float8_e4m3fn)
    scales = (b, num_scales, -(-length // block)) if block else (b, num_scales)
    return y, x.new_empty(scales, dtype=torch.float32)


def _quantize_triton_eager(x: torch.Tensor, num_scales: int, block: int | None) -> Fp8Tensor:
    triton, amax_kernel, quant_kernel = _kernels()
    b, length, heads, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    bl = block or 64
    bd = triton.next_power_of_2(dim)
    grid = (triton.cdiv(length, bl), b * heads)
    partial = torch.empty(b, heads, grid[0], device=x.device, dtype=torch.float32)
    amax_kernel[grid](x, partial, length, heads, x.stride(0), x.stride(1), x.stride(2), dim, bl, bd)
    descale = _descale(partial, num_scales, block is not None)
    y = torch.empty(x.shape, device=x.device, dtype=torch.float8_e4m3fn)
    d = descale if block is not None else descale[..., None]  # [B, S, NB'] with NB' = NB or 1
    quant_kernel[grid](
        x, y, d, length, heads, heads // num_scales, d.shape[-1],
        x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        dim, bl, bd, block is not None,
    )  # fmt: skip
    return Fp8Tensor(y, descale, block)


_HAVE_TRITON = importlib.util.find_spec("triton") is not None  # decided without importing it


def _triton_ok() -> bool:
    return _HAVE_TRITON


def quantize_fp8(
    x: torch.Tensor,
    *,
    num_scales: int | None = None,
    block: int | None = None,
    use_triton: bool | None = None,
) -> Fp8Tensor:
    """Quantize (B, L, H, D) to e4m3 with one scale per (batch, head group[, block of `block` tokens]).

    num_scales: scale groups over the heads (default H; FA3 wants the number of kv heads, so a GQA
    query shares the scale of its kv head). use_triton: default on CUDA when triton imports; the
    torch path computes the same numbers and runs anywhere (CPU CI).
    """
    num_scales = _check(x, num_scales, block)
    if use_triton is None:
        use_triton = x.is_cuda and _triton_ok()
    if use_triton:
        return _quantize_triton(x, num_scales, block)
    return _quantize_torch(x, num_scales, block)


def dequantize_fp8(t: Fp8Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """data * descale, (B, L, H, D) in `dtype`."""
    _, length, heads, _ = t.data.shape
    return (t.data.float() * _expand(t.descale, length, heads, t.block)).to(dtype)
