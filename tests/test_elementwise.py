"""Fused block ops: the torch path against explicit float64 math, and the Triton kernels (run by Triton's
CPU interpreter in a subprocess) against the torch path."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dit_rt.ops import elementwise as E

TOL = dict(rtol=1e-5, atol=1e-5)  # float32 results against float64 math


def _data(dtype=torch.float32, B=2, L=6, D=48):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, D, generator=g).to(dtype)
    return x, torch.randn(B, 1, D, generator=g), 1 + torch.randn(B, 1, D, generator=g)


def test_layer_norm_modulate_math():
    x, shift, scale1 = _data()
    x64 = x.double()
    ln = (x64 - x64.mean(-1, keepdim=True)) / (x64.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(
        E.layer_norm_modulate(x, shift, scale1, 1e-6).double(), ln * scale1 + shift, **TOL
    )
    w, b = torch.randn(48), torch.randn(48)
    torch.testing.assert_close(E.layer_norm_modulate(x, None, None, 1e-6, w, b).double(), ln * w + b, **TOL)
    assert E.layer_norm_modulate(x.bfloat16(), shift, scale1, 1e-6).dtype == torch.bfloat16


def test_gated_residual_math():
    x, y, gate = _data()
    torch.testing.assert_close(E.gated_residual(x, y.expand(2, 6, 48).contiguous(), gate), x + y * gate)


def test_rms_norm_rope_math():
    qkv, _, _ = _data(D=3 * 48)
    q = qkv[..., :48]  # a strided view, as the fused projection produces it
    w = torch.randn(48)
    angles = torch.randn(6, 1, 6, dtype=torch.float64)  # L=6 tokens, 4 heads of 12 channels -> 6 pairs
    out = E.rms_norm_rope(q, w, 1e-6, 4, angles.cos().float(), angles.sin().float())
    q64 = q.double()
    n = (q64 * (q64.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt() * w.double()).unflatten(-1, (4, 6, 2))
    a, b = n[..., 0], n[..., 1]
    ref = torch.stack((a * angles.cos() - b * angles.sin(), a * angles.sin() + b * angles.cos()), -1).flatten(
        -2
    )
    assert out.shape == (2, 6, 4, 12)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


KERNELS = """
import torch
from dit_rt.ops import elementwise as E

TOL = dict(rtol=1e-5, atol=1e-5)  # float32 results against float64 math
torch.manual_seed(0)
worst = {}
for dt in (torch.float32, torch.bfloat16):
    B, L, D, H = 2, 6, 48, 4
    tol = 1e-5 if dt == torch.float32 else 2.0**-6  # fp32: reduction order; bf16: a rounding step or two
    x = torch.randn(B, L, D).to(dt)
    shift, scale1 = torch.randn(B, 1, D), 1 + torch.randn(B, 1, D)
    w, b = torch.randn(D), torch.randn(D)
    y, g = torch.randn(B, L, D).to(dt), torch.randn(B, 1, D)
    qkv = torch.randn(B, L, 3 * D).to(dt)
    q, wq = qkv[..., D : 2 * D], torch.randn(D).to(dt)
    cos, sin = torch.randn(L, 1, D // H // 2), torch.randn(L, 1, D // H // 2)
    c, s = cos.reshape(L, -1).contiguous(), sin.reshape(L, -1).contiguous()
    pairs = {
        "ln_modulate": (E.layer_norm_modulate(x, shift, scale1, 1e-6),
                        E._ln_modulate_cuda(x, shift, scale1, 1e-6)),
        "ln_affine": (E.layer_norm_modulate(x, None, None, 1e-6, w, b),
                      E._ln_modulate_cuda(x, b.view(1, 1, D), w.view(1, 1, D), 1e-6)),
        "gated_residual": (E.gated_residual(x, y, g), E._gated_residual_cuda(x, y, g)),
        "rms_rope": (E.rms_norm_rope(q, wq, 1e-6, H, cos, sin),
                     E._rms_norm_rope_cuda(q, wq, 1e-6, c, s).unflatten(-1, (H, -1))),
        "rms": (E.rms_norm_rope(q, wq, 1e-6, H),
                E._rms_norm_rope_cuda(q, wq, 1e-6, None, None).unflatten(-1, (H, -1))),
    }
    r = torch.randn(B, L, D).to(dt)
    total, normed = E._add_ln_modulate_cuda(x, r, shift, scale1, 1e-6)
    pairs["add+ln_modulate (sum)"] = (x + r, total)
    pairs["add+ln_modulate"] = (E.layer_norm_modulate(x + r, shift, scale1, 1e-6), normed)
    # the gated residual and an affine LayerNorm in one pass (Wan's attn1 residual + the cross-attention norm)
    total, normed = E._add_ln_modulate_cuda(x, r, b.view(1, 1, D), w.view(1, 1, D), 1e-6, None, g)
    pairs["gated add+ln_affine (sum)"] = (E.gated_residual(x, r, g), total)
    pairs["gated add+ln_affine"] = (E.layer_norm_modulate(E.gated_residual(x, r, g), None, None, 1e-6, w, b),
                                    normed)
    # Head dim 16 (8 angles, a power of two): the kernel's per-head broadcast of the angles; 3 heads pad
    # the row to 4. Head dim 12 above takes the per-pair gather.
    cos8, sin8 = torch.randn(L, 1, 8), torch.randn(L, 1, 8)
    pairs["rms_rope(head dim 16)"] = (
        E.rms_norm_rope(q, wq, 1e-6, 3, cos8, sin8),
        E._rms_norm_rope_cuda(q, wq, 1e-6, cos8.reshape(L, 8).contiguous(), sin8.reshape(L, 8).contiguous())
        .unflatten(-1, (3, -1)),
    )
    padded = torch.randn(B, L + 3, D).to(dt)  # a sequence shard of a padded batch: rows not uniformly strided
    shard = padded[:, 1 : L + 1]
    pairs["ln_modulate(shard)"] = (E.layer_norm_modulate(shard, shift, scale1, 1e-6),
                                   E._ln_modulate_cuda(shard, shift, scale1, 1e-6))
    pairs["gated_residual(shard)"] = (E.gated_residual(x, shard, g), E._gated_residual_cuda(x, shard, g))
    pairs["rms(shard)"] = (E.rms_norm_rope(shard, wq, 1e-6, H),
                           E._rms_norm_rope_cuda(shard, wq, 1e-6, None, None).unflatten(-1, (H, -1)))
    # per-frame modulation and gate (Cosmos Video2World): row t of [B, T, D] for the t-th L / T tokens
    Tf, Lf = 3, 3 * E._LN_ROWS_PER_PROGRAM
    xf, rf = torch.randn(B, Lf, D).to(dt), torch.randn(B, Lf, D).to(dt)
    sf, cf, gf = torch.randn(B, Tf, D), 1 + torch.randn(B, Tf, D), torch.randn(B, Tf, D)
    pairs["ln_modulate(per frame)"] = (E.layer_norm_modulate(xf, sf, cf, 1e-6),
                                       E._ln_modulate_cuda(xf, sf, cf, 1e-6))
    pairs["gated_residual(per frame)"] = (E.gated_residual(xf, rf, gf), E._gated_residual_cuda(xf, rf, gf))
    total, normed = E._add_ln_modulate_cuda(xf, rf, sf, cf, 1e-6, None, gf)
    pairs["gated add+ln_modulate(per frame, sum)"] = (E.gated_residual(xf, rf, gf), total)
    pairs["gated add+ln_modulate(per frame)"] = (E.layer_norm_modulate(total, sf, cf, 1e-6), normed)
    assert not E._kernel_rows(Lf + 1, sf) and E._kernel_rows(Lf, sf, gf) and E._kernel_rows(5, shift)
    # the VAE's RMS norm + SiLU, written into the frames of a time-padded channels-last conv buffer
    video = torch.randn(B, 6, 3, 2, 4).to(dt).contiguous(memory_format=torch.channels_last_3d)
    buf = torch.zeros(B, 6, 5, 2, 4, dtype=dt).contiguous(memory_format=torch.channels_last_3d)
    gv = torch.randn(6).to(dt)
    E._rms_norm_silu_cuda(video, gv, 1e-6, buf[:, :, 2:])
    ref_v = torch.nn.functional.rms_norm(video.movedim(1, -1), (6,), gv, eps=1e-6).movedim(-1, 1)
    pairs["rms_norm_silu"] = (torch.nn.functional.silu(ref_v), buf[:, :, 2:])
    assert (buf[:, :, :2] == 0).all()  # the history frames are left alone
    for name, (ref, got) in pairs.items():
        assert got.dtype == dt and got.shape == ref.shape, name
        err = ((ref.float() - got.float()).abs().max() / ref.float().abs().max()).item()
        assert err <= tol, (name, dt, err)
    # LN + modulate and RMSNorm + RoPE straight to e4m3 codes with the static scale: the kernels against the
    # torch paths. The interpreter's e4m3 cast truncates where the GPU rounds (a carry into the exponent is
    # lost, halving the code) and its bf16 rounding differs (RoPE's a cos - b sin cancels): codes agree to
    # one e4m3 step, or to 2^-6 of the largest code where the rotation cancels.
    ref_q, qs = E.layer_norm_modulate_fp8(x, shift, scale1, 1e-6)[:2]
    got_q = E._ln_modulate_cuda(x, shift, scale1, 1e-6, 1.0 / qs)
    rq, rs = E.rms_norm_rope_fp8(q, wq, 1e-6, H, cos, sin)  # q: a strided slice of a fused qkv output
    gq = E._rms_norm_rope_cuda(q, wq, 1e-6, c, s, 1.0 / rs).unflatten(-1, (H, -1))
    # fused q, k, v codes of one [q | k | v] projection (wq, wk: the q / k norms' weights)
    wk = torch.randn(D).to(dt)
    vb = qkv[..., 2 * D :].float().abs().amax() * 1.5
    qb = torch.randn(3 * D).to(dt)  # the projection's bias, added in the same pass
    ref3 = E.qkv_norm_rope_fp8(qkv, wq, wk, 1e-6, H, cos, sin, vb, qb)  # CPU tensors: the torch path
    qi = torch.cat([1.0 / t.scale for t in ref3])
    got3 = E._qkv_fp8_cuda(qkv, wq, wk, 1e-6, c, s, qi, qb).unflatten(-1, (H, -1))
    pairs8 = [(ref_q, got_q), (rq, gq)] + [(t.q, got3[i]) for i, t in enumerate(ref3)]
    # per-frame modulation (Cosmos Video2World's fast mode): LN + modulate and the gated add + LN to codes
    ref_fq, fqs = E.layer_norm_modulate_fp8(xf, sf, cf, 1e-6)[:2]
    ref_gq = E.layer_norm_modulate_fp8(E.gated_residual(xf, rf, gf), sf, cf, 1e-6).q
    pairs8 += [(ref_fq, E._ln_modulate_cuda(xf, sf, cf, 1e-6, 1.0 / fqs)),
               (ref_gq, E._add_ln_modulate_cuda(xf, rf, sf, cf, 1e-6, 1.0 / fqs, gf)[1])]
    biased = (qkv.float() + qb.float()).to(dt)
    want_q = E.rms_norm_rope_fp8(biased[..., :D], wq, 1e-6, H, cos, sin)[0]
    assert torch.equal(ref3[0].q.float(), want_q.float())
    for ref_codes, got_codes in pairs8:
        assert got_codes.dtype == torch.float8_e4m3fn and got_codes.shape == ref_codes.shape
        av, bv = ref_codes.float(), got_codes.float()
        # the lost carry: b a power of two, 2b within an e4m3 step of a
        carry = (torch.log2(bv.abs()) % 1 == 0) & ((av - 2 * bv).abs() <= 2**-2 * bv.abs())
        close = (av - bv).abs() <= 2**-3 * av.abs() + 2**-6 * av.abs().max()
        assert (carry | close).all() and (av == bv).float().mean() > 0.9, (av - bv).abs().max()
print("ok")
"""


def test_triton_kernels_match_torch_path():
    pytest.importorskip("triton", reason="the Triton kernels need the triton package (test extra)")
    env = dict(__import__("os").environ, TRITON_INTERPRET="1")
    out = subprocess.run(
        [sys.executable, "-c", KERNELS], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_straight_to_fp8_codes(affine):
    """The static per-tensor scale bounds every output (no code saturates), the codes are the LayerNorm
    output's, and a fp8-per-tensor Linear fed those codes stays within fp8 error of the unquantized chain."""
    from dit_rt.ops.elementwise import layer_norm_modulate, layer_norm_modulate_fp8
    from dit_rt.ops.linear import Fp8Codes, Linear

    torch.manual_seed(0)
    B, L, D = 2, 40, 64
    x = torch.randn(B, L, D) * 3 + 1
    x[0, 3] = 0.0
    x[0, 3, 5] = 50.0  # one spike: LN puts nearly all of the row's energy in one channel (|xhat| ~ sqrt(D))
    if affine:
        shift = scale1 = None
        w, b = torch.randn(D), torch.randn(D)
    else:
        shift, scale1, w, b = torch.randn(B, 1, D), 1 + torch.randn(B, 1, D), None, None
    ref = layer_norm_modulate(x, shift, scale1, 1e-6, w, b)
    codes = layer_norm_modulate_fp8(x, shift, scale1, 1e-6, w, b)
    q, s = codes.q, codes.scale
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == (1,)
    assert q.float().abs().max() < 448  # the bound held: nothing clipped, even the spike
    deq = q.float() * s
    assert ((deq - ref).norm() / ref.norm()).item() < 0.05
    # The row-norm bound covers every dequantized row, the spike's included, and is not vacuous.
    norms = deq.norm(dim=-1)
    assert codes.row_norm.shape == (1,) and (norms <= codes.row_norm).all()
    assert codes.row_norm < 4 * norms.max()
    plain = layer_norm_modulate_fp8(x, shift, scale1, 1e-6, w, b, row_norm=False)
    assert plain.row_norm is None and torch.equal(plain.q.float(), q.float())
    lin = Linear(D, 32)
    torch.nn.init.normal_(lin.weight, std=D**-0.5)
    torch.nn.init.normal_(lin.bias, std=0.1)
    exact = lin(ref)
    lin.convert("fp8-per-tensor")
    got = lin(codes)
    assert got.shape == (B, L, 32) and ((got - exact).norm() / exact.norm()).item() < 0.06
    assert not lin.takes_fp8_codes(x)  # CPU: the model keeps the plain path
    rowwise = Linear(D, 32)
    rowwise.convert("fp8-rowwise")
    with pytest.raises(ValueError, match="cannot take these fp8 codes"):
        rowwise(Fp8Codes(q, s, x.dtype))


def test_rms_norm_rope_straight_to_fp8_codes():
    """Static scale from the RMSNorm bound: no code saturates (even for a one-hot row), the codes are the
    rms_norm_rope output's; fa3-fp8 takes them with that one scale for every head; other backends and
    CPU tensors keep the plain path."""
    from dit_rt.ops.attention import Attention
    from dit_rt.ops.attention.fa3 import FA3_FP8, fp8_operand
    from dit_rt.ops.codes import Fp8Codes
    from dit_rt.ops.elementwise import rms_norm_rope, rms_norm_rope_fp8
    from dit_rt.ops.fused_ops import qk_norm_rope
    from models.wan.transformer import rope_freqs

    torch.manual_seed(0)
    B, L, D, H = 2, 12, 48, 4
    x = torch.randn(B, L, D)
    x[1, 2] = 0.0
    x[1, 2, 7] = 9.0  # all of a row's energy in one channel: |xhat| = sqrt(D) there
    w = torch.rand(D) + 0.5
    rope = rope_freqs((1, 3, 4), D // H, torch.device("cpu"))
    ref = rms_norm_rope(x, w, 1e-6, H, rope.cos, rope.sin)
    q, s = rms_norm_rope_fp8(x, w, 1e-6, H, rope.cos, rope.sin)
    assert q.shape == (B, L, H, D // H) and q.dtype == torch.float8_e4m3fn
    assert q.float().abs().max() < 448
    assert ((q.float() * s - ref).norm() / ref.norm()).item() < 0.05
    data, descale = fp8_operand(Fp8Codes(q, s, x.dtype), heads_kv=H)
    assert data is q and descale.shape == (B, H) and torch.equal(descale, s.expand(B, H))
    data, descale = fp8_operand(ref, heads_kv=2)  # a tensor: quantized here, per (batch, kv head)
    assert data.dtype == torch.float8_e4m3fn and descale.shape == (B, 2)
    attn = Attention(head_dim=D // H)
    assert not attn.takes_fp8_codes  # sdpa
    attn.op = FA3_FP8
    norm = torch.nn.RMSNorm(D, eps=1e-6)
    norm.weight.data.copy_(w)
    got = qk_norm_rope(attn, x, norm, H, rope)
    assert attn.takes_fp8_codes and torch.equal(got, ref)  # CPU tensors: the plain path


def test_attention_values_and_output_as_codes():
    """v as per-tensor codes (from a strided q/k/v slice), then the attention output quantized with the
    bound |o| <= max|v| instead of an amax pass: even one-hot attention (o = a row of v) does not saturate,
    and text + image outputs are summed in the same pass."""
    from dit_rt.ops.fused_ops import out_codes, v_codes

    torch.manual_seed(0)
    B, L, H, Dh = 2, 10, 4, 16
    qkv = torch.randn(B, L, 3 * H * Dh)
    v = qkv[..., 2 * H * Dh :]
    vq = v_codes(v, H)
    assert vq.q.shape == (B, L, H, Dh) and vq.q.dtype == torch.float8_e4m3fn and vq.scale.shape == (1,)
    vd = vq.q.float() * vq.scale
    assert ((vd - v.unflatten(-1, (H, Dh))).norm() / v.norm()).item() < 0.05
    flat = torch.softmax(torch.randn(B, H, L, L), dim=-1)
    peaky = torch.nn.functional.one_hot(torch.randint(0, L, (B, H, L)), L).float()  # o = a row of v
    for p in (flat, peaky):
        o = torch.einsum("bhqk,bkhd->bqhd", p, vd)
        codes = out_codes(o, [vq.scale])
        assert codes.q.shape == (B, L, H * Dh) and codes.q.float().abs().max() < 448
        deq = codes.q.float() * codes.scale
        assert ((deq - o.flatten(2)).norm() / o.norm()).item() < 0.08
    o2 = torch.einsum("bhqk,bkhd->bqhd", flat, vd * 0.5)
    both = out_codes(o, [vq.scale, vq.scale * 0.5], o2)
    ref = (o + o2).flatten(2)
    assert ((both.q.float() * both.scale - ref).norm() / ref.norm()).item() < 0.08


def test_add_layer_norm_modulate():
    """(x + r, LN(x + r) modulated) with the sum rounded to the model dtype first, as the unfused add;
    fp8=True gives the same codes, scale and row-norm bound as layer_norm_modulate_fp8 of the sum."""
    from dit_rt.ops.elementwise import (
        add_layer_norm_modulate,
        gated_residual,
        layer_norm_modulate,
        layer_norm_modulate_fp8,
    )

    torch.manual_seed(0)
    B, L, D = 2, 5, 32
    x, r = torch.randn(B, L, D).bfloat16(), torch.randn(B, L, D).bfloat16()
    shift, scale1 = torch.randn(B, 1, D), 1 + torch.randn(B, 1, D)
    total, y = add_layer_norm_modulate(x, r, shift, scale1, 1e-6)
    assert total.dtype == torch.bfloat16 and torch.equal(total, x + r)
    assert torch.equal(y, layer_norm_modulate(x + r, shift, scale1, 1e-6))
    total, codes = add_layer_norm_modulate(x, r, shift, scale1, 1e-6, fp8=True)
    want = layer_norm_modulate_fp8(x + r, shift, scale1, 1e-6)
    assert torch.equal(total, x + r) and torch.equal(codes.q.float(), want.q.float())
    assert torch.equal(codes.scale, want.scale) and torch.equal(codes.row_norm, want.row_norm)
    # gated (x + r * gate in fp32) and affine: the same sum as `gated_residual`, the same codes as
    # layer_norm_modulate_fp8 of it; row_norm=False skips the bound
    gate, w, b = torch.randn(B, 1, D), torch.randn(D), torch.randn(D)
    summed = gated_residual(x, r, gate)
    total, y = add_layer_norm_modulate(x, r, None, None, 1e-6, gate=gate, weight=w, bias=b)
    assert torch.equal(total, summed) and not torch.equal(total, x + r)
    assert torch.equal(y, layer_norm_modulate(summed, None, None, 1e-6, w, b))
    total, codes = add_layer_norm_modulate(
        x, r, None, None, 1e-6, gate=gate, weight=w, bias=b, fp8=True, row_norm=False
    )
    want = layer_norm_modulate_fp8(summed, None, None, 1e-6, w, b)
    assert torch.equal(codes.q.float(), want.q.float()) and torch.equal(codes.scale, want.scale)
    assert codes.row_norm is None


def test_qkv_codes_in_one_pass():
    """q, k and v of a fused fp8-per-tensor projection fed LayerNorm codes, as codes in one pass: q / k
    equal rms_norm_rope_fp8's, v's scale comes from the projection's weight row norms times the codes'
    row-norm bound (no amax), which covers every value (nothing saturates, even for an input row lined up
    with a v weight row) and keeps fp8 precision; without a row-norm bound there is none."""
    from dit_rt.ops.elementwise import layer_norm_modulate_fp8, qkv_norm_rope_fp8, rms_norm_rope_fp8
    from dit_rt.ops.linear import Linear
    from dit_rt.ops.linear.fp8 import output_bound
    from models.wan.transformer import rope_freqs

    torch.manual_seed(0)
    B, L, D, H = 2, 12, 64, 4
    qkv_proj = Linear(D, 3 * D)
    torch.nn.init.normal_(qkv_proj.weight, std=D**-0.5)
    torch.nn.init.normal_(qkv_proj.bias, std=0.1)
    shift, scale1 = 0.3 * torch.randn(B, 1, D), 1 + 0.5 * torch.randn(B, 1, D)
    x = torch.randn(B, L, D)
    x[1, 5] = (qkv_proj.weight[2 * D + 3].detach() - shift[1, 0]) / scale1[1, 0]  # leans on a v weight row
    qkv_proj.convert("fp8-per-tensor")
    codes = layer_norm_modulate_fp8(x, shift, scale1, 1e-6)
    qkv = qkv_proj(codes)
    bound = output_bound(qkv_proj, codes)
    assert bound.shape == (1,) and (qkv.float().abs().max() <= bound).all()
    assert output_bound(qkv_proj, codes._replace(row_norm=None)) is None
    wq, wk = torch.rand(D) + 0.5, torch.rand(D) + 0.5
    rope = rope_freqs((1, 3, 4), D // H, torch.device("cpu"))
    q, k, v = qkv_norm_rope_fp8(qkv, wq, wk, 1e-6, H, rope.cos, rope.sin, bound)
    for got, t, w in ((q, qkv[..., :D], wq), (k, qkv[..., D : 2 * D], wk)):
        want, scale = rms_norm_rope_fp8(t, w, 1e-6, H, rope.cos, rope.sin)
        assert torch.equal(got.q.float(), want.float()) and torch.equal(got.scale, scale)
    vref = qkv[..., 2 * D :].unflatten(-1, (H, -1)).float()
    assert v.q.shape == (B, L, H, D // H) and v.q.float().abs().max() < 448
    assert torch.allclose(v.scale, bound / 448)
    assert ((v.q.float() * v.scale - vref).norm() / vref.norm()).item() < 0.05
    # the projection's bias left out of the GEMM and added in this pass: the same codes
    unbiased = qkv_proj(codes, bias=False)
    assert not torch.allclose(unbiased, qkv)
    for a, b in zip(
        qkv_norm_rope_fp8(unbiased, wq, wk, 1e-6, H, rope.cos, rope.sin, bound, qkv_proj.bias), (q, k, v)
    ):
        assert torch.equal(a.q.float(), b.q.float()) and torch.equal(a.scale, b.scale)
    with pytest.raises(ValueError, match="takes fp8 codes"):
        qkv_proj(x, bias=False)


SWIGLU = """
import torch, torch.nn.functional as F
from dit_rt.ops import elementwise as E
torch.manual_seed(0)
B, L, D, M = 2, 5, 24, 3000  # M spans two column blocks, the second partial
# float16 only: the interpreter casts float32 to bfloat16 by truncation (the GPU rounds to nearest even)
for dt in (torch.float16,):
    y = (torch.randn(B, L, 3 * D + 2 * M) * 4).to(dt)
    gate, up = y[..., 3 * D : 3 * D + M], y[..., 3 * D + M :]  # strided slices of one projection
    want = F.silu(gate) * up
    exact = F.silu(gate.double()) * up.double()
    out = torch.empty(B, L, M, dtype=dt)
    E._swiglu_cuda(gate, up, out)
    # the torch ops' two roundings (SiLU to the dtype, then the product): the same error bound, and the same
    # values but where an fp32 exp differs in its last bit next to a rounding boundary
    bound = 2.5 * 2.0**-11 * exact.abs() + 2.0**-24 * (1 + up.double().abs())  # relative; a subnormal SiLU
    assert ((out.double() - exact).abs() <= bound).all() and ((want.double() - exact).abs() <= bound).all()
    assert (out == want).double().mean() > 0.99, (out == want).double().mean()
    o = torch.randn(B, L, D).to(dt)
    buf = torch.empty(B, L, D + M, dtype=dt)
    buf[..., :D].copy_(o)
    E._swiglu_cuda(gate, up, buf[..., D:])  # into the tail of the concatenation buffer
    assert torch.equal(buf, torch.cat([o, out], dim=-1))
print("ok")
"""


def test_swiglu_kernel_rounds_as_the_torch_ops():
    """SiLU rounded to the dtype, then the product rounded, as the unfused ops do, read from strided halves of
    one projection and written into a wider buffer (TRITON_INTERPRET on the CPU)."""
    pytest.importorskip("triton", reason="the Triton kernels need the triton package (test extra)")
    env = dict(__import__("os").environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SWIGLU], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_swiglu_dispatch_and_row_layouts():
    from dit_rt.ops.elementwise import _even_rows, cat_swiglu, swiglu

    y = torch.randn(2, 5, 30)
    a, b = y.chunk(2, dim=-1)
    assert _even_rows(a) and _even_rows(y[..., 10:]) and _even_rows(torch.randn(3, 4, 6).transpose(0, 1)[:1])
    assert not _even_rows(torch.randn(4, 6).t()) and not _even_rows(y[:, ::2])
    assert not _even_rows(torch.randn(2, 5, 30)[:, :3])  # rows of one batch item do not run into the next
    assert torch.equal(swiglu(a, b), F.silu(a) * b)  # the CPU takes the torch ops
    out = torch.empty(2, 5, 15)
    assert swiglu(a, b, out) is out and torch.equal(out, F.silu(a) * b)
    x = torch.randn(2, 5, 4)
    assert torch.equal(cat_swiglu(x, a, b), torch.cat([x, F.silu(a) * b], dim=-1))
