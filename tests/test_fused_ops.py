"""The fused ops of `dit_rt.ops.fused_ops` and the norm / RoPE variants behind them: per-head vs whole-width
QK RMSNorm, interleaved vs split-half RoPE (against float64 math and diffusers' `apply_rotary_emb`), the
backend capability that decides the fp8 hand-offs, and the fp8 dataflow itself (forced on the CPU, where
every consumer's emulated path runs) against the plain one."""

from __future__ import annotations

import pytest
import torch

from dit_rt.ops import elementwise as E

TOL = dict(rtol=1e-5, atol=1e-5)  # float32 results against float64 math
VARIANTS = [(p, lay) for p in (False, True) for lay in ("interleaved", "split_half")]


def _reference(x, w, eps, heads, cos, sin, per_head, layout):
    """float64 RMSNorm (over D or over each head) then RoPE with explicit channel-pair indices."""
    x = x.double().unflatten(-1, (heads, -1))  # [B, L, H, Dh]
    dims = (-1,) if per_head else (-2, -1)
    w = w.double() if per_head else w.double().view(heads, -1)  # [Dh] or [H, Dh]
    n = x * (x.pow(2).mean(dims, keepdim=True) + eps).rsqrt() * w
    Dh = x.shape[-1]
    j = torch.arange(Dh // 2)
    a_idx, b_idx = (2 * j, 2 * j + 1) if layout == "interleaved" else (j, j + Dh // 2)
    c, s = cos.double(), sin.double()  # [L, 1, Dh/2]
    a, b = n[..., a_idx], n[..., b_idx]
    out = n.clone()
    out[..., a_idx], out[..., b_idx] = a * c - b * s, a * s + b * c
    return out


@pytest.mark.parametrize("per_head,layout", VARIANTS)
def test_rms_norm_rope_variants(per_head, layout):
    torch.manual_seed(0)
    B, L, H, Dh = 2, 6, 4, 12
    qkv = torch.randn(B, L, 3 * H * Dh)
    q = qkv[..., : H * Dh]  # a strided view, as a fused projection produces it
    w = torch.randn(Dh if per_head else H * Dh)
    angles = torch.randn(L, 1, Dh // 2, dtype=torch.float64)
    cos, sin = angles.cos().float(), angles.sin().float()
    out = E.rms_norm_rope(q, w, 1e-6, H, cos, sin, per_head=per_head, layout=layout)
    assert out.shape == (B, L, H, Dh) and out.dtype == q.dtype
    ref = _reference(q, w, 1e-6, H, cos, sin, per_head, layout)
    torch.testing.assert_close(out.double(), ref, **TOL)
    # without angles: the norm alone
    n = E.rms_norm_rope(q, w, 1e-6, H, per_head=per_head, layout=layout)
    ref = _reference(q, w, 1e-6, H, cos * 0 + 1, sin * 0, per_head, layout)
    torch.testing.assert_close(n.double(), ref, **TOL)
    if (per_head, layout) != (False, "interleaved"):  # the variants are not Wan's op in disguise
        assert not torch.allclose(out, E.rms_norm_rope(q, w.repeat(H) if per_head else w, 1e-6, H, cos, sin))
    with pytest.raises(ValueError, match="RoPE layout"):
        E.apply_rope(out, cos, sin, "halves")


@pytest.mark.parametrize("layout,unbind", [("interleaved", -1), ("split_half", -2)])
def test_rope_layouts_match_diffusers(layout, unbind):
    """interleaved = diffusers' FLUX RoPE (use_real_unbind_dim=-1), split_half = its Cosmos RoPE (-2), with
    their [S, Dh] tables built from the same angles (repeated per pair, or the two halves concatenated)."""
    from diffusers.models.embeddings import apply_rotary_emb

    torch.manual_seed(0)
    B, L, H, Dh = 2, 5, 3, 16
    x = torch.randn(B, L, H, Dh)
    angles = torch.randn(L, 1, Dh // 2)
    cos, sin = angles.cos(), angles.sin()
    full = (lambda t: t[:, 0].repeat_interleave(2, -1)) if unbind == -1 else (lambda t: t[:, 0].repeat(1, 2))
    want = apply_rotary_emb(x, (full(cos), full(sin)), use_real_unbind_dim=unbind, sequence_dim=1)
    torch.testing.assert_close(E.apply_rope(x, cos, sin, layout), want)


@pytest.mark.parametrize("per_head,layout", VARIANTS)
def test_rms_norm_rope_fp8_variants(per_head, layout):
    """The static scale bounds every code (no saturation, even with a head's energy in one channel) and the
    codes are the plain op's; the fused q, k, v codes' torch path gives the same q / k codes."""
    torch.manual_seed(0)
    B, L, H, Dh = 2, 6, 4, 16
    D = H * Dh
    x = torch.randn(B, L, D)
    x[1, 2] = 0.0
    x[1, 2, 7] = 9.0  # one channel carries the row (and its head): |xhat| = sqrt(width) there
    w = torch.rand(Dh if per_head else D) + 0.5
    angles = torch.randn(L, 1, Dh // 2)
    cos, sin = angles.cos(), angles.sin()
    fmt = dict(per_head=per_head, layout=layout)
    ref = E.rms_norm_rope(x, w, 1e-6, H, cos, sin, **fmt)
    q, s = E.rms_norm_rope_fp8(x, w, 1e-6, H, cos, sin, **fmt)
    assert q.shape == (B, L, H, Dh) and q.dtype == torch.float8_e4m3fn
    assert q.float().abs().max() < 448
    assert ((q.float() * s - ref).norm() / ref.norm()).item() < 0.05
    qkv = torch.randn(B, L, 3 * D)
    wk = torch.rand(w.shape) + 0.5
    got = E.qkv_norm_rope_fp8(qkv, w, wk, 1e-6, H, cos, sin, qkv.abs().amax(), **fmt)
    for codes, t, wt in ((got[0], qkv[..., :D], w), (got[1], qkv[..., D : 2 * D], wk)):
        want, scale = E.rms_norm_rope_fp8(t, wt, 1e-6, H, cos, sin, **fmt)
        assert torch.equal(codes.q.float(), want.float()) and torch.equal(codes.scale, scale)


def test_takes_codes_is_a_backend_capability():
    """Whether an attention takes fp8 codes is the backend's declared `takes_codes`, not its name: fa3-fp8
    declares it, sdpa and user backends do not, a backend of any name may, and a wrapper without the
    attribute (sequence parallelism) gets tensors."""
    from dit_rt.ops.attention import Attention, AttentionBackend
    from dit_rt.ops.attention.fa3 import FA3, FA3_FP8
    from dit_rt.ops.attention.sdpa import SDPA
    from dit_rt.ops.fused_ops import takes_codes

    assert FA3_FP8.takes_codes and not FA3.takes_codes and not SDPA.takes_codes
    attn = Attention(head_dim=16)
    assert not attn.takes_fp8_codes
    attn.op = AttentionBackend("my-fp8", SDPA.fn, takes_codes=True)
    assert attn.takes_fp8_codes
    assert not takes_codes(attn, torch.zeros(1))  # CPU tensors: the plain path

    class Wrapper:  # what a sequence-parallel op looks like to the model: a name, no capability
        name = "fa3-fp8+sp(ulysses=2, ring=1)"

        def __call__(self, q, k, v, scale=None):
            return FA3_FP8(q, k, v, scale)

    attn.op = Wrapper()
    assert not attn.takes_fp8_codes


def _force_codes(consumer, x) -> bool:
    """`takes_codes` as on an fp8 GPU: fp8-per-tensor Linears and code-taking backends, on any device."""
    from dit_rt.ops.attention import Attention
    from dit_rt.ops.linear import Linear

    if isinstance(consumer, Attention):
        return consumer.takes_fp8_codes
    return isinstance(consumer, Linear) and getattr(consumer._format, "code_mode", None) == "tensor"


@pytest.mark.parametrize("per_head,layout", VARIANTS)
@pytest.mark.parametrize("one_pass", [True, False])
def test_fp8_dataflow_of_a_self_attention(monkeypatch, per_head, layout, one_pass):
    """modulated norm -> fused qkv -> QK norm + RoPE -> attention -> output projection with every hand-off
    as fp8 codes (forced on the CPU: fp8-per-tensor Linears, fa3-fp8's emulated kernel) stays within fp8
    error of the same chain in float32; one_pass: LayerNorm codes with a row-norm bound, so q, k, v come
    as codes from one pass over the projection's output; else v is quantized on its own."""
    from dit_rt.ops import fused_ops
    from dit_rt.ops.attention import Attention
    from dit_rt.ops.attention.fa3 import FA3_FP8
    from dit_rt.ops.codes import Fp8Codes
    from dit_rt.ops.linear import Linear

    torch.manual_seed(0)
    B, L, H, Dh = 2, 12, 4, 16
    D = H * Dh
    proj, out = Linear(D, 3 * D), Linear(D, D)
    for lin in (proj, out):
        torch.nn.init.normal_(lin.weight, std=D**-0.5)
        torch.nn.init.normal_(lin.bias, std=0.1)
    norm_q, norm_k = (torch.nn.RMSNorm(Dh if per_head else D, eps=1e-6) for _ in range(2))
    for n in (norm_q, norm_k):
        n.weight.data.uniform_(0.5, 1.5)
    attn = Attention(head_dim=Dh)
    angles = torch.randn(L, 1, Dh // 2)
    rope = (angles.cos(), angles.sin())
    x = torch.randn(B, L, D)
    shift, scale1 = 0.3 * torch.randn(B, 1, D), 1 + 0.5 * torch.randn(B, 1, D)
    fmt = dict(per_head=per_head, layout=layout)

    def block():
        y = fused_ops.norm_into(proj, x, shift, scale1, 1e-6)
        if not one_pass and isinstance(y, Fp8Codes):
            y = y._replace(row_norm=None)  # no bound on v: v gets its own amax pass
        q, k, v = fused_ops.qkv_norm_rope(proj, y, norm_q, norm_k, H, rope, attn=attn, out=out, **fmt)
        return fused_ops.attention_into(out, attn, q, [(k, v)]), (q, k, v)

    exact, plain = block()
    assert not any(isinstance(t, Fp8Codes) for t in plain)  # CPU, sdpa, float32 Linears: tensors
    monkeypatch.setattr(fused_ops, "takes_codes", _force_codes)
    attn.op = FA3_FP8
    proj.convert("fp8-per-tensor")
    out.convert("fp8-per-tensor")
    got, codes = block()
    assert all(isinstance(t, Fp8Codes) for t in codes)
    assert all(t.q.float().abs().max() <= 448 for t in codes)  # nothing beyond the e4m3 range
    assert all(t.q.float().abs().max() < 448 for t in codes[:2])  # q, k: the static RMSNorm bound held
    assert got.shape == exact.shape and ((got - exact).norm() / exact.norm()).item() < 0.1


def test_attention_into_sums_several_attentions(monkeypatch):
    """Two attentions over different keys (Wan I2V's text and image) summed into one output projection:
    as a tensor, and as codes bounded by both values' scales."""
    from dit_rt.ops import fused_ops
    from dit_rt.ops.attention import Attention
    from dit_rt.ops.attention.fa3 import FA3_FP8
    from dit_rt.ops.linear import Linear

    torch.manual_seed(0)
    B, L, H, Dh = 2, 10, 2, 16
    out = Linear(H * Dh, 24)
    torch.nn.init.normal_(out.weight, std=(H * Dh) ** -0.5)
    torch.nn.init.normal_(out.bias, std=0.1)
    attn = Attention(head_dim=Dh)
    q = torch.randn(B, L, H, Dh)
    kv = [(torch.randn(B, n, H, Dh), torch.randn(B, n, H, Dh)) for n in (7, 5)]
    exact = fused_ops.attention_into(out, attn, q, kv)
    want = out((attn(q, *kv[0]) + attn(q, *kv[1])).flatten(2))
    assert torch.equal(exact, want)
    monkeypatch.setattr(fused_ops, "takes_codes", _force_codes)
    attn.op = FA3_FP8
    out.convert("fp8-per-tensor")
    got = fused_ops.attention_into(out, attn, q, kv)
    assert ((got - exact).norm() / exact.norm()).item() < 0.1


VARIANT_KERNELS = """
import torch
from dit_rt.ops import elementwise as E

torch.manual_seed(0)
for dt in (torch.float32, torch.bfloat16):
    tol = 1e-5 if dt == torch.float32 else 2.0**-6
    B, L, H, Dh = 2, 5, 3, 16  # 3 heads pad the row to 4 in the kernel
    D = H * Dh
    qkv = torch.randn(B, L, 3 * D).to(dt)
    q = qkv[..., D : 2 * D]  # a strided slice of a fused projection
    cos, sin = torch.randn(L, 1, Dh // 2), torch.randn(L, 1, Dh // 2)
    c, s = cos.reshape(L, -1).contiguous(), sin.reshape(L, -1).contiguous()
    for per_head in (False, True):
        for layout in ("interleaved", "split_half"):
            fmt = dict(per_head=per_head, layout=layout)
            var = dict(head_dim=Dh if per_head else 0, split_half=layout == "split_half")
            wq, wk = (torch.randn(Dh if per_head else D).to(dt) for _ in range(2))
            ref = E.rms_norm_rope(q, wq, 1e-6, H, cos, sin, **fmt)  # CPU tensors: the torch path
            got = E._rms_norm_rope_cuda(q, wq, 1e-6, c, s, **var).unflatten(-1, (H, -1))
            err = ((ref.float() - got.float()).abs().max() / ref.float().abs().max()).item()
            assert got.dtype == dt and err <= tol, (per_head, layout, dt, err)
            if per_head:  # the norm alone
                ref = E.rms_norm_rope(q, wq, 1e-6, H, per_head=True)
                got = E._rms_norm_rope_cuda(q, wq, 1e-6, None, None, head_dim=Dh).unflatten(-1, (H, -1))
                err = ((ref.float() - got.float()).abs().max() / ref.float().abs().max()).item()
                assert err <= tol, ("norm", dt, err)
            # q, k, v codes in one pass: the interpreter's e4m3 cast truncates where the GPU rounds, so codes
            # agree to one e4m3 step (as the kernel test in test_elementwise.py)
            vb = qkv[..., 2 * D :].float().abs().amax() * 1.5
            ref3 = E.qkv_norm_rope_fp8(qkv, wq, wk, 1e-6, H, cos, sin, vb, **fmt)
            qi = torch.cat([1.0 / t.scale for t in ref3])
            got3 = E._qkv_fp8_cuda(qkv, wq, wk, 1e-6, c, s, qi, None, **var).unflatten(-1, (H, -1))
            for i, t in enumerate(ref3):
                av, bv = t.q.float(), got3[i].float()
                carry = (bv == av / 2) & (torch.log2(av.abs()) % 1 == 0)
                close = (av - bv).abs() <= 2**-3 * av.abs() + 2**-6 * av.abs().max()
                assert (carry | close).all(), (per_head, layout, dt, i)
print("ok")
"""


def test_triton_kernel_variants_match_torch_path():
    """The per-head norm and the split-half RoPE of the Triton kernel (TRITON_INTERPRET on the CPU) against
    the torch path, which the tests above hold against float64 math and diffusers."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton", reason="the Triton kernels need the triton package (test extra)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run(
        [sys.executable, "-c", VARIANT_KERNELS], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
