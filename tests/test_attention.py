"""The attention seam and its backends on CPU, against a float64 reference.

Kernels that need a GPU (FA3, SageAttention, TensorRT-LLM) are checked through their CPU emulations
(the custom ops' CPU kernels) and through fake packages that record how they are called.
"""

import logging
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dit_rt.ops.attention import (
    Attention,
    attention,
    available_attention,
    dequantize_fp8,
    fa3,
    fp8,
    quantize_fp8,
    register_attention,
    registry,
    resolve_attention,
    sage,
    set_attention,
    trtllm,
    unregister_attention,
)


@pytest.fixture(autouse=True)
def fresh_resolution():
    registry._RESOLVED.clear()
    yield
    registry._RESOLVED.clear()


def qkv(b=2, lq=33, lk=47, h=4, hk=2, d=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, h, d, generator=g)
    k = torch.randn(b, lk, hk, d, generator=g)
    v = torch.randn(b, lk, hk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def reference(q, k, v, scale=None):
    """float64 softmax attention on (B, L, H, D); returns (out (B, Lq, H, D), lse (B, H, Lq))."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))  # [B, H, L, D]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = q @ k.transpose(-1, -2) * scale
    return (torch.softmax(s, -1) @ v).transpose(1, 2), torch.logsumexp(s, -1)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# Every backend that runs on CPU: sdpa itself, and the emulations behind the GPU kernels' custom ops.
CPU_BACKENDS = {
    "sdpa": (lambda q, k, v, s, lse: attention(q, k, v, scale=s, return_lse=lse, backend="sdpa"), 1e-5),
    "fa3": (fa3.fa3, 1e-5),
    "fa3-fp8": (fa3.fa3_fp8, 8e-2),  # e4m3 has 3 mantissa bits: 3e-2 (scale 1/sqrt(D)) to 6e-2 (0.3)
    "sage": (sage.sage, 3e-2),  # int8 Q.K per block, fp16 V
}


@pytest.mark.parametrize("name", sorted(CPU_BACKENDS))
@pytest.mark.parametrize("scale", [None, 0.3])
def test_backend_matches_float64_reference(name, scale):
    fn, tol = CPU_BACKENDS[name]
    q, k, v = qkv()
    copies = [x.clone() for x in (q, k, v)]
    out = fn(q, k, v, scale, False)
    want, _ = reference(q, k, v, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel(out, want) < tol
    for x, c in zip((q, k, v), copies):
        assert torch.equal(x, c), f"{name} mutated its inputs"


def test_fp8_emulation_error_is_bounded_and_not_trivial():
    q, k, v = qkv(lq=64, lk=64, h=4, hk=4, d=64, seed=1)
    want, _ = reference(q, k, v)
    err_fp8 = rel(fa3.fa3_fp8(q, k, v, None, False), want)
    err_raw = rel(attention(*(x.to(torch.float8_e4m3fn).float() for x in (q, k, v))), want)
    assert 1e-3 < err_fp8 < 6e-2  # real quantization happened, and it is within the bound
    assert err_fp8 <= err_raw * 1.5  # scaling is no worse than a raw cast on well-scaled data


def test_fa3_fp8_runs_short_key_sequences_in_bf16(monkeypatch):
    """Under fa3-fp8, bf16 attention over fewer than BF16_BELOW_KEYS keys (text / image cross-attention) is
    the bf16 kernel's, bit for bit; at or above the threshold, and for producer-made codes at any length,
    it is quantized (fp8 error); float32 inputs, which the bf16 kernel does not take, stay fp8."""
    from dit_rt.ops.codes import Fp8Codes

    q, k, v = qkv(lk=47, dtype=torch.bfloat16, seed=3)
    want, _ = reference(q, k, v)
    assert fa3.BF16_BELOW_KEYS > 514  # the longest Wan cross-attention (FLF2V: 2 x 257 CLIP tokens)
    assert torch.equal(fa3.fa3_fp8(q, k, v, None, False), fa3.fa3(q, k, v, None, False))
    monkeypatch.setattr(fa3, "BF16_BELOW_KEYS", 47)
    err = rel(fa3.fa3_fp8(q, k, v, None, False), want)
    assert 1e-2 < err < 8e-2  # quantized now
    monkeypatch.setattr(fa3, "BF16_BELOW_KEYS", 1024)
    codes = Fp8Codes(q.float().clamp(-448, 448).to(torch.float8_e4m3fn), torch.ones(1), q.dtype)
    assert rel(fa3.fa3_fp8(codes, k, v, None, False), want) > 1e-2  # codes: the fp8 kernel
    q32, k32, v32 = (x.float() for x in (q, k, v))
    assert rel(fa3.fa3_fp8(q32, k32, v32, None, False), want) > 1e-2


def test_fp8_scales_rescue_small_values():
    # A raw cast flushes values ~1e-4 to (sub)normals with few bits; per-head scales keep them.
    q, k, v = (x * 1e-4 for x in qkv(h=2, hk=2, seed=2))
    want, _ = reference(q, k, v, scale=1e4)
    assert rel(fa3.fa3_fp8(q, k, v, 1e4, False), want) < 6e-2


@pytest.mark.parametrize("name", ["sdpa", "fa3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lse_merges_halves_into_full_attention(name, dtype):
    fn, tol = CPU_BACKENDS[name]
    q, k, v = qkv(dtype=dtype)
    want, want_lse = reference(q, k, v, 0.2)
    out, lse = fn(q, k, v, 0.2, True)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 33)
    assert (lse.double() - want_lse).abs().max() < 1e-4
    (o1, l1), (o2, l2) = fn(q, k[:, :20], v[:, :20], 0.2, True), fn(q, k[:, 20:], v[:, 20:], 0.2, True)
    merged_lse = torch.logaddexp(l1, l2)  # [B, H, Lq]
    w1, w2 = (torch.exp(l - merged_lse).transpose(1, 2)[..., None] for l in (l1, l2))  # [B, Lq, H, 1]
    merged = o1.double() * w1 + o2.double() * w2
    assert rel(merged, want) < tol * 10
    assert (merged_lse - lse).abs().max() < 1e-4


def test_lse_unavailable_raises_clearly():
    q, k, v = qkv()
    with pytest.raises(NotImplementedError, match="log-sum-exp"):
        sage.SAGE(q, k, v, None, True)
    with pytest.raises(NotImplementedError, match="log-sum-exp"):
        trtllm.TRTLLM(q, k, v, None, True)


def test_resolve_is_cached_and_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="dit_rt"):
        first = resolve_attention("auto", device="cpu", dtype=torch.float32, head_dim=32)
        again = resolve_attention("auto", device="cpu", dtype=torch.float32, head_dim=32)
    assert first is again and first.name == "sdpa"
    lines = [r.getMessage() for r in caplog.records if r.name == "dit_rt"]
    assert lines == ["attention backend: sdpa (auto) for device=cpu, dtype=float32, head_dim=32"]


def test_unknown_backend_lists_available():
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash9'.*usable.*\['sdpa'\]"):
        resolve_attention("flash9", device="cpu", dtype=torch.float32, head_dim=64)


@pytest.mark.parametrize(
    "name,package", [("fa3", "fa3-fwd"), ("sage", "sageattention"), ("trtllm", "tensorrt_llm")]
)
def test_missing_package_is_a_clear_error(name, package, monkeypatch):
    # These packages are not installed on CPU CI; force "absent" in case one is.
    monkeypatch.setattr(fa3, "fa3_module", lambda: None)
    monkeypatch.setattr(sage, "sage_module", lambda: None)
    monkeypatch.setattr(trtllm, "trtllm_api", lambda: None)
    with pytest.raises(RuntimeError, match=rf"'{name}' is not usable.*{package}.*Usable: \['sdpa'\]"):
        resolve_attention(name, device="cpu", dtype=torch.bfloat16, head_dim=128)
    assert name not in available_attention()
    with pytest.raises(RuntimeError, match="not installed"):
        {"fa3": fa3.call_fa3, "sage": sage.call_sage, "trtllm": trtllm.call_trtllm}[name](*qkv(), 0.1)


def fake_fa3_module(calls):
    def flash_attn_func(q, k, v, softmax_scale=None, q_descale=None, k_descale=None, v_descale=None, **kw):
        calls.append(dict(scale=softmax_scale, descales=(q_descale, k_descale, v_descale), **kw))
        out, lse = reference(q.float(), k.float(), v.float(), softmax_scale)
        return out.to(torch.bfloat16), lse.float(), None

    return types.SimpleNamespace(__name__="fa3_fwd_interface", flash_attn_func=flash_attn_func)


def test_auto_prefers_fa3_when_it_can_run(monkeypatch):
    monkeypatch.setattr(fa3, "fa3_module", lambda: fake_fa3_module([]))
    monkeypatch.setattr(fa3, "_capability", lambda device: (9, 0))
    cuda = torch.device("cuda")
    assert resolve_attention("auto", device=cuda, dtype=torch.bfloat16, head_dim=128).name == "fa3"
    # The fa3-fwd wheel has no fp16 kernels and FA3 stops at head_dim 256: auto falls back, naming fails.
    assert resolve_attention("auto", device=cuda, dtype=torch.float16, head_dim=128).name == "sdpa"
    assert resolve_attention("auto", device=cuda, dtype=torch.bfloat16, head_dim=512).name == "sdpa"
    with pytest.raises(RuntimeError, match="head_dim 512"):
        resolve_attention("fa3", device=cuda, dtype=torch.bfloat16, head_dim=512)
    assert resolve_attention("fa3-fp8", device=cuda, dtype=torch.bfloat16, head_dim=128).name == "fa3-fp8"
    assert "fa3-fp8" in available_attention(cuda, torch.bfloat16, 128)
    monkeypatch.setattr(fa3, "_capability", lambda device: (8, 0))
    with pytest.raises(RuntimeError, match="sm90"):
        resolve_attention("fa3-fp8", device=cuda, dtype=torch.bfloat16, head_dim=64)


def test_fa3_call_passes_scale_and_per_kv_head_descales(monkeypatch):
    calls = []
    monkeypatch.setattr(fa3, "fa3_module", lambda: fake_fa3_module(calls))
    q, k, v = qkv(h=4, hk=2)
    fq, fk, fv = (quantize_fp8(x, num_scales=2) for x in (q, k, v))
    out, lse = fa3.call_fa3(fq.data, fk.data, fv.data, 0.25, fq.descale, fk.descale, fv.descale)
    (call,) = calls
    assert call["scale"] == 0.25 and call["return_attn_probs"] is True
    assert [tuple(d.shape) for d in call["descales"]] == [(2, 2)] * 3  # (batch, num_heads_k)
    assert all(d.dtype == torch.float32 for d in call["descales"])
    assert out.shape == q.shape and lse.shape == (2, 4, 33)


def test_sage_call_never_mutates_and_passes_layout(monkeypatch):
    calls = []

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, smooth_k=True):
        calls.append(dict(layout=tensor_layout, causal=is_causal, scale=sm_scale, smooth_k=smooth_k))
        k -= k.mean(dim=1, keepdim=True)  # what sageattention 1.0.6 does to its argument
        return reference(q, k, v, sm_scale)[0].to(q.dtype)

    monkeypatch.setattr(sage, "sage_module", lambda: types.SimpleNamespace(sageattn=sageattn))
    q, k, v = qkv(h=2, hk=2)
    k_before = k.clone()
    out = sage.call_sage(q, k, v, 0.3)
    assert torch.equal(k, k_before)
    assert calls == [dict(layout="NHD", causal=False, scale=0.3, smooth_k=False)]
    assert rel(out, reference(q, k, v, 0.3)[0]) < 1e-5  # subtracting the key mean leaves softmax unchanged


def fake_trtllm(calls):
    class Mask:
        FULL = "full"

    class Meta:
        def __init__(self, **kw):
            self.kw = kw

        def prepare(self):
            calls.append(("prepare", self.kw, self.seq_lens.tolist(), self.num_contexts, self.max_seq_len))

    class TrtllmAttention:
        Metadata = Meta

        def __init__(self, layer_idx, num_heads, head_dim, num_kv_heads, q_scaling=1.0):
            self.h, self.d, self.hk, self.q_scaling = num_heads, head_dim, num_kv_heads, q_scaling

        def support_fused_qkv(self):
            return True

        def forward(self, q, k, v, metadata, attention_mask):
            assert k is None and v is None and attention_mask == "full"
            b, length = len(metadata.seq_lens), metadata.max_seq_len
            qs, ks, vs = q.split([self.h * self.d, self.hk * self.d, self.hk * self.d], dim=-1)
            qs, ks, vs = (x.reshape(b, length, -1, self.d) for x in (qs, ks, vs))
            scale = 1.0 / (self.q_scaling * self.d**0.5)
            calls.append(("forward", tuple(q.shape)))
            return reference(qs, ks, vs, scale)[0].to(q.dtype).reshape(b * length, -1)

    return lambda name: TrtllmAttention, Mask


def test_trtllm_call_packs_tokens_and_maps_scale(monkeypatch):
    calls = []
    monkeypatch.setattr(trtllm, "trtllm_api", lambda: fake_trtllm(calls))
    trtllm._layer.cache_clear()
    trtllm._metadata.cache_clear()
    try:
        q, k, v = qkv(lq=10, lk=10, h=4, hk=2, d=16)
        out = trtllm.call_trtllm(q, k, v, 0.3)
        assert rel(out, reference(q, k, v, 0.3)[0]) < 1e-5
        assert calls[0][2:] == ([10, 10], 2, 10)
        assert calls[1] == ("forward", (20, (4 + 2 + 2) * 16))  # [B * L, (H + 2 Hk) * D], fused qkv
        with pytest.raises(ValueError, match="self-attention only"):
            trtllm.call_trtllm(*qkv(lq=10, lk=12), 0.3)
    finally:
        trtllm._layer.cache_clear()
        trtllm._metadata.cache_clear()


def test_custom_ops_pass_opcheck():
    q, k, v = qkv(b=1, lq=8, lk=12, h=2, hk=1, d=16)
    torch.library.opcheck(torch.ops.dit_rt.fa3_fwd.default, (q, k, v, 0.25))
    torch.library.opcheck(torch.ops.dit_rt.sage_fwd.default, (q, k, v, 0.25))


def test_fa3_fp8_fake_matches_kernel():
    # opcheck compares inputs with ops that CPU fp8 lacks, so check the fake against the kernel by hand.
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = qkv(b=1, lq=8, lk=12, h=2, hk=1, d=16)
    args = [quantize_fp8(x, num_scales=1) for x in (q, k, v)]
    args = [a.data for a in args] + [0.25] + [a.descale for a in args]
    real = torch.ops.dit_rt.fa3_fwd(*args)
    with FakeTensorMode() as mode:
        fake = torch.ops.dit_rt.fa3_fwd(*(mode.from_tensor(a) if torch.is_tensor(a) else a for a in args))
    assert real[0].dtype == torch.bfloat16  # FA3 returns bf16 for fp8 inputs
    for r, f in zip(real, fake):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())


def test_trtllm_fake_gives_output_metadata():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 10, 4, 16, dtype=torch.bfloat16, device="cuda")
        out = torch.ops.dit_rt.trtllm_fwd(q, q, q, 0.25)
    assert out.shape == (2, 10, 4, 16) and out.dtype == torch.bfloat16 and out.device.type == "cuda"


def test_compile_fullgraph_through_the_seam():
    seam = Attention()

    def block(q, k, v):
        a = seam(q, k, v)
        b, lse = attention(q, k, v, return_lse=True, backend="sdpa")
        c, _ = torch.ops.dit_rt.fa3_fwd(q, k, v, q.shape[-1] ** -0.5)
        return a + b + c, lse

    q, k, v = qkv(b=1, lq=8, lk=8, h=2, hk=2, d=16)
    # aot_eager: dynamo's full-graph trace plus AOT functionalization through the fakes, without
    # inductor's C++ build (~50 s on a shared 2-core CI machine); inductor adds nothing to the seam.
    out, lse = torch.compile(block, fullgraph=True, backend="aot_eager")(q, k, v)
    want, want_lse = reference(q, k, v)
    assert rel(out, 3 * want) < 1e-5 and (lse - want_lse).abs().max() < 1e-4


class Custom:
    instances = 0

    def __init__(self):
        Custom.instances += 1

    def __call__(self, query, key, value, attn_mask=None, **kwargs):
        assert attn_mask is None
        return F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=kwargs["scale"]
        ).transpose(1, 2)


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(attn=Attention(head_dim=16))) for _ in range(2))
        self.vae_attn = Attention()


def test_register_class_and_install_with_set_attention():
    register_attention("test-custom")(Custom)
    try:
        assert "test-custom" in available_attention()
        model = TinyModel()
        chosen = set_attention(model, "test-custom")
        assert {b.name for b in chosen.values()} == {"test-custom"} and set(chosen) == {16, None}
        q, k, v = qkv(lq=8, lk=8, h=2, hk=2, d=16)
        out = model.blocks[1]["attn"](q, k, v, 0.3)
        out2 = attention(q, k, v, scale=0.3, backend="test-custom")
        assert rel(out, reference(q, k, v, 0.3)[0]) < 1e-5 and torch.equal(out, out2)
        assert Custom.instances == 1  # instantiated once, lazily
        with pytest.raises(ValueError, match="already registered"):
            register_attention("test-custom")(Custom)
        with pytest.raises(NotImplementedError, match="log-sum-exp"):
            attention(q, k, v, return_lse=True, backend="test-custom")
    finally:
        unregister_attention("test-custom")
    with pytest.raises(ValueError, match="unknown"):
        attention(*qkv(), backend="test-custom")


def test_register_function_with_lse():
    @register_attention("test-fn", lse=True)
    def fn(query, key, value, attn_mask=None, scale=None, return_lse=False):
        return attention(query, key, value, scale=scale, return_lse=return_lse)

    try:
        q, k, v = qkv()
        out, lse = attention(q, k, v, return_lse=True, backend="test-fn")
        assert (lse.double() - reference(q, k, v)[1]).abs().max() < 1e-4
    finally:
        unregister_attention("test-fn")


def test_set_attention_fails_before_installing(monkeypatch):
    monkeypatch.setattr(fa3, "fa3_module", lambda: None)
    model = TinyModel()
    register_attention("test-custom2")(Custom)
    try:
        set_attention(model, "test-custom2")
        with pytest.raises(RuntimeError, match="not installed"):
            set_attention(model, "fa3")
        assert all(m.op.name == "test-custom2" for m in model.modules() if isinstance(m, Attention))
        assert {b.name for b in set_attention(model, "auto").values()} == {"sdpa"}
    finally:
        unregister_attention("test-custom2")


@pytest.mark.parametrize("num_scales,block", [(None, None), (2, None), (None, 32), (1, 64)])
def test_quantize_fp8_scales_and_error(num_scales, block):
    q, _, _ = qkv(lq=100, h=4, d=24)
    x = q * torch.tensor([0.01, 1.0, 30.0, 300.0])[:, None]  # heads of very different ranges
    t = quantize_fp8(x, num_scales=num_scales, block=block)
    s = num_scales or 4
    assert t.data.dtype == torch.float8_e4m3fn and t.data.shape == x.shape
    assert t.descale.shape == ((2, s) if block is None else (2, s, -(-100 // block)))
    assert t.data.float().abs().max() <= fp8.E4M3_MAX and torch.isfinite(t.data.float()).all()
    assert rel(dequantize_fp8(t), x) < 4e-2
    zero = quantize_fp8(torch.zeros(1, 3, 2, 16), block=block)
    assert torch.isfinite(zero.descale).all() and dequantize_fp8(zero).abs().max() == 0


def test_quantize_rejects_bad_groups():
    with pytest.raises(ValueError, match="scale groups"):
        quantize_fp8(torch.zeros(1, 4, 6, 8), num_scales=4)
    with pytest.raises(ValueError, match="power of two"):
        quantize_fp8(torch.zeros(1, 4, 6, 8), block=48)


TRITON_CHECK = """
import torch
from dit_rt.ops.attention import quantize_fp8
g = torch.Generator().manual_seed(3)
x = torch.randn(2, 100, 4, 24, generator=g) * torch.tensor([0.01, 1.0, 30.0, 300.0])[:, None]
for num_scales, block in [(None, None), (2, None), (None, 32)]:
    a = quantize_fp8(x, num_scales=num_scales, block=block, use_triton=False)
    b = quantize_fp8(x, num_scales=num_scales, block=block, use_triton=True)
    assert torch.equal(a.descale, b.descale), (num_scales, block)
    av, bv = a.data.float(), b.data.float()
    # The interpreter's e4m3 cast truncates where the GPU cast (cvt.rn.satfinite) rounds: it drops the
    # carry into the exponent (giving half a power of two) and rounds subnormals (< 2^-6) down by one
    # step (2^-9), 2^-6 included. Everything else must match bit for bit.
    carry = (bv == av / 2) & (torch.log2(av.abs()) % 1 == 0)
    sub = (av.abs() <= 2**-6) & ((av - bv).abs() <= 2**-9)
    ok = carry | sub
    assert torch.equal(av[~ok], bv[~ok]) and ok.float().mean() < 0.05, (num_scales, block)
    # fullgraph compile traces through the custom op; its fake has the real shapes
    def q(t, n=num_scales, blk=block):
        r = quantize_fp8(t, num_scales=n, block=blk, use_triton=True)
        return r.data, r.descale
    cd, cs = torch.compile(q, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(cd.float(), bv) and torch.equal(cs, b.descale), (num_scales, block)
print("match")
"""


def test_triton_quantize_kernel_matches_torch():
    pytest.importorskip(
        "triton", reason="triton is not installed; the kernel is then checked by the GPU bench"
    )
    # The interpreter runs the kernels on CPU tensors; it must be on before triton is first imported.
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "match", out.stderr[-3000:]


def test_package_exports():
    pkg = sys.modules["dit_rt.ops.attention"]  # `dit_rt.ops.attention` the attribute is the function
    for name in pkg.__all__:
        assert hasattr(pkg, name)
