"""The fp8 GEMM with cuBLASLt's bias + GELU epilogue and e4m3 output (`ops/linear/cublaslt.py`).

The GPU call itself runs on the device machine (BENCHMARKS.md: codes equal to the fp32 emulation but for
accumulation order, timings). Here, on the CPU: the emulated numerics through `gelu_ffn`, the argument
checks, the descriptors a plan asks cuBLASLt for (against a recording stand-in for the library), and the
custom op under torch.compile.
"""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from dit_rt.ops.elementwise import layer_norm_modulate, layer_norm_modulate_fp8
from dit_rt.ops.linear import Linear, cublaslt, gelu_ffn
from dit_rt.ops.linear.fp8 import _epilogue_gelu, hidden_bound

E4M3 = torch.float8_e4m3fn


def _ffn(D=64, Hd=160, bias_dtype=torch.bfloat16, seed=0):
    """An fp8-per-tensor FFN, LayerNorm codes with a row-norm bound, and the fp32 reference output."""
    torch.manual_seed(seed)
    B, L = 2, 30
    up, down = Linear(D, Hd), Linear(Hd, D)
    for m in (up, down):
        torch.nn.init.normal_(m.weight, std=m.in_features**-0.5)
        torch.nn.init.normal_(m.bias, std=0.1)
    shift, scale1 = 0.3 * torch.randn(B, 1, D), 1 + 0.5 * torch.randn(B, 1, D)
    x = torch.randn(B, L, D)
    y = layer_norm_modulate(x, shift, scale1, 1e-6)
    ref = F.linear(F.gelu(F.linear(y, up.weight, up.bias), approximate="tanh"), down.weight, down.bias)
    up.convert("fp8-per-tensor")
    down.convert("fp8-per-tensor")
    up.bias.data = up.bias.data.to(bias_dtype)
    return up, down, layer_norm_modulate_fp8(x, shift, scale1, 1e-6), ref


def _rel(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def test_gelu_ffn_takes_the_hidden_codes_from_the_epilogue():
    """epilogue=True (emulated here): the hidden codes are e4m3(GELU(up's GEMM + bias) * 448 / bound), the
    down projection reads them with the bound's scale; the output stays within fp8 error of the fp32 FFN
    and next to the separate GELU-cast pass (the two differ only in where the fp32 value is rounded)."""
    up, down, codes, ref = _ffn()
    got = gelu_ffn(up, down, codes, fused=True, epilogue=True)
    separate = gelu_ffn(up, down, codes, fused=True, epilogue=False)
    bound = hidden_bound(up, codes)
    a = codes.q.reshape(-1, codes.q.shape[-1])
    q = cublaslt.emulate(a, up.qweight, codes.scale, up.weight_scale[0], up.bias, 448 / bound)
    by_hand = (q.float() * (bound / 448)) @ down._format.weight_dequant(down).t() + down.bias
    assert torch.allclose(got.reshape(-1, got.shape[-1]), by_hand, atol=1e-5)
    assert got.shape == ref.shape and _rel(got, ref) < 6e-2 and _rel(got, separate) < 1e-2
    padded = torch.zeros(*codes.q.shape[:-1], 2 * codes.q.shape[-1], dtype=E4M3)
    padded[..., : codes.q.shape[-1]] = codes.q  # codes whose rows are strided: copied for cuBLAS
    assert torch.equal(gelu_ffn(up, down, codes._replace(q=padded[..., :64]), fused=True, epilogue=True), got)
    h = (a.float() @ up.qweight.float().t()) * (codes.scale * up.weight_scale[0]) + up.bias.float()
    assert q.float().abs().max() < 448 and (F.gelu(h, approximate="tanh").abs() <= bound).all()


def test_epilogue_choice_and_refusals(monkeypatch):
    """epilogue=None takes the epilogue only where cuBLASLt runs and the up projection fits (one weight
    scale, unpadded, a 16-bit bias); epilogue=True on an unfit projection is a clear error."""
    up, down, codes, _ = _ffn()
    cpu = torch.device("cpu")
    assert not cublaslt.available(cpu) and not _epilogue_gelu(up, down, None, cpu)
    monkeypatch.setattr(cublaslt, "available", lambda device: True)
    assert _epilogue_gelu(up, down, None, cpu) and not _epilogue_gelu(up, down, False, cpu)
    fp32_bias, _, _, _ = _ffn(bias_dtype=torch.float32)
    sliced = Linear(64, 160, splits=(80, 80)).convert("fp8-per-tensor", slice_scales=True)
    for unfit in (fp32_bias, sliced):
        assert not _epilogue_gelu(unfit, down, None, cpu)  # falls back quietly
        with pytest.raises(ValueError, match="GELU epilogue needs an unpadded fp8-per-tensor"):
            gelu_ffn(unfit, down, codes, fused=True, epilogue=True)


def test_argument_checks():
    a, w = torch.zeros(32, 64, dtype=E4M3), torch.zeros(48, 64, dtype=E4M3)
    one = torch.ones(1)
    bias = torch.zeros(48, dtype=torch.bfloat16)
    assert cublaslt.gemm_gelu_fp8(a, w, one, one, bias, one).shape == (32, 48)
    bad = [
        ((a.float(), w, one, one, bias, one), TypeError, "takes e4m3 codes"),
        ((a, w[:, :32], one, one, bias, one), ValueError, r"takes a \(M, K\) and w \(N, K\)"),
        ((a[:, :40], w[:, :40], one, one, bias, one), ValueError, "divisible by 16"),
        ((a.t().contiguous().t(), w, one, one, bias, one), ValueError, "contiguous"),
        ((a, w, torch.ones(32, 1), one, bias, one), ValueError, "scale_a must be one fp32 value"),
        ((a, w, one, one, bias.float(), one), ValueError, "bfloat16 or float16"),
        ((a, w, one, one, bias[:16], one), ValueError, r"bias must be \(48,\)"),
    ]
    for args, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            cublaslt.gemm_gelu_fp8(*args)
    assert cublaslt._load(("libdoes-not-exist.so",)) is None


class _RecordingLib:
    """Stands in for libcublasLt: records what a plan sets, reports `status` and `algos` found."""

    def __init__(self, status=0, algos=1):
        self.calls, self.status, self.algos = [], status, algos

    def __getattr__(self, name):
        def fn(*args):
            if name == "cublasLtMatmulAlgoGetHeuristic":
                args[-1]._obj.value = self.algos
            self.calls.append((name, args))
            return self.status

        return fn

    def attrs(self, setter="cublasLtMatmulDescSetAttribute"):
        return {a[1]: a[2]._obj.value for n, a in self.calls if n == setter}

    def layouts(self):
        return [a[1:] for n, a in self.calls if n == "cublasLtMatrixLayoutCreate"]


def test_plan_descriptors():
    """A plan asks for the column-major TN problem (w^T a^T, i.e. row-major a @ w^T), fp32 compute, the
    bias + GELU epilogue (GELU alone without a bias) with a bf16 bias and C, e4m3 A, B and D, fast
    accumulation as asked, and 32 MiB of workspace; a failing call or no algorithm is a RuntimeError."""
    M, N, K = 96, 48, 64
    lib = _RecordingLib()
    cublaslt._Plan(lib, ctypes.c_void_p(), M, N, K, torch.bfloat16, True)
    create = next(a for n, a in lib.calls if n == "cublasLtMatmulDescCreate")
    assert create[1:] == (68, 0)  # CUBLAS_COMPUTE_32F, CUDA_R_32F scale
    assert lib.attrs() == {
        3: 1,
        4: 0,
        25: 1,
        7: 36,
        26: 14,
    }  # TRANSA=T, TRANSB=N, fast accum, GELU_BIAS, bf16
    assert lib.layouts() == [(28, K, N, K), (28, K, M, K), (14, N, M, N), (28, N, M, N)]
    assert lib.attrs("cublasLtMatmulPreferenceSetAttribute") == {1: 32 << 20}
    lib = _RecordingLib()
    cublaslt._Plan(lib, ctypes.c_void_p(), M, N, K, None, False)
    assert lib.attrs() == {3: 1, 4: 0, 25: 0, 7: 32}
    with pytest.raises(RuntimeError, match="no fp8 GELU-epilogue algorithm for M=96, N=48, K=64"):
        cublaslt._Plan(_RecordingLib(algos=0), ctypes.c_void_p(), M, N, K, None, True)
    with pytest.raises(RuntimeError, match="failed with status 7"):
        cublaslt._Plan(_RecordingLib(status=7), ctypes.c_void_p(), M, N, K, None, True)


def test_epilogue_gemm_is_an_opaque_op_under_compile():
    """torch.compile(fullgraph) traces gelu_ffn's epilogue path with the GEMM as one custom-op call (no
    trace into ctypes) and computes what eager does."""
    up, down, codes, _ = _ffn()
    a, w = codes.q.reshape(-1, 64), up.qweight
    s = torch.ones(1)
    # (opcheck's schema test compares outputs with an op e4m3 lacks on the CPU; the fake kernel is what
    # compile relies on.)
    args = (a, w, codes.scale, s, up.bias.detach(), s, True)
    torch.library.opcheck(
        cublaslt._gemm_gelu_op.op, args, test_utils=("test_faketensor", "test_autograd_registration")
    )
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fn = torch.compile(
        lambda c: gelu_ffn(up, down, c, fused=True, epilogue=True), backend=backend, fullgraph=True
    )
    assert torch.equal(fn(codes), gelu_ffn(up, down, codes, fused=True, epilogue=True))
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert any("fp8_gemm_gelu" in t for t in targets)


def test_set_enabled(monkeypatch):
    """set_enabled switches the epilogue path where the library loaded; without the library it stays off."""
    monkeypatch.setattr(cublaslt, "_ENABLED", cublaslt._ENABLED)
    monkeypatch.setattr(cublaslt, "_LIB", None)
    cublaslt.set_enabled(True)
    assert cublaslt._ENABLED is False
    monkeypatch.setattr(cublaslt, "_LIB", _RecordingLib())
    cublaslt.set_enabled(True)
    assert cublaslt._ENABLED is True
    cublaslt.set_enabled(False)
    assert cublaslt._ENABLED is False
