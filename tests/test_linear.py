"""Linear weight formats on CPU: each emulated format against an fp32 reference with stated bounds.

Bounds (relative Frobenius error of the output, gaussian x and W, K = 200..512):
- fp8 (all three): 4e-2. e4m3 keeps 3 mantissa bits: ~2.7% rms rounding error per operand, so
  quantizing both x and W gives ~3.5% on the output; this is plain PyTorch's own fp8 error.
- nvfp4: 0.12 weight-only, 0.17 w4a4 (e2m1 has one mantissa bit: ~9% rms per operand).
- svdquant: 0.15 (int4, group 64: ~8-9% rms per operand; the low-rank branch only lowers it).
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from dit_rt.ops.linear import LINEAR_FORMATS, Linear, fp8, fused, quantize_, record_act_absmax, trtllm
from dit_rt.ops.linear import nvfp4 as nv

K, N, M = 200, 72, 48  # neither K nor N divisible by 128 (nor N by 16)
TORCH_FORMATS = [f for f in LINEAR_FORMATS if not f.startswith("trtllm")]
BOUNDS = {
    "default": 1e-6,
    "fp8-per-tensor": 4e-2,
    "fp8-rowwise": 4e-2,
    "fp8-blockwise": 4e-2,
    "nvfp4": 0.12,
    "svdquant": 0.15,
}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.detach().float() - ref.float()).norm() / ref.float().norm())


def make_linear(w: torch.Tensor, b: torch.Tensor | None, splits=None, dtype=torch.float32) -> Linear:
    lin = Linear(w.shape[1], w.shape[0], bias=b is not None, splits=splits, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g) * 0.1
    x = torch.randn(2, M // 2, K, generator=g)
    return w, b, x


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_format_against_fp32_reference(fmt, data):
    w, b, x = data
    ref = x @ w.t() + b
    lin = make_linear(w, b).convert(fmt)
    y = lin(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    err = rel_err(y, ref)
    assert err < BOUNDS[fmt], f"{fmt}: relative error {err:.4f} >= {BOUNDS[fmt]}"
    if fmt != "default":
        assert err > 1e-4, f"{fmt}: error {err} is too small to come from any quantization"
        assert lin.weight is None and "weight" not in lin.state_dict()


def test_fp8_error_is_the_plain_torch_fp8_error(data):
    # Plain PyTorch, same precision: quantize x and W per tensor to e4m3, matmul in fp32.
    w, b, x = data
    ref = x @ w.t() + b

    def fp8(t):
        s = t.abs().amax() / 448
        return (t / s).to(torch.float8_e4m3fn).float() * s

    plain = rel_err(fp8(x) @ fp8(w).t() + b, ref)
    ours = rel_err(make_linear(w, b).convert("fp8-per-tensor")(x), ref)
    assert ours <= 1.05 * plain, (ours, plain)


def test_nvfp4_w4a4_bound(data):
    w, b, x = data
    ref = x @ w.t() + b
    y = make_linear(w, b).convert("nvfp4", w4a4=True)(x)
    err = rel_err(y, ref)
    weight_only = rel_err(make_linear(w, b).convert("nvfp4", w4a4=False)(x), ref)
    assert weight_only < err < 0.17, (weight_only, err)


@pytest.mark.parametrize("fmt", ["fp8-per-tensor", "fp8-rowwise", "fp8-blockwise", "nvfp4", "svdquant"])
def test_bf16_activations_give_bf16_outputs(fmt, data):
    w, b, x = data
    lin = make_linear(w, b, dtype=torch.bfloat16).convert(fmt)
    y = lin(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert rel_err(y, x @ w.t() + b) < BOUNDS[fmt] + 1e-2


def test_blockwise_beats_per_tensor_on_outlier_channels():
    g = torch.Generator().manual_seed(1)
    k, n = 512, 256
    w = torch.randn(n, k, generator=g) / k**0.5
    x = torch.randn(64, k, generator=g)
    # A few input channels 200x larger in both: per-tensor scales are set by them and the rest of
    # the tensor falls into e4m3's subnormal range; 1x128 / 128x128 blocks confine the damage.
    outliers = torch.tensor([3, 77, 300])
    w[:, outliers] *= 200
    x[:, outliers] *= 200
    w[:, 256:] *= 1e-3  # the far blocks hold small values only
    x[:, 256:] *= 1e-3
    ref = x @ w.t()
    errs = {f: rel_err(make_linear(w, None).convert(f)(x), ref) for f in ("fp8-per-tensor", "fp8-blockwise")}
    assert errs["fp8-blockwise"] <= errs["fp8-per-tensor"], errs
    # The small-valued blocks: blockwise keeps them accurate, per-tensor flushes them.
    lin_b = make_linear(w, None).convert("fp8-blockwise")
    lin_t = make_linear(w, None).convert("fp8-per-tensor")
    deq_b = lin_b.qweight.float()[:, 256:] * lin_b.weight_scale[:, 2:4].repeat_interleave(
        128, 1
    ).repeat_interleave(128, 0)
    deq_t = lin_t.qweight.float()[:, 256:] * lin_t.weight_scale
    assert rel_err(deq_b, w[:, 256:]) < 0.05 < rel_err(deq_t, w[:, 256:])


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_fused_equals_separate(fmt):
    g = torch.Generator().manual_seed(2)
    d, k = 128, 256  # slices on 128-row block boundaries so blockwise blocks do not straddle them
    # q, k, v of very different magnitudes: a shared per-tensor scale would crush v.
    ws = [torch.randn(d, k, generator=g) * s for s in (1.0, 4.0, 0.01)]
    bs = [torch.randn(d, generator=g) for _ in range(3)]
    x = torch.randn(16, k, generator=g)
    qkv = fused(k, d, ("to_q", "to_k", "to_v"))
    with torch.no_grad():
        qkv.weight.copy_(torch.cat(ws))
        qkv.bias.copy_(torch.cat(bs))
    # svdquant's low-rank branch is a property of the whole matrix, not of each slice; fp8-per-tensor
    # shares one scale unless asked for one per slice.
    opts = {"rank": 0} if fmt == "svdquant" else {"slice_scales": True} if "per-tensor" in fmt else {}
    y = qkv.convert(fmt, **opts)(x)
    sep = torch.cat([make_linear(w, b).convert(fmt, **opts)(x) for w, b in zip(ws, bs)], dim=1)
    torch.testing.assert_close(y, sep, rtol=1e-5, atol=1e-5)
    if fmt == "fp8-per-tensor":
        scales = qkv.weight_scale.flatten()
        want = torch.stack([w.abs().amax() / 448 for w in ws])
        assert scales.unique().numel() == 3 and not qkv.single_scale
        torch.testing.assert_close(scales.view(3, d), want[:, None].expand(3, d))
        shared = fused(k, d, ("to_q", "to_k", "to_v"))
        with torch.no_grad():
            shared.weight.copy_(torch.cat(ws))
            shared.bias.copy_(torch.cat(bs))
        ys = shared.convert(fmt)(x)
        assert shared.single_scale and shared.weight_scale.unique().numel() == 1
        # a 400x smaller slice stays in e4m3's normal range: its outputs keep fp8 precision
        for a, b in zip(ys.split(d, dim=1), sep.split(d, dim=1)):
            assert ((a - b).norm() / b.norm()).item() < 0.05


def test_quantize_converts_filtered_linears_and_survives_moves(data):
    w, b, x = data
    model = torch.nn.Sequential(
        make_linear(w, b), torch.nn.GELU(), make_linear(torch.randn(N, N) / N**0.5, b)
    )
    quantize_(model, "fp8-rowwise", filter=lambda name, m: name == "0")
    assert model[0].fmt == "fp8-rowwise" and model[2].fmt == "default"
    before = model(x)
    model.to(torch.float64).to(torch.float32)  # casts bias/params, must not touch codes or scales
    assert model[0].qweight.dtype == torch.float8_e4m3fn and model[0].weight_scale.dtype == torch.float32
    torch.testing.assert_close(model(x), before)
    sd = model.state_dict()
    assert {"0.qweight", "0.weight_scale", "0.bias", "2.weight"} <= set(sd)


def test_errors_are_clear(data):
    w, b, x = data
    with pytest.raises(ValueError, match="unknown linear format 'fp7'.*fp8-rowwise"):
        make_linear(w, b).convert("fp7")
    with pytest.raises(ValueError, match="valid: default"):
        quantize_(torch.nn.Sequential(make_linear(w, b)), "int3")
    lin = make_linear(w, b).convert("fp8-per-tensor")
    with pytest.raises(RuntimeError, match="already converted"):
        lin.convert("fp8-rowwise")
    with pytest.raises(RuntimeError, match="meta"):
        Linear(K, N, device="meta").convert("fp8-rowwise")
    ints = Linear(K, N)
    ints.weight = torch.nn.Parameter(torch.ones(N, K, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match="int32 weight"):
        ints.convert("fp8-rowwise")
    with pytest.raises(TypeError, match="int64"):
        lin(torch.ones(3, K, dtype=torch.int64))
    with pytest.raises(ValueError, match=f"expects inputs \\(..., {K}\\)"):
        lin(torch.randn(3, K + 1))
    with pytest.raises(ValueError, match="do not add up"):
        Linear(K, N, splits=(N, 1))
    with pytest.raises(TypeError, match="takes no options"):
        make_linear(w, b).convert("fp8-blockwise", block=64)
    with pytest.raises(ValueError, match="act_absmax must have shape"):
        make_linear(w, b).convert("svdquant", act_absmax=torch.ones(K + 1))


def test_trtllm_missing_is_a_clear_error(monkeypatch, data):
    w, b, _ = data
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # makes `import tensorrt_llm` fail
    trtllm.require_trtllm.cache_clear()
    for fmt in ("trtllm-fp8-per-tensor", "trtllm-fp8-blockwise"):
        lin = make_linear(w, b)
        with pytest.raises(ImportError, match="tensorrt_llm.*pip install tensorrt_llm"):
            lin.convert(fmt)
        assert lin.fmt == "default" and lin.weight is not None  # nothing half-converted
    trtllm.require_trtllm.cache_clear()


def test_trtllm_formats_emulate_like_torch_formats_on_cpu(monkeypatch, data):
    # With the package importable (a stand-in module here) the CPU path is the torch emulation.
    w, b, x = data
    monkeypatch.setitem(sys.modules, "tensorrt_llm", type(sys)("tensorrt_llm"))
    trtllm.require_trtllm.cache_clear()
    for fmt in ("fp8-per-tensor", "fp8-blockwise"):
        y = make_linear(w, b).convert("trtllm-" + fmt)(x)
        torch.testing.assert_close(y, make_linear(w, b).convert(fmt)(x))
    trtllm.require_trtllm.cache_clear()


def test_e2m1_codes_roundtrip_and_round_to_nearest_even():
    codes = torch.arange(16, dtype=torch.uint8).repeat(3)[: 2 * 23]
    packed = nv.pack_e2m1(codes)
    assert packed.shape == (23,) and packed.dtype == torch.uint8
    assert packed[0] == 0x10  # element 0 in the low nibble, element 1 in the high one
    assert torch.equal(nv.unpack_e2m1(packed), codes)
    values = nv.e2m1_decode(torch.arange(16, dtype=torch.uint8))
    assert values.tolist()[:8] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    # Representable values encode exactly (-0 aside); midpoints go to the even code.
    enc = nv.e2m1_encode(values)
    assert torch.equal(nv.e2m1_decode(enc), values)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, 7.0])
    assert nv.e2m1_decode(nv.e2m1_encode(ties)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, 6.0]


def test_nvfp4_double_quantization_layout(data):
    w, b, _ = data
    lin = make_linear(w, b).convert("nvfp4")
    Kp = 224  # K padded to 32
    assert lin.qweight.shape == (N, Kp // 2) and lin.weight_scale.shape == (N, Kp // 16)
    assert lin.weight_scale.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(lin.weight_global_scale, w.abs().amax().reshape(1) / (6 * 448))
    # The block holding the tensor's amax uses the largest block scale, 448.
    r, c = divmod(int(w.abs().argmax()), K)
    assert float(lin.weight_scale[r, c // 16].float()) == 448.0


def test_to_blocked_matches_the_cublas_tile_layout():
    s = torch.arange(130 * 5, dtype=torch.float32).reshape(130, 5)
    out = nv.to_blocked(s.to(torch.float8_e4m3fn)).float()
    assert out.numel() == 256 * 8
    tiles = out.view(2, 2, 512)  # [row tile, col tile, 32 * 16]
    src = torch.nn.functional.pad(s.to(torch.float8_e4m3fn).float(), (0, 3, 0, 126))
    for r, c in [(0, 0), (31, 3), (32, 0), (127, 2), (128, 4), (129, 1)]:
        tile = tiles[r // 128, c // 4]
        rr, cc = r % 128, c % 4
        assert tile[(rr % 32) * 16 + (rr // 32) * 4 + cc] == src[r, c]


def test_svdquant_low_rank_branch_absorbs_outliers():
    g = torch.Generator().manual_seed(3)
    k, n = 256, 192
    w = torch.randn(n, k, generator=g) / k**0.5
    x = torch.randn(64, k, generator=g)
    x[:, [5, 100, 200]] *= 30  # activation outlier channels (smoothing moves them into W)
    w[:, [17, 150]] *= 20  # weight outlier channels
    ref = x @ w.t()

    def err(**opts):
        lin = make_linear(w, None)
        with record_act_absmax(lin):
            lin(x)
        return rel_err(lin.convert("svdquant", **opts)(x), ref)

    plain = err(rank=0, act_absmax=torch.ones(k), alpha=1.0)  # lam = 1: plain W4A4
    smooth_only = err(rank=0)
    full = err(rank=32)
    assert full < 0.5 * plain, (full, plain)
    assert full < smooth_only, (full, smooth_only)
    assert full < BOUNDS["svdquant"]


def test_svdquant_state(data):
    w, b, _ = data
    lin = make_linear(w, b).convert("svdquant", rank=8)
    assert lin.lora_up.shape == (N, 8) and lin.lora_down.shape == (8, K)
    assert lin.qweight.dtype == torch.uint8 and lin.qweight.shape == (N, 256 // 2)
    assert lin.weight_scale.shape == (N, 256 // 64)


ACT_QUANT = """
import torch
from dit_rt.ops.linear import fp8, triton_quant

torch.manual_seed(0)
x = torch.randn(70, 200) * 3
x[5, 7] = 40.0  # one outlier row
x = x.to(torch.bfloat16)
for mode in ("tensor", "row", "block"):
    k_pad, m_pad = 256, 80
    got_q, got_s = triton_quant.quantize(x, mode, k_pad, m_pad)
    ref_q, ref_s = fp8.quantize_act(x.float().cpu().clone(), mode, k_pad, m_pad)  # CPU tensors: torch path
    # Scales and layouts are exact; the codes are not compared here: the interpreter's e4m3 cast does not
    # round like the GPU (codes off by powers of two), so tools/bench_linear.py checks them on the GPU.
    assert got_q.shape == ref_q.shape and got_q.dtype == torch.float8_e4m3fn, mode
    # (padding rows: any scale multiplies zero codes; the kernel writes 1.0 there)
    assert torch.allclose(got_s.float()[:70], ref_s.float()[:70], rtol=1e-6), mode
    assert (got_q[70:].float() == 0).all() and (got_q[:, 200:].float() == 0).all(), mode  # zero padding
    if mode == "block":
        assert got_s.stride() == (1, m_pad), got_s.stride()  # the M-major layout cuBLAS wants
    # fullgraph compile traces through the custom op (its fake gives the same shapes and strides).
    fn = torch.compile(lambda t, m=mode: triton_quant.quantize(t, m, k_pad, m_pad), backend="aot_eager",
                       fullgraph=True)
    cq, cs = fn(x)
    assert torch.equal(cq.float(), got_q.float()) and torch.equal(cs, got_s) and cs.stride() == got_s.stride()
# GELU fused into the quantizer: the same scales as quantizing the torch GELU-tanh
for mode in ("tensor", "row"):
    got_q, got_s = triton_quant.quantize(x, mode, 256, None, gelu=True)
    ref_q, ref_s = fp8.quantize_act(x.float(), mode, 256, None, gelu=True)
    assert got_q.shape == (70, 256) and torch.allclose(got_s, ref_s, rtol=1e-5), (mode, got_s, ref_s)
# codes with a known bound (no amax pass), of x + y + a bias: the kernel against the torch fallback
triton_, tensor_kernel = triton_quant._kernels()[:2]
y = torch.randn(70, 200).to(torch.bfloat16)
b = torch.randn(200).to(torch.bfloat16)
bound = (x.float() + y.float() + b.float()).abs().amax().reshape(1) * 1.5
ref_q, ref_s = triton_quant.quantize_bounded(x, bound, y, bias=b)  # CPU tensors: the torch fallback
got_q = torch.empty(70, 200, dtype=torch.float8_e4m3fn)
got_s = torch.empty(1)
args = (x, got_q, bound, got_s, 70, 200, 200, 200, y, 200, b)
tensor_kernel[(2, 2)](*args, GELU=False, HAS_Y=True, HAS_BIAS=True, BLOCK_M=64, BLOCK_K=128)
assert torch.allclose(got_s, ref_s) and torch.allclose(ref_s, bound / 448)
av, bv = ref_q.float(), got_q.float()
carry = (bv == av / 2) & (torch.log2(av.abs()) % 1 == 0)  # the interpreter's truncating e4m3 cast
assert (carry | ((av - bv).abs() <= 2**-3 * av.abs() + 2**-6 * av.abs().max())).all()
assert (av == bv).float().mean() > 0.9
print("ok")
"""


def test_triton_activation_quantizer_matches_torch_and_compiles():
    pytest.importorskip("triton", reason="the Triton kernels need the triton package (test extra)")
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")  # the interpreter runs the kernels on CPU tensors
    out = subprocess.run(
        [sys.executable, "-c", ACT_QUANT], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_fp8_gemm_path_compiles_fullgraph():
    """The GPU path of fp8-per-tensor (activation quantization + the scaled-mm custom op), run on the CPU,
    whose torch has a tensorwise fp8 scaled-mm: compiled fullgraph equals eager and stays near the
    emulated path (fp8 rounding of the product's inputs is the same; only accumulation order differs)."""
    torch.manual_seed(0)
    m = Linear(64, 48)
    torch.nn.init.normal_(m.weight, std=0.1)
    torch.nn.init.normal_(m.bias, std=0.1)
    m.convert("fp8-per-tensor")
    fmt = m._format
    x = torch.randn(20, 64)
    with torch.no_grad():
        eager = fmt.forward_kernel(m, x)
        compiled = torch.compile(lambda t: fmt.forward_kernel(m, t), backend="aot_eager", fullgraph=True)(x)
        emulated = fmt.forward_emulated(m, x)
    assert torch.equal(compiled, eager)
    assert ((eager - emulated).norm() / emulated.norm()).item() < 1e-5
    # fast accumulation is the default (the tensor cores' accumulator, cuBLAS on the GPU); the call
    # passes the Linear's choice through, and fast_accum=False keeps the promoted sums
    assert m.fast_accum is True
    calls = []
    real = fp8._scaled_mm_op
    try:
        fp8._scaled_mm_op = lambda *a: calls.append(a[-1]) or real(*a)
        slow = Linear(64, 48)
        slow.weight.data.copy_(m._format.weight_dequant(m)[:48, :64])
        slow.bias.data.copy_(m.bias)
        slow.convert("fp8-per-tensor", fast_accum=False)
        with torch.no_grad():
            fast_y, slow_y = fmt.forward_kernel(m, x), fmt.forward_kernel(slow, x)
    finally:
        fp8._scaled_mm_op = real
    assert calls == [True, False] and slow.fast_accum is False
    assert ((fast_y - slow_y).norm() / slow_y.norm()).item() < 1e-5
    rowwise = Linear(64, 48)
    rowwise.convert("fp8-rowwise", fast_accum=False)
    assert rowwise.fast_accum is False
    with pytest.raises(TypeError, match="takes no options"):
        Linear(256, 128).convert("fp8-blockwise", fast_accum=True)


@pytest.mark.parametrize("fmt", ["fp8-per-tensor", "fp8-rowwise"])
def test_gelu_ffn_fused_path(fmt):
    """The fused FFN (GELU inside down's activation quantization: per tensor or per row, as the format
    quantizes), emulated on the CPU: equal to its definition (codes of GELU(up(x)) through down's weights)
    and within fp8 error of the unfused chain; formats that cannot take codes refuse it."""
    from dit_rt.ops.linear import gelu_ffn
    from dit_rt.ops.linear.fp8 import dequant_act, quantize_act

    torch.manual_seed(0)
    up, down = Linear(64, 200), Linear(200, 48)
    for m in (up, down):
        torch.nn.init.normal_(m.weight, std=m.in_features**-0.5)
        torch.nn.init.normal_(m.bias, std=0.1)
    ref = F.linear(
        F.gelu(F.linear(x := torch.randn(3, 7, 64), up.weight, up.bias), approximate="tanh"),
        down.weight,
        down.bias,
    )
    down.convert(fmt)
    fused = gelu_ffn(up, down, x, fused=True)
    mode = down._format.code_mode
    assert mode == ("tensor" if fmt == "fp8-per-tensor" else "row")
    q, s = quantize_act(up(x).reshape(21, 200), mode, down.qweight.shape[1], gelu=True)
    by_hand = (dequant_act(q, s, mode) @ down._format.weight_dequant(down).t())[:, :48] + down.bias
    assert fused.shape == (3, 7, 48) and torch.allclose(fused.reshape(21, 48), by_hand, atol=1e-5)
    unfused = gelu_ffn(up, down, x)  # CPU: the plain chain (down quantizes per call)
    for got in (fused, unfused):
        assert ((got - ref).norm() / ref.norm()).item() < 5e-2
    blockwise = Linear(200, 48)
    blockwise.convert("fp8-blockwise")
    with pytest.raises(ValueError, match="cannot take pre-quantized fp8 codes"):
        gelu_ffn(up, blockwise, x, fused=True)
    with pytest.raises(ValueError, match="not 'block'"):
        quantize_act(torch.randn(4, 8), "block", 128, gelu=True)


def test_gelu_ffn_hidden_scale_from_bounds():
    """Fed LayerNorm codes that carry a row-norm bound, an all-fp8-per-tensor FFN scales its hidden
    activation by ||W_j|| ||x|| + |b_j| (no amax): the bound covers every GELU output (no code saturates,
    even where one input row lines up with a weight row) and the output stays within fp8 error of the
    unquantized chain; without a known bound (plain tensors, another up format) it measures the amax."""
    from dit_rt.ops.elementwise import layer_norm_modulate, layer_norm_modulate_fp8
    from dit_rt.ops.linear import gelu_ffn
    from dit_rt.ops.linear.fp8 import hidden_bound
    from dit_rt.ops.linear.triton_quant import quantize_bounded

    torch.manual_seed(0)
    B, L, D, Hd = 2, 30, 64, 160
    up, down = Linear(D, Hd), Linear(Hd, D)
    for m in (up, down):
        torch.nn.init.normal_(m.weight, std=m.in_features**-0.5)
        torch.nn.init.normal_(m.bias, std=0.1)
    shift, scale1 = 0.3 * torch.randn(B, 1, D), 1 + 0.5 * torch.randn(B, 1, D)
    x = torch.randn(B, L, D)
    # Row 0 is built so that its modulated LayerNorm output leans along up's first weight row (cosine
    # ~0.8): the case where Cauchy-Schwarz is nearly tight.
    x[0, 0] = (up.weight[0].detach() - shift[0, 0]) / scale1[0, 0]
    y = layer_norm_modulate(x, shift, scale1, 1e-6)
    ref = F.linear(F.gelu(F.linear(y, up.weight, up.bias), approximate="tanh"), down.weight, down.bias)
    hidden = F.gelu(F.linear(y, up.weight, up.bias), approximate="tanh")
    up.convert("fp8-per-tensor")
    down.convert("fp8-per-tensor")
    codes = layer_norm_modulate_fp8(x, shift, scale1, 1e-6)
    bound = hidden_bound(up, codes)
    h = up(codes).reshape(-1, Hd)
    assert bound.shape == (1,) and (F.gelu(h.float(), approximate="tanh").abs().max() <= bound).all()
    assert bound < 64 * hidden.abs().max()  # loose by Cauchy-Schwarz, but within e4m3's range
    q, s = quantize_bounded(h, bound, gelu=True)
    assert q.float().abs().max() < 448 and torch.allclose(s, bound / 448)
    got = gelu_ffn(up, down, codes, fused=True)
    measured = gelu_ffn(up, down, codes._replace(row_norm=None), fused=True)  # the amax path
    err, err_amax = (((g - ref).norm() / ref.norm()).item() for g in (got, measured))
    assert got.shape == (B, L, D) and err < 6e-2 and err < 1.1 * err_amax  # a loose scale costs nothing
    assert hidden_bound(up, y) is None  # a plain tensor: no norm bound
    rowwise = Linear(D, Hd)
    rowwise.convert("fp8-rowwise")
    assert hidden_bound(rowwise, codes) is None
    with pytest.raises(ValueError, match="gelu applies to x alone"):
        quantize_bounded(h, bound, h, gelu=True)


def test_linear_gelu_epilogue_is_an_opaque_op():
    """The default format's GELU-tanh GEMM (cuBLASLt epilogue on CUDA) is a custom op with a fake
    implementation: torch.compile(fullgraph) traces it as one call instead of decomposing it into a GEMM
    and a separate GELU pass over the hidden activation."""
    from dit_rt.ops.linear import _linear_gelu_tanh

    x, w, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(6)
    torch.library.opcheck(_linear_gelu_tanh.op, (x, w, b))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fn = torch.compile(lambda x: _linear_gelu_tanh(x, w, b), backend=backend, fullgraph=True)
    assert torch.allclose(fn(x), _linear_gelu_tanh(x, w, b))
    ops = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.dit_rt.linear_gelu_tanh.default in ops or any("linear_gelu_tanh" in str(o) for o in ops)


def test_capability_queried_once_per_device(monkeypatch):
    """A plain dict cache (torch.compile traces functools' caches with a warning); CPU devices are (0, 0)."""
    from dit_rt.ops.linear import base

    calls = []
    monkeypatch.setattr(base, "_CAPABILITIES", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: calls.append(i) or (9, 0))
    assert base.capability(torch.device("cuda", 1)) == (9, 0) == base.capability(torch.device("cuda", 1))
    assert calls == [1] and base.capability(torch.device("cpu")) == (0, 0)
    assert not hasattr(base.capability, "cache_clear")
