"""Fused dynamic fp8 activation quantization in Triton: amax, scale and cast in one pass per block.

In plain torch each of the three activation scalings is 4-6 kernels (abs, amax, clamp, div, cast,
pad), each reading or writing the whole (M, K) activation; at 32760 x 1536 that is most of what fp8
saves on the GEMM. These kernels read x once (per-tensor: twice, the amax must be global before the
first cast) and write the fp8 codes, zero padding included, plus the fp32 dequantization scales
directly in the layout `scaled_mm` wants. Triton is imported when a kernel is first needed, never
at `import dit_rt`; `fp8.py` keeps the torch path for CPUs and machines without Triton.

Numerics follow the torch path: scale = max(amax, 1e-12) / 448, q = clamp(x * (448 / max(amax, 1e-12)),
+-448) cast to e4m3 with round-to-nearest-even. The kernels multiply by the reciprocal, computed once per
program, where torch divides: the codes can differ in the rare element whose fp32 quotient lands within an
ulp of an e4m3 rounding boundary (none did in the H100 comparisons at Wan's shapes). The casts are bound by
memory; neither form was measurably faster.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from dit_rt.ops.custom import kernel_op

# Whether Triton is installed, decided without importing it: a constant torch.compile reads instead of
# tracing the kernel build (the kernels are built inside the custom op below, out of dynamo's sight).
_HAVE_TRITON = importlib.util.find_spec("triton") is not None


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def amax_kernel(
        x_ptr, partial_ptr, M, K, stride_xm, GELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
    ):
        # max |x| (GELU: max |GELU-tanh(x)|) of one tile -> partial[tile]; the tiles' max is the amax. Rows
        # may be a fixed stride apart (a v slice of a fused qkv output), where torch's reduction is 3x slower.
        pid_m, pid_k = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :],
            mask=(rows < M)[:, None] & (cols < K)[None, :],
            other=0.0,
        ).to(tl.float32)
        if GELU:
            u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            x = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
        tl.store(partial_ptr + pid_m * tl.num_programs(1) + pid_k, tl.max(tl.max(tl.abs(x), axis=1), axis=0))

    @triton.jit
    def tensor_kernel(
        x_ptr, q_ptr, amax_ptr, s_ptr, M, K, Kp, stride_xm, y_ptr, stride_ym, b_ptr,
        GELU: tl.constexpr, HAS_Y: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # Codes of x (HAS_Y: of x + y; HAS_BIAS: plus a bias over the columns, before GELU) with the scale
        # amax / 448; amax is measured or a known bound.
        pid_m, pid_k = tl.program_id(0), tl.program_id(1)
        amax = tl.maximum(tl.load(amax_ptr).to(tl.float32), 1e-12)
        scale, inv = amax / 448.0, 448.0 / amax
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows < M)[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
        if HAS_Y:
            x += tl.load(
                y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :], mask=mask, other=0.0
            ).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(b_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]
        if GELU:
            u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            x = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
        q = tl.clamp(x * inv, -448.0, 448.0)
        out_mask = (rows < M)[:, None] & (cols < Kp)[None, :]
        tl.store(q_ptr + rows[:, None].to(tl.int64) * Kp + cols[None, :], q.to(tl.float8e4nv), mask=out_mask)
        if (pid_m == 0) & (pid_k == 0):
            tl.store(s_ptr, scale)

    @triton.jit
    def row_kernel(x_ptr, q_ptr, s_ptr, K, Kp, stride_xm, GELU: tl.constexpr, BLOCK_K: tl.constexpr):
        # One row: amax pass, then the scaled cast (the row is re-read from cache). GELU: quantize GELU-tanh
        # of x, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) with tanh(u) = 1 - 2 / (exp(2u) + 1), fp32.
        row = tl.program_id(0)
        x_row = x_ptr + row.to(tl.int64) * stride_xm
        q_row = q_ptr + row.to(tl.int64) * Kp
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
            if GELU:
                u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
                x = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
            amax = tl.maximum(amax, tl.abs(x))
        amax = tl.maximum(tl.max(amax, axis=0), 1e-12)
        scale, inv = amax / 448.0, 448.0 / amax
        for k0 in range(0, Kp, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
            if GELU:
                u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
                x = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
            q = tl.clamp(x * inv, -448.0, 448.0)
            tl.store(q_row + cols, q.to(tl.float8e4nv), mask=cols < Kp)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def block_kernel(x_ptr, q_ptr, s_ptr, M, Mp, K, Kp, stride_xm, BLOCK_M: tl.constexpr):
        # One (BLOCK_M x 128) tile: one scale per row per 128 columns, written M-major at s[l, m].
        pid_m, pid_l = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_l * 128 + tl.arange(0, 128)
        x = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :],
            mask=(rows < M)[:, None] & (cols < K)[None, :],
            other=0.0,
        ).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12)
        scale = amax / 448.0
        q = tl.clamp(x * (448.0 / amax)[:, None], -448.0, 448.0)
        tl.store(
            q_ptr + rows[:, None].to(tl.int64) * Kp + cols[None, :],
            q.to(tl.float8e4nv),
            mask=(rows < Mp)[:, None],
        )
        tl.store(s_ptr + pid_l * Mp + rows, scale, mask=rows < Mp)

    return triton, tensor_kernel, row_kernel, block_kernel, amax_kernel


# (rows, columns) per program of the per-tensor cast. H100, 32,760 rows, GELU cast: 32 x 256 310 / 477 us
# at K = 8,960 / 13,824 against 321 / 493 us for 64 x 128 (a plain fp8 cast of the same input: 293 / 448).
_CAST_TILE = (32, 256)


def available() -> bool:
    """True when Triton is installed."""
    return _HAVE_TRITON


def quantize(x: torch.Tensor, mode: str, k_pad: int, m_pad: int | None = None, gelu: bool = False):
    """Quantize x (M, K), last dim contiguous, to e4m3 codes (Mp, k_pad) with fp32 dequant scales.

    mode "tensor": scale (1,); "row": scale (M, 1); "block" (1x128): scale viewed (Mp, k_pad / 128)
    with strides (1, Mp), the outer-dim-major layout cuBLAS wants. Mp = m_pad or M; padding is zeros.
    gelu=True (modes "tensor" and "row") quantizes GELU-tanh(x), computed in fp32: the FFN hidden
    activation is read (per-tensor: twice, amax first) but never written back in bf16. A `torch.library`
    custom op with a fake implementation, so compiled blocks trace through it.
    """
    if mode not in ("tensor", "row", "block"):
        raise ValueError(f"unknown activation scaling {mode!r}; expected 'tensor', 'row' or 'block'")
    if gelu and mode == "block":
        raise ValueError("the fused GELU runs with per-tensor or rowwise activation scales, not 'block'")
    return _quantize_op(x, mode, k_pad, m_pad or 0, gelu)


@kernel_op("dit_rt::fp8_quantize_act", mutates_args=())
def _quantize_op(
    x: torch.Tensor, mode: str, k_pad: int, m_pad: int, gelu: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize(x, mode, k_pad, m_pad or None, gelu)


@_quantize_op.register_fake
def _(x, mode, k_pad, m_pad, gelu):
    Mp = m_pad or x.shape[0]
    q = x.new_empty(Mp, k_pad, dtype=torch.float8_e4m3fn)
    if mode == "tensor":
        return q, x.new_empty(1, dtype=torch.float32)
    if mode == "row":
        return q, x.new_empty(Mp, 1, dtype=torch.float32)
    return q, torch.empty_strided((Mp, k_pad // 128), (1, Mp), dtype=torch.float32, device=x.device)


def _quantize(x: torch.Tensor, mode: str, k_pad: int, m_pad: int | None, gelu: bool = False):
    triton, tensor_kernel, row_kernel, block_kernel, amax_kernel = _kernels()
    M, K = x.shape
    Mp = m_pad or M
    q = torch.empty(Mp, k_pad, device=x.device, dtype=torch.float8_e4m3fn)
    if mode == "tensor":
        if Mp != M:
            q[M:].zero_()
        # pass 1: the amax of x (or of GELU(x)) per tile, then over tiles; the tile shapes measured best
        # on an H200 at 32,760 rows (GELU's exp makes wide tiles no faster there)
        bm, bk = (64, 128) if gelu else (16, 512)
        tiles = (triton.cdiv(M, bm), triton.cdiv(K, bk))
        partial = torch.empty(tiles[0] * tiles[1], device=x.device, dtype=torch.float32)
        amax_kernel[tiles](x, partial, M, K, x.stride(0), GELU=gelu, BLOCK_M=bm, BLOCK_K=bk)
        amax = partial.amax()
        s = torch.empty(1, device=x.device, dtype=torch.float32)
        bm, bk = _CAST_TILE
        tensor_kernel[(triton.cdiv(M, bm), triton.cdiv(k_pad, bk))](
            x, q, amax, s, M, K, k_pad, x.stride(0), x, 0, x,
            GELU=gelu, HAS_Y=False, HAS_BIAS=False, BLOCK_M=bm, BLOCK_K=bk,
        )  # fmt: skip
        return q, s
    if mode == "row":
        s = torch.empty(Mp, 1, device=x.device, dtype=torch.float32)
        block_k = min(triton.next_power_of_2(k_pad), 2048)
        row_kernel[(M,)](x, q, s, K, k_pad, x.stride(0), GELU=gelu, BLOCK_K=block_k)
        if Mp != M:
            q[M:].zero_()
            s[M:] = 1.0
        return q, s
    if mode == "block":
        n_blocks = k_pad // 128
        s = torch.empty(n_blocks, Mp, device=x.device, dtype=torch.float32)
        grid = (triton.cdiv(Mp, 32), n_blocks)
        block_kernel[grid](x, q, s, M, Mp, K, k_pad, x.stride(0), BLOCK_M=32)
        return q, s.t()


def quantize_bounded(
    x: torch.Tensor,
    bound: torch.Tensor,
    y: torch.Tensor | None = None,
    gelu: bool = False,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor e4m3 codes (M, K) of x (or of x + y; gelu=True: of GELU-tanh(x + bias), computed in fp32,
    bias (K,) or None), x / y (M, K) with contiguous rows, and the dequant scale (1,) = bound / 448, where
    `bound` (a tensor, on x's device) is known to cover the quantized values: one pass, no amax (e.g. an
    attention output is bounded by its values' range). Saturates if it does not."""
    if gelu and y is not None:
        raise ValueError("quantize_bounded: gelu applies to x alone; pass y=None")
    return _quantize_bounded_op(x, bound.reshape(1).float(), y, gelu, bias)


@kernel_op("dit_rt::fp8_quantize_bounded", mutates_args=())
def _quantize_bounded_op(
    x: torch.Tensor, bound: torch.Tensor, y: torch.Tensor | None, gelu: bool, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = x.shape
    if not (x.is_cuda and _HAVE_TRITON):
        v = x.float() if y is None else x.float() + y.float()
        v = v if bias is None else v + bias.float()
        v = torch.nn.functional.gelu(v, approximate="tanh") if gelu else v
        s = bound.clamp_min(1e-12) / 448.0
        return (v / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), s
    triton, tensor_kernel = _kernels()[:2]
    q = torch.empty(M, K, device=x.device, dtype=torch.float8_e4m3fn)
    s = torch.empty(1, device=x.device, dtype=torch.float32)
    bm, bk = _CAST_TILE
    tensor_kernel[(triton.cdiv(M, bm), triton.cdiv(K, bk))](
        x, q, bound, s, M, K, K, x.stride(0), x if y is None else y, 0 if y is None else y.stride(0),
        x if bias is None else bias, GELU=gelu, HAS_Y=y is not None, HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_K=bk,
    )  # fmt: skip
    return q, s


@_quantize_bounded_op.register_fake
def _(x, bound, y, gelu, bias=None):
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(1, dtype=torch.float32)
