"""GroupNorm for channels-last images (the AutoencoderKL of FLUX.1 / FLUX.2 decodes in channels-last).

PyTorch's CUDA GroupNorm is the decode's largest cost: its statistics kernel (one program per (batch, group)
row of an NCHW tensor) runs at a fraction of memory bandwidth at 1024^2, and on a channels-last input it
first copies the tensor to NCHW and returns NCHW, which the next convolution converts back. Here two Triton
passes work on the channels-last rows as they lie: per-chunk group statistics (mean and centred sum of
squares, fp32), merged over the chunks with Chan's formula in float64, then one normalize + affine pass that
writes channels-last. The result equals F.group_norm up to the order of the fp32 sums.

`GroupNorm` is an nn.GroupNorm (same parameters and checkpoint keys; isinstance checks, e.g. the parallel
VAE's frame statistics, still find it) whose forward takes the Triton path on CUDA for channels-last bf16 /
fp16 inputs and is F.group_norm everywhere else.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from dit_rt.ops.custom import kernel_op

_HAVE_TRITON = importlib.util.find_spec("triton") is not None
_STATS_ROWS = 512  # channels-last rows per statistics program


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def gn_stats_kernel(
        x_ptr, part_ptr, HW, C, stride_b, ROWS: tl.constexpr, R: tl.constexpr, G: tl.constexpr,
        CG: tl.constexpr,
    ):  # fmt: skip
        # Program (chunk, b): rows [chunk*ROWS, chunk*ROWS + ROWS) of batch b, R rows of all C = G*CG
        # channels at a time. Per group: count, mean and centred sum of squares of the chunk, the sums
        # shifted by the group mean of the chunk's first tile (no cancellation in E[x^2] - E[x]^2).
        chunk, b = tl.program_id(0), tl.program_id(1)
        cols = tl.arange(0, G * CG)
        base = x_ptr + b.to(tl.int64) * stride_b
        r0 = chunk * ROWS
        rows = r0 + tl.arange(0, R)
        x = tl.load(
            base + rows[:, None].to(tl.int64) * C + cols[None, :], mask=(rows < HW)[:, None], other=0.0
        )
        first = tl.minimum(HW - r0, R).to(tl.float32) * CG  # valid elements per group in the first tile
        pivot = tl.sum(tl.sum(tl.reshape(x.to(tl.float32), (R, G, CG)), axis=2), axis=0) / first
        s = tl.zeros((G,), tl.float32)
        ss = tl.zeros((G,), tl.float32)
        for start in range(r0, r0 + ROWS, R):
            rows = start + tl.arange(0, R)
            valid = (rows < HW)[:, None, None]
            x = tl.load(
                base + rows[:, None].to(tl.int64) * C + cols[None, :], mask=(rows < HW)[:, None], other=0.0
            )
            d = tl.where(valid, tl.reshape(x.to(tl.float32), (R, G, CG)) - pivot[None, :, None], 0.0)
            s += tl.sum(tl.sum(d, axis=2), axis=0)
            ss += tl.sum(tl.sum(d * d, axis=2), axis=0)
        n = tl.minimum(HW - r0, ROWS).to(tl.float32) * CG
        mean = pivot + s / n
        m2 = ss - s * s / n
        n = tl.full((G,), 0.0, tl.float32) + n
        out = part_ptr + ((b * tl.num_programs(0) + chunk) * G + tl.arange(0, G)) * 3
        tl.store(out, n)
        tl.store(out + 1, mean)
        tl.store(out + 2, m2)

    @triton.jit
    def gn_apply_kernel(
        x_ptr, out_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, HW, C, stride_b, R: tl.constexpr,
        BLOCK_C: tl.constexpr, CG: tl.constexpr, G: tl.constexpr,
    ):  # fmt: skip
        chunk, b = tl.program_id(0), tl.program_id(1)
        cols = tl.arange(0, BLOCK_C)
        cmask = cols < C
        grp = b * G + cols // CG
        mean = tl.load(mean_ptr + grp, mask=cmask, other=0.0)[None, :]
        rstd = tl.load(rstd_ptr + grp, mask=cmask, other=0.0)[None, :]
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        bias = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        rows = chunk * R + tl.arange(0, R)
        mask = (rows < HW)[:, None] & cmask[None, :]
        offs = b.to(tl.int64) * stride_b + rows[:, None].to(tl.int64) * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * w + bias
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    return triton, gn_stats_kernel, gn_apply_kernel


def _channels_last_rows(x: torch.Tensor) -> bool:
    """Whether [B, C, H, W] is channels-last within each batch item (rows of C channels in a row)."""
    if x.dim() != 4:
        return False
    _, C, H, W = x.shape
    return x.stride()[1:] == (1, W * C, C)


def group_stats(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) [B, G] in float64 of a channels-last [B, C, H, W] tensor, by the Triton statistics
    pass (per-chunk fp32 moments merged with Chan's formula)."""
    triton, stats, _ = _kernels()
    B, C, H, W = x.shape
    HW, cg = H * W, C // groups
    R = max(1, 4096 // C)
    rows = max(R, _STATS_ROWS // R * R)
    chunks = triton.cdiv(HW, rows)
    part = torch.empty(B, chunks, groups, 3, device=x.device, dtype=torch.float32)
    stats[(chunks, B)](x, part, HW, C, x.stride(0), ROWS=rows, R=R, G=groups, CG=cg, num_warps=4)
    part = part.double()
    n, mean, m2 = part.unbind(-1)  # [B, chunks, G]
    total = n.sum(1)
    gmean = (n * mean).sum(1) / total
    gm2 = (m2 + n * (mean - gmean[:, None]) ** 2).sum(1)
    return gmean, gm2 / total


@kernel_op("dit_rt::group_norm_cl", mutates_args=())
def _group_norm_cl(
    x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    triton, _, apply = _kernels()
    B, C, H, W = x.shape
    mean, var = group_stats(x, groups)
    rstd = (var + eps).rsqrt()
    out = torch.empty_like(x, memory_format=torch.channels_last)
    block_c = triton.next_power_of_2(C)
    R = max(1, 8192 // block_c)
    apply[(triton.cdiv(H * W, R), B)](
        x, out, mean.float().contiguous(), rstd.float().contiguous(), weight, bias, H * W, C, x.stride(0),
        R=R, BLOCK_C=block_c, CG=C // groups, G=groups, num_warps=4,
    )  # fmt: skip
    return out


@_group_norm_cl.register_fake
def _(x, groups, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.channels_last)


def _triton_ok(x: torch.Tensor, groups: int) -> bool:
    C = x.shape[1] if x.dim() == 4 else 0
    return (
        _HAVE_TRITON
        and x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and _channels_last_rows(x)
        and C % groups == 0
        and (C // groups) & (C // groups - 1) == 0  # the statistics tile reshapes rows into (G, C/G)
        and groups & (groups - 1) == 0
        and C <= 1024
    )


def group_norm(
    x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
):
    """F.group_norm(x, groups, weight, bias, eps), channels-last in and out on the Triton path."""
    if weight is not None and bias is not None and _triton_ok(x, groups):
        return _group_norm_cl(x, groups, weight.to(x.dtype), bias.to(x.dtype), eps)
    return F.group_norm(x, groups, weight, bias, eps)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose CUDA channels-last forward runs the Triton passes above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
