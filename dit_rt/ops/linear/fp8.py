"""fp8 (e4m3) weight formats with dynamic activation scales: per-tensor, rowwise, DeepSeek blockwise.

Scales are fp32 *dequantization* scales (x ~= q * s, s = amax / 448), what `scaled_mm` multiplies by.

- `fp8-per-tensor`: one weight scale per fused slice (q/k/v keep their own), one activation scale per
  call. One slice runs the tensorwise GEMM; several run the rowwise GEMM with each slice's scale
  broadcast over its columns (tensorwise cannot scale columns differently).
- `fp8-rowwise`: one scale per weight output row, one per activation row.
- `fp8-blockwise`: 128x128 weight blocks, 1x128 activation blocks. cuBLAS (sm90) wants the
  activation scales outer-dim-major, (M, K/128) with strides (1, M), and the weight scales as
  (K/128 rounded up to 4, N/128) with strides (1, that padded count).

Shapes: the weight is zero-padded once at conversion to N % 16 == 0 and K % 16 == 0 (K % 128 == 0 for
blockwise): fp8 GEMMs need 16-byte aligned leading dimensions. An activation whose K is not aligned
is padded per call (real DiT widths never are); padded output columns are sliced off.

On CUDA with capability >= 8.9 the real kernels run (`F.scaled_mm`, or `torch._scaled_mm` before
torch 2.10) with the fused Triton activation quantizer; everywhere else the same quantization is
emulated in fp32: quantize -> dequantize -> matmul, equal to the GPU up to accumulation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dit_rt.ops.custom import kernel_op
from dit_rt.ops.linear import cublaslt, triton_quant
from dit_rt.ops.linear.base import LinearFormat, capability, pad2d, round_up, slice_rows

E4M3 = torch.float8_e4m3fn
FP8_MAX = 448.0
EPS = 1e-12


def fp8_native(device: torch.device) -> bool:
    """Real fp8 GEMMs exist on this device (CUDA sm89+)."""
    return capability(device) >= (8, 9)


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 codes of x / scale (scale broadcasts), saturated: a plain cast would turn >448 into NaN."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3)


def amax_scale(amax: torch.Tensor) -> torch.Tensor:
    return amax.float().clamp(min=EPS) / FP8_MAX


def quantize_act(x: torch.Tensor, mode: str, k_pad: int, m_pad: int | None = None, gelu: bool = False):
    """Dynamic fp8 quantization of x (M, K) -> codes (Mp, k_pad) and fp32 scales.

    Scales: "tensor" (1,), "row" (Mp, 1), "block" (Mp, k_pad / 128). On CUDA with Triton the fused
    kernel runs (block scales then come M-major, as cuBLAS wants); otherwise the torch path.
    gelu=True ("tensor" or "row"): quantize GELU-tanh(x), computed in fp32 (the fused FFN of `gelu_ffn`).
    """
    if x.is_cuda and triton_quant.available():
        return triton_quant.quantize(x if x.stride(-1) == 1 else x.contiguous(), mode, k_pad, m_pad, gelu)
    if gelu and mode == "block":
        raise ValueError("the fused GELU runs with per-tensor or rowwise activation scales, not 'block'")
    M, K = x.shape
    x = F.gelu(x.float(), approximate="tanh") if gelu else x
    x = pad2d(x.float(), m_pad or M, k_pad)
    if mode == "tensor":
        s = amax_scale(x.abs().amax()).reshape(1)
    elif mode == "row":
        s = amax_scale(x.abs().amax(dim=1, keepdim=True))
    elif mode == "block":
        blocks = x.unflatten(1, (k_pad // 128, 128))  # [Mp, L, 128]
        s = amax_scale(blocks.abs().amax(dim=2))  # [Mp, L]
        return to_fp8(blocks, s[..., None]).flatten(1), s
    else:
        raise ValueError(f"unknown activation scaling {mode!r}; expected 'tensor', 'row' or 'block'")
    return to_fp8(x, s), s


def dequant_act(q: torch.Tensor, s: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "block":
        return (q.float().unflatten(1, (s.shape[1], 128)) * s[..., None]).flatten(1)
    return q.float() * s


def _scaled_mm(a, b, scale_a, recipe_a: str, scale_b, recipe_b: str, bias, out_dtype, fast_accum=False):
    """fp8 GEMM a (M, K) @ b (K, N, column-major): a custom op, so compiled blocks trace through it (dynamo
    cannot trace torch 2.11's F.scaled_mm). fast_accum: the tensor cores' fp8 accumulator throughout,
    without cuBLAS's periodic promotion to fp32 (see `_Fp8Format.convert`)."""
    return _scaled_mm_op(a, b, scale_a, recipe_a, scale_b, recipe_b, bias, out_dtype, fast_accum)


@kernel_op("dit_rt::fp8_scaled_mm", mutates_args=())
def _scaled_mm_op(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    recipe_a: str,
    scale_b: torch.Tensor,
    recipe_b: str,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    fast_accum: bool = False,
) -> torch.Tensor:
    return _scaled_mm_eager(a, b, scale_a, recipe_a, scale_b, recipe_b, bias, out_dtype, fast_accum)


@_scaled_mm_op.register_fake
def _(a, b, scale_a, recipe_a, scale_b, recipe_b, bias, out_dtype, fast_accum=False):
    return a.new_empty(a.shape[0], b.shape[1], dtype=out_dtype)


def _scaled_mm_eager(a, b, scale_a, recipe_a: str, scale_b, recipe_b: str, bias, out_dtype, fast_accum=False):
    """Through whichever scaled-mm API this torch has."""
    if hasattr(F, "scaled_mm"):
        st = F.ScalingType
        recipes = {"tensor": st.TensorWise, "row": st.RowWise, "1x128": st.BlockWise1x128}
        recipes["128x128"] = st.BlockWise128x128
        return F.scaled_mm(
            a, b, scale_a, recipes[recipe_a], scale_b, recipes[recipe_b], bias=bias, output_dtype=out_dtype,
            use_fast_accum=fast_accum,
        )  # fmt: skip
    # torch < 2.10: the recipe is inferred from the scale shapes, which ours already have.
    return torch._scaled_mm(a, b, scale_a, scale_b, bias=bias, out_dtype=out_dtype, use_fast_accum=fast_accum)


class _Fp8Format(LinearFormat):
    """Shared conversion and dispatch. Subclasses set `act_mode`, and provide `weight_scales(m, w)`
    (dequant scales broadcastable against the padded fp32 weight) or their own `store`, and
    `forward_kernel(m, x)` for the real GEMM."""

    act_mode = "tensor"
    k_align = 16
    code_mode: str | None = None  # forward_codes takes activations pre-quantized this way (fused FFN)

    def forward_codes(
        self, m, q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype, bias: bool = True
    ) -> torch.Tensor:
        """y (M, out) from activation codes q (M, Kp) e4m3 already quantized as `code_mode` says (scale
        (1,) per tensor or (M, 1) per row); emulated in fp32 off the GPU. bias=False leaves m's bias out
        (the caller adds it in its next pass: cuBLAS's bias epilogue costs 2-6% of the GEMM on an H100)."""
        Np, Kp = m.qweight.shape
        scales = (1,) if self.code_mode == "tensor" else (q.shape[0], 1)
        if q.shape[1] != Kp or q.dtype != E4M3 or tuple(s.shape) != scales:
            raise ValueError(
                f"expected e4m3 codes (M, {Kp}) and scales {scales}, got {tuple(q.shape)}, {tuple(s.shape)}"
            )
        b = m.bias if bias else None
        if q.is_cuda and fp8_native(q.device):
            epilogue = b if Np == m.out_features else None
            return _finish(m, self.gemm(m, q, s, epilogue, dtype), epilogue, bias)
        y = ((q.float() * s) @ self.weight_dequant(m).t())[:, : m.out_features]
        if b is not None:
            y = y + b.float()
        return y.to(dtype)

    def convert(self, m, w, **opts):
        if opts:
            raise TypeError(f"{self.name} takes no options, got {sorted(opts)}")
        m.fast_accum = False
        self._convert(m, w)

    def _convert(self, m, w):
        N, K = w.shape
        w = pad2d(w, round_up(N, 16), round_up(K, self.k_align))
        self.store(m, w)

    def store(self, m, w):
        s = self.weight_scales(m, w)
        m.register_quant_buffer("qweight", to_fp8(w, s))
        m.register_quant_buffer("weight_scale", s.contiguous())

    def weight_dequant(self, m) -> torch.Tensor:
        return m.qweight.float() * m.weight_scale

    def forward(self, m, x):
        if x.is_cuda and fp8_native(x.device):
            return self.forward_kernel(m, x)
        return self.forward_emulated(m, x)

    def forward_emulated(self, m, x):
        q, s = quantize_act(x, self.act_mode, m.qweight.shape[1])
        y = dequant_act(q, s, self.act_mode) @ self.weight_dequant(m).t()  # [M, Np]
        y = y[:, : m.out_features]
        if m.bias is not None:
            y = y + m.bias.float()
        return y.to(x.dtype)


class Fp8PerTensor(_Fp8Format):
    """One weight scale for the whole (fused) weight: the tensorwise GEMM, cuBLAS's fastest (a fused
    q/k/v with three slice scales needs the rowwise GEMM, ~30% slower at Wan 14B's 5120 -> 15360).
    e4m3 is floating point, so a slice whose weights are smaller than another's keeps its 3 mantissa
    bits down to 2^-15 of the largest value. convert(slice_scales=True) keeps one scale per fused slice
    instead (then fused == separately quantized projections, bit for bit).

    convert(fast_accum=True), the default here and for fp8-rowwise: cuBLAS keeps the sums in the fp8
    tensor cores' own accumulator instead of promoting them to fp32 every few K steps. Measured on an H100
    at Wan's shapes (K = 1,536-13,824): the GEMM output's error against an fp32 sum of the same codes
    goes from 1.7e-3 to 1.8e-3-3.3e-3, 20x below what the e4m3 rounding of the inputs already costs,
    for 4-11% less GEMM time. fast_accum=False keeps the promoted sums."""

    name = "fp8-per-tensor"
    code_mode = "tensor"

    def convert(self, m, w, slice_scales: bool = False, fast_accum: bool = True):
        m.slice_scales = bool(slice_scales) and len(m.splits) > 1
        m.fast_accum = bool(fast_accum)
        self._convert(m, w)

    def weight_scales(self, m, w):
        if not m.slice_scales:
            return amax_scale(w.abs().amax()).expand(w.shape[0], 1)  # [Np, 1], one value
        # One scale per fused slice, expanded to a column of per-row scales [Np, 1].
        rows = slice_rows(m.splits, w.shape[0], w.device)
        amax = torch.zeros(len(m.splits), device=w.device).scatter_reduce(
            0, rows, w.abs().amax(dim=1), "amax"
        )
        return amax_scale(amax)[rows][:, None]

    def store(self, m, w):
        super().store(m, w)
        # scaled_mm wants the rowwise weight scales as (1, N); the [Np, 1] column has the same memory.
        m.single_scale = not m.slice_scales
        # (max_j ||W_j||_2 of the dequantized rows, max_j |b_j|): with a bound R on an input row's norm,
        # every output satisfies |y_j| <= ||W_j|| R + |b_j| (Cauchy-Schwarz), which `gelu_ffn` uses as the
        # per-tensor scale of its hidden activation instead of measuring an amax.
        row_norm = (m.qweight.float() * m.weight_scale).norm(dim=1).amax()
        bias = m.bias.detach().float().abs().amax() if m.bias is not None else row_norm.new_zeros(())
        m.register_quant_buffer("output_bound", torch.stack((row_norm, bias)))

    def forward_kernel(self, m, x):
        Np, Kp = m.qweight.shape
        q, s = quantize_act(x, "tensor", Kp)
        bias = m.bias if Np == m.out_features else None
        return _finish(m, self.gemm(m, q, s, bias, x.dtype), bias)

    def gemm(self, m, q, s, bias, dtype):
        Np = m.qweight.shape[0]
        if m.single_scale:
            w_s = m.weight_scale[0]
            return _scaled_mm(q, m.qweight.t(), s, "tensor", w_s, "tensor", bias, dtype, m.fast_accum)
        s_rows = s.expand(q.shape[0], 1).contiguous()
        w_s = m.weight_scale.view(1, Np)
        return _scaled_mm(q, m.qweight.t(), s_rows, "row", w_s, "row", bias, dtype, m.fast_accum)


class Fp8Rowwise(_Fp8Format):
    name = "fp8-rowwise"
    act_mode = "row"
    code_mode = "row"

    def convert(self, m, w, fast_accum: bool = True):
        m.fast_accum = bool(fast_accum)
        self._convert(m, w)

    def weight_scales(self, m, w):
        return amax_scale(w.abs().amax(dim=1, keepdim=True))  # [Np, 1]

    def forward_kernel(self, m, x):
        Np, Kp = m.qweight.shape
        q, s = quantize_act(x, "row", Kp)
        bias = m.bias if Np == m.out_features else None
        return _finish(m, self.gemm(m, q, s, bias, x.dtype), bias)

    def gemm(self, m, q, s, bias, dtype):
        w_s = m.weight_scale.view(1, m.qweight.shape[0])
        return _scaled_mm(q, m.qweight.t(), s, "row", w_s, "row", bias, dtype, m.fast_accum)


class Fp8Blockwise(_Fp8Format):
    """DeepSeek-V3 style: 128x128 weight blocks, 1x128 activation blocks (per token, per 128 inputs).

    `weight_scale` is (ceil(Np / 128), L4): L = Kp / 128 blocks along K, padded with ones to L4 = L
    rounded up to 4 (cuBLAS reads it K-major in groups of 4); only [:, :L] is meaningful.
    A fused projection whose slices are not multiples of 128 rows shares blocks across slices.
    """

    name = "fp8-blockwise"
    act_mode = "block"
    k_align = 128
    pad_scales_to = 4

    def block_amax(self, w):
        Np, Kp = w.shape
        wb = pad2d(w, round_up(Np, 128), Kp).unflatten(0, (-1, 128)).unflatten(2, (-1, 128))
        return wb.abs().amax(dim=(1, 3))  # [Nb, L]

    def store(self, m, w):
        Np, Kp = w.shape
        s = amax_scale(self.block_amax(w))  # [Nb, L]
        s_full = s.repeat_interleave(128, 0)[:Np].repeat_interleave(128, 1)  # [Np, Kp]
        m.register_quant_buffer("qweight", to_fp8(w, s_full))
        L = s.shape[1]
        m.register_quant_buffer("weight_scale", F.pad(s, (0, round_up(L, self.pad_scales_to) - L), value=1.0))

    def weight_dequant(self, m):
        Np, Kp = m.qweight.shape
        s = m.weight_scale[:, : Kp // 128]
        return m.qweight.float() * s.repeat_interleave(128, 0)[:Np].repeat_interleave(128, 1)

    def forward_kernel(self, m, x):
        Np, Kp = m.qweight.shape
        M = x.shape[0]
        # The M-major activation scales need 16-byte aligned columns: M % 4 == 0 (pad rows if not).
        q, s = quantize_act(x, "block", Kp, round_up(M, 4))
        if s.stride(0) != 1:  # torch path: make the scales M-major
            s = s.t().contiguous().t()
        y = _scaled_mm(q, m.qweight.t(), s, "1x128", m.weight_scale.t(), "128x128", None, x.dtype)
        return _finish(m, y[:M], None)


def _finish(m, y: torch.Tensor, bias_applied, with_bias: bool = True) -> torch.Tensor:
    """Slice off padded output columns and add the bias where the GEMM epilogue did not."""
    if y.shape[1] != m.out_features:
        y = y[:, : m.out_features]
    if with_bias and m.bias is not None and bias_applied is None:
        y = y + m.bias
    return y


def gelu_ffn(
    up, down, x: torch.Tensor, fused: bool | None = None, epilogue: bool | None = None
) -> torch.Tensor:
    """down(GELU-tanh(up(x))) for two dit_rt Linears (a DiT feed-forward).

    Where `down` is fp8-per-tensor or fp8-rowwise and the real kernels run (CUDA sm89+ with Triton), GELU
    is fused into down's activation quantization: the (tokens x ffn_dim) hidden activation is never
    written back in bf16 (GELU + amax + cast passes become amax + cast, or one pass per row). When x is
    `Fp8Codes` with a row-norm bound and `up` is fp8-per-tensor too, the hidden activation's scale comes
    from |GELU(h)| <= max(|h|, 0.17), |h_j| <= ||W_j|| ||x|| + |b_j| and the amax pass goes as well (one
    pass: GELU and cast). With that bound known, the up GEMM itself ends in bias + GELU + the e4m3 cast
    where cuBLASLt runs (`cublaslt.gemm_gelu_fp8`): no bf16 hidden activation at all, no pass over it.
    fused=None / epilogue=None decide so; True forces that path (emulated off the GPU: the tests' handle on
    it); epilogue=False keeps the separate GELU-cast pass.
    """
    fmt = down._format
    mode = getattr(fmt, "code_mode", None)
    dtype = x.dtype  # x may be a tensor or Fp8Codes (then `up` takes the codes)
    if fused is None:
        fused = mode is not None and x.is_cuda and fp8_native(x.device) and triton_quant.available()
    if not fused:
        return down(up.gelu_tanh(x))
    if mode is None:
        raise ValueError(
            f"a {down.fmt!r} Linear cannot take pre-quantized fp8 codes; use fp8-per-tensor or fp8-rowwise"
        )
    bound = hidden_bound(up, x) if mode == "tensor" else None
    if bound is not None and _epilogue_gelu(up, down, epilogue, x.device):  # bound >= 0.17, never 0
        a = x.q.reshape(-1, x.q.shape[-1]).contiguous()  # a no-op for the LayerNorm kernels' codes
        q = cublaslt.gemm_gelu_fp8(
            a, up.qweight, x.scale, up.weight_scale[0], up.bias, FP8_MAX / bound, up.fast_accum
        )
        s = bound / FP8_MAX
    elif bound is not None:  # up's bias joins in the GELU pass instead of the GEMM epilogue
        h = up(x, bias=False).reshape(-1, up.out_features)
        q, s = triton_quant.quantize_bounded(h, bound, gelu=True, bias=up.bias)
    else:
        h = up(x).reshape(-1, up.out_features)
        q, s = quantize_act(h, mode, down.qweight.shape[1], gelu=True)
    return fmt.forward_codes(down, q, s, dtype).reshape(*x.shape[:-1], down.out_features)


def _epilogue_gelu(up, down, epilogue: bool | None, device: torch.device) -> bool:
    """Whether `gelu_ffn` takes the hidden codes straight from up's GEMM epilogue (`cublaslt`): up is one
    per-tensor-scaled, unpadded fp8 weight that down reads as is, its bias 16-bit or absent."""
    if epilogue is False:
        return False
    fits = (
        up.single_scale
        and up.qweight.shape[0] == up.out_features == down.qweight.shape[1]
        and (up.bias is None or up.bias.dtype in (torch.bfloat16, torch.float16))
    )
    if epilogue and not fits:
        raise ValueError(
            "the GELU epilogue needs an unpadded fp8-per-tensor up projection (one weight scale, no "
            "slice_scales) with a bfloat16/float16 bias; pass epilogue=None to fall back"
        )
    return fits and (epilogue or cublaslt.available(device))


def output_bound(lin, x) -> torch.Tensor | None:
    """A bound on |lin(x)| (every output of an fp8-per-tensor Linear) from x's row-norm bound (`Fp8Codes`
    with `row_norm`) and lin's weight row norms and bias, or None when either is unknown. The GEMM's bf16
    rounding and fp32 summation get 1/128 of headroom. For a fused projection the bound covers all slices."""
    row_norm = getattr(x, "row_norm", None)
    out_bound = getattr(lin, "output_bound", None)
    if row_norm is None or out_bound is None or lin.qweight.shape[1] != lin.in_features:
        return None
    return out_bound[0] * row_norm * (1 + 2**-7) + out_bound[1]


def hidden_bound(up, x) -> torch.Tensor | None:
    """A bound on |GELU-tanh(up(x))| (`output_bound`; GELU-tanh is never below -0.17), or None."""
    bound = output_bound(up, x)
    return None if bound is None else bound.clamp_min(0.17)
