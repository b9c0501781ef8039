"""Fused elementwise ops of the DiT blocks: LayerNorm + adaLN modulation, gated residual, QK RMSNorm + RoPE
(whole-width or per-head norm, interleaved or split-half RoPE).

In eager PyTorch each of these is 4-8 kernels that stream the whole (B, L, D) activation through fp32
temporaries: at Wan 1.3B 480p (32,760 tokens) they cost more than the linears. On CUDA each op here is one
Triton kernel that reads its input once and writes its output once, computing in fp32 as the reference does;
elsewhere (CPU, or no Triton) the same math runs as plain torch ops, which is what the CPU tests compare
against diffusers. The Triton kernels are `torch.library` custom ops with fake implementations, so
`torch.compile(fullgraph=True)` traces through them. Triton is imported on first use, never at import.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F

from dit_rt.ops.codes import Fp8Codes
from dit_rt.ops.custom import kernel_op

E4M3 = torch.float8_e4m3fn


# RoPE layouts: which channels of a head form the pair rotated by angle j. "interleaved" (Wan, FLUX):
# (x[2j], x[2j+1]); "split_half" (Cosmos, diffusers' `use_real_unbind_dim=-2`, i.e. rotate_half):
# (x[j], x[j + Dh/2]).
ROPE_LAYOUTS = ("interleaved", "split_half")


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "interleaved"
) -> torch.Tensor:
    """Rotate channel pairs (a, b) -> (a cos - b sin, a sin + b cos) of x [B, L, H, Dh] by angles given as
    cos/sin [L, 1, Dh/2] (fp32), computing in fp32; returns x's dtype. `layout` (`ROPE_LAYOUTS`) says
    which channels pair up."""
    if layout == "split_half":
        x1, x2 = x.float().chunk(2, dim=-1)  # [B, L, H, Dh/2] each
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)
    if layout != "interleaved":
        raise ValueError(f"RoPE layout {layout!r}: expected one of {ROPE_LAYOUTS}")
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # [B, L, H, Dh/2] each (strided views)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


# Whether Triton is installed, decided once without importing it (import dit_rt stays lean). A plain
# constant, so torch.compile reads it instead of tracing an import; the kernels build inside the custom ops.
_HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _use_triton(x: torch.Tensor) -> bool:
    return _HAVE_TRITON and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def ln_modulate_kernel(
        x_ptr, out_ptr, shift_ptr, scale_ptr, qinv_ptr, r_ptr, sum_ptr, gate_ptr, L, D, eps, stride_xb,
        stride_xr, stride_mb, stride_gb, RPP, CPM, CPG, HAS_MOD: tl.constexpr, QUANT: tl.constexpr,
        HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # RPP token rows of batch b, R at a time: y = ((x - mean) * rstd) * scale + shift in fp32, stored
        # in out's dtype (QUANT: as e4m3 codes of y * qinv, qinv = 1 / the caller's static per-tensor
        # scale). The modulation vectors are loaded once per program, not once per row: per row they are
        # 8 bytes a channel against x's 2, and reloading them made the kernel twice as slow as a copy.
        # HAS_RES: x + r (r contiguous [B, L, D]; HAS_GATE: x + r * gate, gate [B, 1, D] fp32, the gated
        # residual) is formed first in fp32, rounded to x's dtype as the unfused add would, stored to
        # sum_ptr, and normalised: the residual stream is read once instead of twice. Per-frame modulation:
        # shift / scale rows [B, T, D] (gate likewise), CPM (CPG) programs of RPP rows per modulation (gate)
        # row, so a program's rows share one row; CPM >= the program count for one row per batch item.
        chunk, b = tl.program_id(0), tl.program_id(1)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        if HAS_MOD:
            m_row = b * stride_mb + (chunk // CPM) * D
            scale = tl.load(scale_ptr + m_row + cols, mask=cmask, other=0.0)[None, :]
            shift = tl.load(shift_ptr + m_row + cols, mask=cmask, other=0.0)[None, :]
        if HAS_GATE:
            g_row = b * stride_gb + (chunk // CPG) * D
            gate = tl.load(gate_ptr + g_row + cols, mask=cmask, other=0.0)[None, :]
        if QUANT:
            qinv = tl.load(qinv_ptr)
        for l0 in range(chunk * RPP, chunk * RPP + RPP, R):
            ls = l0 + tl.arange(0, R)
            mask = (ls < L)[:, None] & cmask[None, :]
            x_rows = x_ptr + b.to(tl.int64) * stride_xb + ls[:, None].to(tl.int64) * stride_xr
            x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0)
            rows = (b * L + ls)[:, None].to(tl.int64) * D
            if HAS_RES:
                r = tl.load(r_ptr + rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                if HAS_GATE:
                    r = r * gate
                x = (x.to(tl.float32) + r).to(x_ptr.dtype.element_ty)
                tl.store(sum_ptr + rows + cols[None, :], x, mask=mask)
            x = x.to(tl.float32)
            mean = tl.sum(x, axis=1) / D
            xc = tl.where(mask, x - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
            y = xc * rstd[:, None]
            if HAS_MOD:
                y = y * scale + shift
            if QUANT:
                y = tl.clamp(y * qinv, -448.0, 448.0)
            tl.store(out_ptr + rows + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def gated_residual_kernel(
        x_ptr, y_ptr, gate_ptr, out_ptr, G, D, stride_yr, stride_gb, BLOCK_D: tl.constexpr
    ):
        # G rows per gate row: the sequence length for one gate per batch item, a frame's tokens per frame.
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(x_ptr + row.to(tl.int64) * D + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row.to(tl.int64) * stride_yr + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + (row // G) * stride_gb + cols, mask=mask, other=0.0)
        tl.store(out_ptr + row.to(tl.int64) * D + cols, (x + y * g).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def rms_rope_kernel(
        x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, qinv_ptr, b_ptr, L, D, eps, stride_xr, stride_out,
        HALF_DH: tl.constexpr, HAS_ROPE: tl.constexpr, HEADS_POW2: tl.constexpr, QUANT: tl.constexpr,
        NORMED: tl.constexpr, CAST: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr,
        HEAD_DIM: tl.constexpr = 0, SPLIT_HALF: tl.constexpr = False,
    ):  # fmt: skip
        # One token row: NORMED consecutive D-channel segments of it (q; or q and k of a fused [q | k | v]
        # row, weights [w_q | w_k]), each loaded contiguously, RMSNorm over its D channels (rounded to the
        # model dtype, as the unfused reference does), then its channels split into interleaved pairs
        # (a, b) -> (a cos - b sin, a sin + b cos), interleaved back. HEADS_POW2 (HALF_DH a power of two,
        # D = heads x 2 HALF_DH): the segment is viewed as [heads, HALF_DH, 2] and the token's HALF_DH angles
        # are loaded once and broadcast over the heads (gathering them per channel pair cost as much as the
        # norm). CAST: the next segment (v) is passed through as it is. Segment i goes to out_ptr + i *
        # stride_out; QUANT: as e4m3 codes with the caller's static scale 1 / qinv[i]. HAS_BIAS: the
        # projection's bias (one D-vector per segment) is added first, the sum rounded to the model dtype
        # as the GEMM's bias epilogue would have. HEAD_DIM (a power of two; 0: whole-width): RMSNorm over
        # each head's HEAD_DIM channels instead, weights [HEAD_DIM] per segment. SPLIT_HALF (HEADS_POW2 only):
        # channel j of a head pairs with j + HALF_DH instead of its neighbour.
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x_row = x_ptr + row.to(tl.int64) * stride_xr
        out = out_ptr + row.to(tl.int64) * D + cols
        if CAST:  # issued first: its load overlaps the norms' reductions
            v = tl.load(x_row + NORMED * D + cols, mask=mask, other=0.0)
            if HAS_BIAS:
                b = tl.load(b_ptr + NORMED * D + cols, mask=mask, other=0.0).to(tl.float32)
                v = (v.to(tl.float32) + b).to(x_ptr.dtype.element_ty)
            v = v.to(tl.float32)
            v = tl.clamp(v * tl.load(qinv_ptr + NORMED), -448.0, 448.0)
            tl.store(out + NORMED * stride_out, v.to(out_ptr.dtype.element_ty), mask=mask)
        for i in tl.static_range(NORMED):
            x = tl.load(x_row + i * D + cols, mask=mask, other=0.0)
            if HAS_BIAS:
                b = tl.load(b_ptr + i * D + cols, mask=mask, other=0.0).to(tl.float32)
                x = (x.to(tl.float32) + b).to(x_ptr.dtype.element_ty)
            x = x.to(tl.float32)
            if HEAD_DIM:  # padding heads (past D) are zeros: their norm is 0, never stored
                xh = tl.reshape(x, (BLOCK_D // HEAD_DIM, HEAD_DIM))
                rstd = 1.0 / tl.sqrt(tl.sum(xh * xh, axis=1) / HEAD_DIM + eps)
                w = tl.load(w_ptr + i * HEAD_DIM + tl.arange(0, HEAD_DIM)).to(tl.float32)
                y = (xh * rstd[:, None] * w[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)
                y = tl.reshape(y, (BLOCK_D,))
            else:
                rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
                w = tl.load(w_ptr + i * D + cols, mask=mask, other=0.0).to(tl.float32)
                y = (x * rstd * w).to(x_ptr.dtype.element_ty).to(tl.float32)
            if HAS_ROPE and HEADS_POW2:
                if SPLIT_HALF:  # [heads, 2, HALF_DH] -> pairs (j, j + HALF_DH) on the last axis
                    t = tl.permute(tl.reshape(y, (BLOCK_D // (2 * HALF_DH), 2, HALF_DH)), (0, 2, 1))
                else:
                    t = tl.reshape(y, (BLOCK_D // (2 * HALF_DH), HALF_DH, 2))
                a, b = tl.split(t)
                p = (row % L) * HALF_DH + tl.arange(0, HALF_DH)
                c = tl.load(cos_ptr + p)[None, :]
                s = tl.load(sin_ptr + p)[None, :]
                t = tl.join(a * c - b * s, a * s + b * c)
                if SPLIT_HALF:
                    t = tl.permute(t, (0, 2, 1))
                y = tl.reshape(t, (BLOCK_D,))
            elif HAS_ROPE:
                a, b = tl.split(tl.reshape(y, (BLOCK_D // 2, 2)))
                p = tl.arange(0, BLOCK_D // 2)
                j = (row % L) * HALF_DH + p % HALF_DH
                c = tl.load(cos_ptr + j, mask=p < D // 2, other=1.0)
                s = tl.load(sin_ptr + j, mask=p < D // 2, other=0.0)
                y = tl.interleave(a * c - b * s, a * s + b * c)
            if QUANT:
                y = tl.clamp(y * tl.load(qinv_ptr + i), -448.0, 448.0)
            tl.store(out + i * stride_out, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def rms_silu_kernel(
        x_ptr, g_ptr, out_ptr, rows, C, eps, stride_xb, stride_ob,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # BLOCK_R rows of C contiguous channels (a channels-last video, batch b): RMS norm over the
        # channels times gamma, rounded to the output dtype as the unfused norm would be, then SiLU.
        pid, b = tl.program_id(0), tl.program_id(1)
        r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        mask = (r < rows)[:, None] & (c < C)[None, :]
        off = r[:, None].to(tl.int64) * C + c[None, :]
        x = tl.load(x_ptr + b.to(tl.int64) * stride_xb + off, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + c, mask=c < C, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / C + eps)
        y = (x * rstd[:, None] * g[None, :]).to(out_ptr.dtype.element_ty).to(tl.float32)
        y = y / (1.0 + tl.exp(-y))
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + off, y.to(out_ptr.dtype.element_ty), mask=mask)

    return triton, ln_modulate_kernel, gated_residual_kernel, rms_rope_kernel, rms_silu_kernel


# Token rows per LayerNorm program (a multiple of every R the kernel uses). Measured on an H200 at 32,760
# rows: with the modulation loaded once per 32 rows, LayerNorm + modulate to fp8 went from 83 to 55 us at
# D = 1536 and from 290 to 213 us at D = 5120 (a bf16 copy of the same tensor: 51 / 162 us).
_LN_ROWS_PER_PROGRAM = 32


def _warps(block: int) -> int:
    # Warps per row of the gated residual (at the copy's bandwidth with 4 or 8 warps, H200, 32,760 rows).
    return 4 if block <= 8192 else 8


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(tensor, row count, row stride) of a [B, L, D] tensor as the kernels address it: B*L rows a fixed
    stride apart with contiguous channels. Strided row views (a q slice of a fused qkv output) pass as
    they are; anything else (a sequence shard of a padded batch, say) is made contiguous first."""
    if x.stride(-1) != 1 or (x.shape[0] > 1 and x.stride(0) != x.shape[1] * x.stride(1)):
        x = x.contiguous()
    return x, x.shape[0] * x.shape[1], x.stride(1)


# ---------------------------------------------------------------------------------------- LN + modulate


def _ln_launch(x, shift, scale1, eps, qinv, residual, gate=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    triton, kernel = _kernels()[:2]
    B, L, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(B, L, D, device=x.device, dtype=x.dtype if qinv is None else E4M3)
    total = None
    if residual is not None:
        residual = residual.contiguous()
        total = torch.empty(B, L, D, device=x.device, dtype=x.dtype)
    has_mod = shift is not None
    programs = triton.cdiv(L, _LN_ROWS_PER_PROGRAM)
    cpm = cpg = programs  # one modulation (gate) row per batch item
    if has_mod:
        T = shift.shape[1]
        shift, scale1 = (m.float().expand(B, T, D).contiguous() for m in (shift, scale1))
        cpm = programs if T == 1 else L // T // _LN_ROWS_PER_PROGRAM
    if gate is not None:
        T = gate.shape[1]
        gate = gate.float().expand(B, T, D).contiguous()
        cpg = programs if T == 1 else L // T // _LN_ROWS_PER_PROGRAM
    block = triton.next_power_of_2(D)
    # Rows per step and warps, measured best on an H100 at 32,760 rows: plain, 4 rows (D = 1536) or 2 (D =
    # 5120) on 4 warps; with the residual (two more row tiles live, plus the gate), 2 rows on 4 warps at
    # D = 1536 (128 vs 138 us gated) and on 16 at D = 5120 (507 vs 970 us: 4 warps spill registers).
    r = min(16, max(2, 8192 // block)) if residual is None else 2
    warps = 4 if residual is None else max(4, block // 512)
    kernel[(programs, B)](
        x, out, shift if has_mod else x, scale1 if has_mod else x, x if qinv is None else qinv,
        x if residual is None else residual, x if total is None else total, x if gate is None else gate,
        L, D, eps, x.stride(0), x.stride(1), shift.shape[1] * D if has_mod else D,
        D if gate is None else gate.shape[1] * D, _LN_ROWS_PER_PROGRAM, cpm, cpg,
        HAS_MOD=has_mod, QUANT=qinv is not None, HAS_RES=residual is not None, HAS_GATE=gate is not None,
        R=r, BLOCK_D=block, num_warps=warps,
    )  # fmt: skip
    return out, total


@kernel_op("dit_rt::ln_modulate", mutates_args=())
def _ln_modulate_cuda(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale1: torch.Tensor | None,
    eps: float,
    qinv: torch.Tensor | None = None,
) -> torch.Tensor:
    return _ln_launch(x, shift, scale1, eps, qinv, None)[0]


@_ln_modulate_cuda.register_fake
def _(x, shift, scale1, eps, qinv=None):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype if qinv is None else E4M3)


@kernel_op("dit_rt::add_ln_modulate", mutates_args=())
def _add_ln_modulate_cuda(
    x: torch.Tensor,
    residual: torch.Tensor,
    shift: torch.Tensor | None,
    scale1: torch.Tensor | None,
    eps: float,
    qinv: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, total = _ln_launch(x, shift, scale1, eps, qinv, residual, gate)
    return total, out


@_add_ln_modulate_cuda.register_fake
def _(x, residual, shift, scale1, eps, qinv=None, gate=None):
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype if qinv is None else E4M3)
    return torch.empty(x.shape, device=x.device, dtype=x.dtype), out


def layer_norm_modulate(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale1: torch.Tensor | None,
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 LayerNorm of x [B, L, D] times `scale1` plus `shift` ([B, 1, D] fp32, the adaLN modulation with
    the 1 already added), or with an affine `weight` / `bias` [D]; returned in x's dtype. Per-frame
    modulation: shift / scale1 [B, T, D], row t for the t-th L / T of the tokens (L a multiple of T)."""
    scale1, shift = _modulation(scale1, shift, weight, bias)
    if _use_triton(x) and _kernel_rows(x.shape[1], shift, scale1):
        return _ln_modulate_cuda(x, shift, scale1, eps)
    return _layer_norm_fp32(x, shift, scale1, eps).type_as(x)


def add_layer_norm_modulate(
    x: torch.Tensor,
    residual: torch.Tensor,
    shift: torch.Tensor | None,
    scale1: torch.Tensor | None,
    eps: float,
    *,
    gate: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    fp8: bool = False,
    row_norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | Fp8Codes]:
    """(x + residual, `layer_norm_modulate` of that sum) in one pass on CUDA: the sum is rounded to x's
    dtype, as `x + residual` would be, before it is normalised. gate ([B, 1, D] fp32): the sum is
    `gated_residual(x, residual, gate)` instead. weight / bias: an affine LayerNorm (shift / scale1 None).
    fp8=True: the second result is `layer_norm_modulate_fp8`'s codes (with `row_norm` as there). Per-frame
    modulation and gate [B, T, D] as in `layer_norm_modulate`."""
    fused = _use_triton(x) and residual.dtype == x.dtype and residual.shape == x.shape
    if not (fused and _kernel_rows(x.shape[1], shift, scale1, gate)):
        total = x + residual if gate is None else gated_residual(x, residual, gate)
        if fp8:
            return total, layer_norm_modulate_fp8(total, shift, scale1, eps, weight, bias, row_norm)
        return total, layer_norm_modulate(total, shift, scale1, eps, weight, bias)
    scale1, shift = _modulation(scale1, shift, weight, bias)
    if not fp8:
        return _add_ln_modulate_cuda(x, residual, shift, scale1, eps, None, gate)
    qscale, qinv, norm = _ln_fp8_scales(x.shape[-1], shift, scale1, x.device, row_norm)
    total, q = _add_ln_modulate_cuda(x, residual, shift, scale1, eps, qinv, gate)
    return total, Fp8Codes(q, qscale, x.dtype, norm)


def _modulation(scale1, shift, weight, bias):
    """(scale1, shift): the affine LayerNorm is the same kernel with a batch-independent modulation."""
    if weight is None:
        return scale1, shift
    return weight.float().view(1, 1, -1), bias.float().view(1, 1, -1)


def _layer_norm_fp32(x, shift, scale1, eps) -> torch.Tensor:
    y = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    L = x.shape[1]
    return y if shift is None else torch.addcmul(_spread(shift, L), y, _spread(scale1, L))


def _spread(mod: torch.Tensor, L: int) -> torch.Tensor:
    """Per-token rows [B, L, D] of a per-frame modulation [B, T, D] (T dividing L); [B, 1, D] as it is."""
    T = mod.shape[1]
    if T in (1, L):
        return mod
    if L % T:
        raise ValueError(f"per-frame modulation of {T} rows for {L} tokens: {L} is not a multiple of {T}")
    return mod.repeat_interleave(L // T, dim=1)


def _kernel_rows(L: int, *mods: torch.Tensor | None) -> bool:
    """Whether the LayerNorm kernels take these modulation / gate tensors at sequence length L: one row per
    batch item, or T rows each over a whole number of the kernels' programs (L / T rows a multiple of
    _LN_ROWS_PER_PROGRAM, as a 704x1280 Cosmos frame's 3,520 tokens are)."""
    for m in mods:
        T = 1 if m is None else m.shape[1]
        if T > 1 and (L % T or (L // T) % _LN_ROWS_PER_PROGRAM):
            return False
    return True


def layer_norm_modulate_fp8(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale1: torch.Tensor | None,
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    row_norm: bool = True,
) -> Fp8Codes:
    """`layer_norm_modulate` straight to per-tensor e4m3 codes [B, L, D] with their dequant scale (1,) and
    a bound on each row's L2 norm, as `Fp8Codes` (row_norm=False leaves it None: a few tiny kernels fewer
    where no consumer reads it).

    The scale needs no pass over the activation: a LayerNorm output has sum(xhat^2) <= D, so every
    |xhat_i| <= sqrt(D) and |y| <= sqrt(D) max|scale1| + max|shift|; that bound / 448 is the scale, from
    the tiny modulation vectors alone. e4m3 being floating point, the typical |y| ~ 1 (codes ~ 448 /
    sqrt(D)) keep full 3-bit precision; only |y| below ~2^-6 of that lose some. The fp8 GEMM that
    consumes the codes then skips its own amax and cast passes. Likewise ||y||_2 <= sqrt(D) max|scale1| +
    max_b ||shift_b||_2; the codes' rounding (2^-4 relative, or half a subnormal step) is added on top.
    """
    scale1, shift = _modulation(scale1, shift, weight, bias)
    qscale, qinv, norm = _ln_fp8_scales(x.shape[-1], shift, scale1, x.device, row_norm)
    if _use_triton(x) and _kernel_rows(x.shape[1], shift, scale1):
        q = _ln_modulate_cuda(x, shift, scale1, eps, qinv)
    else:
        q = _codes(_layer_norm_fp32(x, shift, scale1, eps), qinv)
    return Fp8Codes(q, qscale, x.dtype, norm)


def _ln_fp8_scales(
    D: int, shift, scale1, device, row_norm: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dequant scale, its reciprocal, row-norm bound or None) of a modulated LayerNorm's fp8 codes (see
    `layer_norm_modulate_fp8`), from the modulation vectors alone."""
    spread = math.sqrt(D) * (scale1.abs().amax() if scale1 is not None else 1.0)
    bound = spread + (shift.abs().amax() if shift is not None else 0.0)
    qscale, qinv = _static_scale(bound, device)
    if not row_norm:
        return qscale, qinv, None
    norm = spread + (shift.norm(dim=-1).amax() if shift is not None else 0.0)
    norm = torch.as_tensor(norm, device=device).float() * (1 + 2**-4) + math.sqrt(D) * qscale / 1024
    return qscale, qinv, norm.reshape(1)


def _static_scale(bound, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequant scale, its reciprocal) as (1,) fp32 tensors for values bounded by `bound`."""
    qscale = (torch.as_tensor(bound, device=device).float().clamp_min(1e-12) / 448.0).reshape(1)
    return qscale, 1.0 / qscale


def _codes(y: torch.Tensor, qinv: torch.Tensor) -> torch.Tensor:
    return (y.float() * qinv).clamp(-448.0, 448.0).to(E4M3)


# ---------------------------------------------------------------------------------------- gated residual


@kernel_op("dit_rt::gated_residual", mutates_args=())
def _gated_residual_cuda(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    triton, kernel = _kernels()[0], _kernels()[2]
    B, L, D = x.shape
    x = x.contiguous()
    y, rows, stride = _rows(y)
    T = gate.shape[1]
    gate = gate.float().expand(B, T, D).contiguous()
    out = torch.empty_like(x)
    block = triton.next_power_of_2(D)
    kernel[(rows,)](x, y, gate, out, L // T, D, stride, D, BLOCK_D=block, num_warps=_warps(block))
    return out


@_gated_residual_cuda.register_fake
def _(x, y, gate):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate in fp32 (x, y [B, L, D], gate [B, 1, D] fp32, or per frame [B, T, D]: row t for the t-th
    L / T of the tokens), returned in x's dtype."""
    if _use_triton(x) and y.dtype == x.dtype and x.shape[1] % gate.shape[1] == 0:
        return _gated_residual_cuda(x, y, gate)
    return torch.addcmul(x.float(), y, _spread(gate, x.shape[1])).type_as(x)


# ---------------------------------------------------------------------------------------- RMSNorm + RoPE


@kernel_op("dit_rt::rms_norm_rope", mutates_args=())
def _rms_norm_rope_cuda(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    qinv: torch.Tensor | None = None,
    head_dim: int = 0,
    split_half: bool = False,
) -> torch.Tensor:
    B, L, D = x.shape
    out = torch.empty(B, L, D, device=x.device, dtype=x.dtype if qinv is None else E4M3)
    _rms_rope_launch(x, weight, eps, cos, sin, qinv, None, out[None], 1, False, head_dim, split_half)
    return out


def _rms_rope_launch(
    x, weight, eps, cos, sin, qinv, bias, out, normed: int, cast: bool, head_dim: int = 0, split_half=False
) -> None:
    """`rms_rope_kernel` over x's rows (`normed` + `cast` segments of D = out.shape[-1] channels each, plus
    `bias` [segments x D] or None) into out [normed + cast, B, L, D]; head_dim > 0: per-head norm;
    split_half: split-half RoPE (both need `_kernel_layout`)."""
    triton, kernel = _kernels()[0], _kernels()[3]
    x, rows, stride = _rows(x)
    L, D = x.shape[1], out.shape[-1]
    has_rope = cos is not None
    half_dh = cos.shape[-1] if has_rope else 1
    block = triton.next_power_of_2(D)
    # Measured on an H200 at 32,760 rows: 4 warps; per-head angles 78 -> 62 us (D = 1536), 291 -> 203 us
    # (D = 5120); 8 warps only for the gathering variant's widest rows.
    pow2 = has_rope and half_dh & (half_dh - 1) == 0 and D % (2 * half_dh) == 0
    kernel[(rows,)](
        x, weight, cos if has_rope else weight, sin if has_rope else weight, out,
        weight if qinv is None else qinv, weight if bias is None else bias, L, D, eps, stride,
        out.stride(0), half_dh, HAS_ROPE=has_rope, HEADS_POW2=pow2, QUANT=qinv is not None,
        NORMED=normed, CAST=cast, HAS_BIAS=bias is not None, BLOCK_D=block, HEAD_DIM=head_dim,
        SPLIT_HALF=split_half, num_warps=8 if block >= 8192 and not pow2 else 4,
    )  # fmt: skip


@_rms_norm_rope_cuda.register_fake
def _(x, weight, eps, cos, sin, qinv=None, head_dim=0, split_half=False):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype if qinv is None else E4M3)


def _rope_rows(x: torch.Tensor, cos, sin):
    """The RoPE tables as the kernel reads them, [L, Dh/2] (views of the [L, 1, Dh/2] tables), or Nones."""
    if cos is None:
        return None, None
    return cos.reshape(x.shape[1], -1).contiguous(), sin.reshape(x.shape[1], -1).contiguous()


def _kernel_layout(x: torch.Tensor, heads: int, per_head: bool, layout: str) -> bool:
    """Whether the Triton kernel takes this norm: always the whole-width RMSNorm with interleaved RoPE
    (Wan's); the per-head norm and the split-half RoPE for power-of-two head dims (the kernel views a row
    as [heads, Dh]); other head dims run as torch ops."""
    if not (_use_triton(x) and x.stride(-1) == 1) or layout not in ROPE_LAYOUTS:
        return False
    dh = x.shape[-1] // heads
    return (not per_head and layout == "interleaved") or dh & (dh - 1) == 0


def _kernel_variant(x: torch.Tensor, heads: int, per_head: bool, layout: str) -> dict:
    """The kernel's variant arguments (head_dim, split_half) for `_kernel_layout`'s norms."""
    return dict(head_dim=x.shape[-1] // heads if per_head else 0, split_half=layout == "split_half")


def _rms_norm_heads(x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int, per_head: bool):
    """RMSNorm of x [B, L, D] over all D channels (weight [D]) or over each head's Dh (weight [Dh]), as
    [B, L, heads, Dh] rounded to x's dtype (the torch path of `rms_norm_rope`)."""
    if per_head:
        return F.rms_norm(x.unflatten(-1, (heads, -1)), weight.shape, weight, eps)
    return F.rms_norm(x, x.shape[-1:], weight, eps).unflatten(-1, (heads, -1))


def rms_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    heads: int,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    *,
    per_head: bool = False,
    layout: str = "interleaved",
) -> torch.Tensor:
    """RMSNorm of x [B, L, D] (a q or k projection, possibly a strided view of a fused qkv output) over the
    whole channel dim (weight [D], Wan) or, per_head=True, over each head's channels (weight [Dh], FLUX and
    Cosmos), then, with `cos`/`sin` ([L, 1, Dh/2] fp32), RoPE on each head's channel pairs in `layout`
    (`ROPE_LAYOUTS`). Returns [B, L, heads, D / heads] in x's dtype."""
    if _kernel_layout(x, heads, per_head, layout):
        c, s = _rope_rows(x, cos, sin)
        variant = _kernel_variant(x, heads, per_head, layout)
        return _rms_norm_rope_cuda(x, weight.to(x.dtype), eps, c, s, **variant).unflatten(-1, (heads, -1))
    y = _rms_norm_heads(x, weight, eps, heads, per_head)  # [B, L, H, Dh]
    return y if cos is None else apply_rope(y, cos, sin, layout)


def rms_norm_bound(weight: torch.Tensor) -> torch.Tensor:
    """A bound on |RMSNorm(x) * weight| through any RoPE: the normalised row (as many channels as weight [n]
    has: D, or Dh per head) has sum(xhat^2) <= n, so each |xhat_i| <= sqrt(n); a rotation of channel pairs
    keeps a pair's length."""
    return math.sqrt(weight.shape[-1]) * weight.float().abs().amax()


def rms_norm_rope_fp8(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    heads: int,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    *,
    per_head: bool = False,
    layout: str = "interleaved",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm_rope` straight to per-tensor e4m3 codes [B, L, heads, Dh] and their dequant scale (1,).

    Static scale, no pass over the activation (`rms_norm_bound`: every output is within sqrt(width)
    max|weight|, width the normalised channels). fp8 attention (a backend with `takes_codes`, fa3-fp8)
    takes the codes as they are, skipping its own amax and cast passes over q and k.
    """
    qscale, qinv = _static_scale(rms_norm_bound(weight), x.device)
    if _kernel_layout(x, heads, per_head, layout):
        c, s = _rope_rows(x, cos, sin)
        q = _rms_norm_rope_cuda(
            x, weight.to(x.dtype), eps, c, s, qinv, **_kernel_variant(x, heads, per_head, layout)
        )
        return q.unflatten(-1, (heads, -1)), qscale
    y = _rms_norm_heads(x, weight, eps, heads, per_head)  # rounded to x's dtype
    y = y.float() if cos is None else apply_rope(y.float(), cos, sin, layout)  # then fp32 into the codes
    return _codes(y, qinv), qscale


# ---------------------------------------------------------------------------------------- fused q, k, v codes


@kernel_op("dit_rt::qkv_norm_rope_fp8", mutates_args=())
def _qkv_fp8_cuda(
    qkv: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    qinv: torch.Tensor,
    bias: torch.Tensor | None = None,
    head_dim: int = 0,
    split_half: bool = False,
) -> torch.Tensor:
    B, L, D3 = qkv.shape
    out = torch.empty(3, B, L, D3 // 3, device=qkv.device, dtype=E4M3)  # q, k, v codes
    w = torch.cat((wq, wk))
    _rms_rope_launch(qkv, w, eps, cos, sin, qinv, bias, out, 2, True, head_dim, split_half)
    return out


@_qkv_fp8_cuda.register_fake
def _(qkv, wq, wk, eps, cos, sin, qinv, bias=None, head_dim=0, split_half=False):
    B, L, D3 = qkv.shape
    return torch.empty(3, B, L, D3 // 3, device=qkv.device, dtype=E4M3)


def qkv_norm_rope_fp8(
    qkv: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    eps: float,
    heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    v_bound: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    per_head: bool = False,
    layout: str = "interleaved",
) -> tuple[Fp8Codes, Fp8Codes, Fp8Codes]:
    """q, k, v of a fused self-attention projection qkv [B, L, 3D] as per-tensor e4m3 codes [B, L, heads,
    Dh], in one pass over qkv on CUDA: q and k as `rms_norm_rope_fp8` makes them (RMSNorm over D with
    weights wq / wk and the norms' common eps, RoPE with cos / sin [L, 1, Dh/2], the static RMSNorm
    bound as scale), v cast with the scale v_bound / 448, v_bound a tensor known to bound |v| (see
    `fp8.output_bound`: the projection's weight row norms times its input's row-norm bound). bias [3D]:
    the projection's bias, left out of its GEMM (`Linear(x, bias=False)`), added here first (the sums
    rounded to qkv's dtype). per_head / layout: the norm and RoPE variants of `rms_norm_rope`. Replaces
    two RMSNorm + RoPE passes, an amax pass and a cast pass over v."""
    D = qkv.shape[-1] // 3
    dt = qkv.dtype
    (qs, qi), (ks, ki) = (_static_scale(rms_norm_bound(w), qkv.device) for w in (wq, wk))
    vs, vi = _static_scale(v_bound, qkv.device)
    if _kernel_layout(qkv[..., :D], heads, per_head, layout):
        c, s = _rope_rows(qkv, cos, sin)
        b = None if bias is None else bias.to(dt)
        variant = _kernel_variant(qkv[..., :D], heads, per_head, layout)
        w = (wq.to(dt), wk.to(dt))
        q, k, v = _qkv_fp8_cuda(qkv, *w, eps, c, s, torch.cat((qi, ki, vi)), b, **variant).unbind(0)
    else:
        qkv = qkv if bias is None else (qkv.float() + bias.float()).to(dt)
        q, k = (
            rms_norm_rope_fp8(t, w, eps, heads, cos, sin, per_head=per_head, layout=layout)[0].flatten(2)
            for t, w in ((qkv[..., :D], wq), (qkv[..., D : 2 * D], wk))
        )
        v = _codes(qkv[..., 2 * D :], vi)

    def codes(t: torch.Tensor, scale: torch.Tensor) -> Fp8Codes:
        return Fp8Codes(t.unflatten(-1, (heads, -1)), scale, dt)

    return codes(q, qs), codes(k, ks), codes(v, vs)


# ---------------------------------------------------------------------------------------- RMS norm + SiLU


def _frames_rows(t: torch.Tensor) -> bool:
    """Whether a [B, C, T, H, W] tensor is channels-last within each batch item (rows of C channels, one
    after another), whatever the batch stride: a video or a time-padded conv buffer's frames."""
    B, C, T, H, W = t.shape
    return t.stride()[1:] == (1, H * W * C, W * C, C)


@kernel_op("dit_rt::rms_norm_silu", mutates_args=("out",))
def _rms_norm_silu_cuda(x: torch.Tensor, gamma: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    triton, kernel = _kernels()[0], _kernels()[4]
    B, C, T, H, W = x.shape
    block_c = triton.next_power_of_2(C)
    block_r = max(1, 8192 // block_c)
    rows = T * H * W
    kernel[(triton.cdiv(rows, block_r), B)](
        x, gamma, out, rows, C, eps, x.stride(0), out.stride(0), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4
    )


@_rms_norm_silu_cuda.register_fake
def _(x, gamma, eps, out):
    return None


def rms_norm_silu_(out: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    """out <- SiLU(RMS norm of x over dim 1 times gamma [C]), for [B, C, T, H, W] videos (the Wan VAE's
    norm -> SiLU -> causal conv): the norm reduces in fp32 and is rounded to x's dtype before the SiLU, as
    the two unfused ops would. On CUDA with channels-last rows (out may be the frames of a time-padded conv
    buffer) one pass writes straight into out, instead of a norm pass, a SiLU pass and the copy into the
    buffer. Returns out."""
    C = x.shape[1]
    # float32 too (Wan's VAE runs in float32 by default; the kernel reduces in float32 whatever the dtype)
    fits = _use_triton(x) or (_HAVE_TRITON and x.is_cuda and x.dtype == torch.float32)
    if fits and out.dtype == x.dtype and _frames_rows(x) and _frames_rows(out):
        _rms_norm_silu_cuda(x, gamma.reshape(C).to(x.dtype), eps, out)
        return out
    y = F.rms_norm(x.movedim(1, -1), (C,), gamma.reshape(C).to(x.dtype), eps=eps).movedim(-1, 1)
    return out.copy_(F.silu(y))


# ------------------------------------------------------------------------------------------------- SwiGLU


@functools.cache
def _swiglu_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def swiglu_kernel(
        a_ptr, b_ptr, out_ptr, M, stride_a, stride_b, stride_o, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # One row, BLOCK columns: SiLU(a) rounded to the output dtype, times b, rounded, as the two unfused
        # ops round, in one read of a and b and one write (which may land in a wider buffer).
        row, c = tl.program_id(0).to(tl.int64), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = c < M
        a = tl.load(a_ptr + row * stride_a + c, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + row * stride_b + c, mask=mask, other=0.0).to(tl.float32)
        s = (a / (1.0 + tl.exp(-a))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * stride_o + c, (s * b).to(out_ptr.dtype.element_ty), mask=mask)

    return triton, swiglu_kernel


@kernel_op("dit_rt::swiglu", mutates_args=("out",))
def _swiglu_cuda(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    triton, kernel = _swiglu_kernel()
    M = a.shape[-1]
    rows = a.numel() // M
    block = 2048
    kernel[(rows, triton.cdiv(M, block))](
        a, b, out, M, a.stride(-2), b.stride(-2), out.stride(-2), BLOCK=block, num_warps=4
    )


@_swiglu_cuda.register_fake
def _(a, b, out):
    return None


def _even_rows(t: torch.Tensor) -> bool:
    """Rows of contiguous channels, every row stride(-2) after the previous across the leading dims."""
    if t.dim() < 2 or t.stride(-1) != 1:
        return False
    expected = t.stride(-2) * t.shape[-2]
    for i in range(t.dim() - 3, -1, -1):
        if t.shape[i] > 1 and t.stride(i) != expected:
            return False
        expected *= t.shape[i]
    return True


def _swiglu_fits(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether the Triton SwiGLU runs: CUDA half inputs in eager mode (under torch.compile inductor fuses the
    torch expression itself), rows of contiguous channels."""
    if not _use_triton(a) or torch.compiler.is_compiling() or not a.dtype == b.dtype == out_dtype:
        return False
    return a.shape == b.shape and _even_rows(a) and _even_rows(b)


def swiglu(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(a) * b as the two torch ops compute it (a, b [..., M], e.g. the halves of one projection), into
    `out` when given (e.g. the tail of a concatenation buffer). On CUDA one Triton pass reading a and b once,
    rounding where the torch ops round (SiLU to the dtype, then the product)."""
    if _swiglu_fits(a, b, a.dtype if out is None else out.dtype):
        out = a.new_empty(a.shape) if out is None else out
        if out.shape == a.shape and _even_rows(out):
            _swiglu_cuda(a, b, out)
            return out
    y = F.silu(a) * b
    return y if out is None else out.copy_(y)


def cat_swiglu(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.cat([x, SiLU(a) * b], dim=-1); on CUDA the SwiGLU half is written into the buffer in place."""
    if not _swiglu_fits(a, b, x.dtype):
        return torch.cat([x, F.silu(a) * b], dim=-1)
    out = x.new_empty(*x.shape[:-1], x.shape[-1] + a.shape[-1])
    out[..., : x.shape[-1]].copy_(x)
    swiglu(a, b, out[..., x.shape[-1] :])
    return out
