"""FLUX.1 with every linear format and fa3-fp8 attention on the CPU (issue 19), against float32 sdpa.

The tiny FLUX transformer (tests/tiny_checkpoints.py) runs with the fp8 dataflow forced as on an fp8 GPU
(fp8-per-tensor Linears take LayerNorm codes, fa3-fp8 takes RMSNorm + RoPE codes; its CUDA kernel is the
custom op's emulated CPU kernel), as tests/test_fused_ops.py does for one Wan self-attention. Probes check
that the paths the GPU takes really ran: the double blocks' joint [txt; img] attention goes through the
fp8 kernel as one sequence (tensors: the two streams' codes could not share a scale), the single blocks'
q and k arrive as producer-made codes, and odd / padded text lengths work.

Error rule: relative L2 error vs the float32 sdpa output at most a small multiple (`RATIO`) of plain
PyTorch's own error in the same low precision: the float32 model with every block Linear's weight and
input quantize-dequantized in plain torch to the format's element type and scale granularity (e4m3
per tensor / per row / 1x128 + 128x128 blocks; e2m1 in 16-blocks, weight only as nvfp4 on the CPU; int4
in 64-groups for svdquant) and q / k / v quantize-dequantized to e4m3 per tensor before exact attention.
Measured (B=2, 3x4 image tokens; relative L2 vs float32 sdpa; text tokens 1 / 7 / 16 padded):

  format                plain torch            dit_rt + fa3-fp8       worst ratio
  none (fa3-fp8 alone)  2.3e-2 1.3e-2 2.5e-2   2.9e-2 1.3e-2 2.8e-2   1.30
  fp8-per-tensor        7.1e-2 6.6e-2 7.4e-2   6.9e-2 7.0e-2 6.5e-2   1.06 (fused FFN: GELU into down's codes)
  fp8-rowwise           7.3e-2 6.5e-2 6.6e-2   7.5e-2 6.7e-2 6.3e-2   1.03 (fused FFN: GELU into down's codes)
  fp8-blockwise         5.9e-2 6.8e-2 6.4e-2   6.9e-2 6.5e-2 6.6e-2   1.18
  nvfp4                 2.0e-1 1.5e-1 1.7e-1   1.7e-1 1.5e-1 1.8e-1   1.10
  svdquant (rank 4)     2.7e-1 2.5e-1 2.9e-1   3.0e-1 2.6e-1 2.6e-1   1.09

(svdquant at its default rank 32 is lossless here: the tiny model's 32-wide inputs fit the branch whole.)
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dit_rt.models.flux import transformer as flux_transformer
from dit_rt.ops import fused_ops
from dit_rt.ops.attention import Attention, AttentionBackend
from dit_rt.ops.attention import fa3 as fa3_mod
from dit_rt.ops.attention.fa3 import FA3_FP8
from dit_rt.ops.attention.sdpa import SDPA
from dit_rt.ops.codes import Fp8Codes
from dit_rt.ops.linear import Linear, gelu_ffn, quantize_
from tests.test_flux_transformer import inputs, load_from_hub_layout
from tests.tiny_checkpoints import FLUX_TRANSFORMER, make_flux_transformer

RATIO = 1.5  # dit_rt's error may be at most this multiple of plain torch's in the same precision
FORMATS = {  # format -> convert options (svdquant: a rank below the tiny 32-wide inputs, else it is exact)
    "fp8-per-tensor": {},
    "fp8-rowwise": {},
    "fp8-blockwise": {},
    "nvfp4": {},
    "svdquant": {"rank": 4},
}
# The plain-torch reference per format: (element, weight block, activation block or None); a block is
# (rows, cols), 0 = the whole dimension, so (0, 0) is per tensor and (1, 0) per row.
PLAIN = {
    "fp8-per-tensor": ("e4m3", (0, 0), (0, 0)),
    "fp8-rowwise": ("e4m3", (1, 0), (1, 0)),
    "fp8-blockwise": ("e4m3", (128, 128), (1, 128)),
    "nvfp4": ("e2m1", (1, 16), None),  # weight-only off sm100 (the CPU emulates that path)
    "svdquant": ("int4", (1, 64), (1, 64)),  # W4A4
}
TEXT_LENGTHS = [1, 7, "padded"]  # one token, an odd count, 5 prompt tokens padded to 16
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


# ------------------------------------------------------------------------------------- plain torch reference


def _round(x: torch.Tensor, amax: torch.Tensor, element: str) -> torch.Tensor:
    """x quantize-dequantized to `element` with the scale mapping amax onto the element's largest value."""
    if element == "e4m3":
        s = amax.clamp_min(1e-12) / 448.0
        return (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    if element == "int4":
        s = amax.clamp_min(1e-12) / 7.0
        return (x / s).round().clamp(-8, 7) * s
    s = amax.clamp_min(1e-12) / 6.0  # e2m1: the nearest grid value
    a = (x / s).abs()
    near = E2M1[(a[..., None] - E2M1).abs().argmin(-1)]
    return near * torch.sign(x) * s


def qdq(t: torch.Tensor, element: str, block: tuple[int, int]) -> torch.Tensor:
    """t [..., R, C] (or [..., C]) quantize-dequantized per (rows, cols) block (0: the whole dimension)."""
    shape = t.shape
    t = t.float().reshape(-1, shape[-1])
    R, C = t.shape
    br, bc = block[0] or R, block[1] or C
    Rp, Cp = -(-R // br) * br, -(-C // bc) * bc
    p = F.pad(t, (0, Cp - C, 0, Rp - R)).view(Rp // br, br, Cp // bc, bc)
    amax = p.abs().amax(dim=(1, 3), keepdim=True)
    return _round(p, amax, element).view(Rp, Cp)[:R, :C].reshape(shape)


def _plain_fp8_attention(q, k, v, scale, return_lse):
    """q, k, v quantize-dequantized to e4m3 per tensor in plain torch, then exact float32 attention."""
    q, k, v = (qdq(x, "e4m3", (0, 0)) for x in (q, k, v))
    return SDPA.fn(q, k, v, scale, return_lse)


PLAIN_FP8_ATTENTION = AttentionBackend("plain-fp8-qdq", _plain_fp8_attention)


def plain_model(model, fmt: str | None):
    """The float32 model with plain-torch quantize-dequantize in place of `fmt` (None: float32 Linears) and
    of the fp8 attention."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, Attention):
            mod.op = PLAIN_FP8_ATTENTION
        if isinstance(mod, Linear) and fmt is not None:
            element, w_block, a_block = PLAIN[fmt]
            mod.weight.data = qdq(mod.weight.data, element, w_block)
            if a_block is not None:
                mod.register_forward_pre_hook(lambda _, args, e=element, b=a_block: (qdq(args[0], e, b),))
    return m


# ------------------------------------------------------------------------------------------- fp8 dataflow


def _force_codes(consumer, x) -> bool:
    """`takes_codes` as on an fp8 GPU (`Linear.takes_fp8_codes` without its device checks)."""
    if isinstance(consumer, Attention):
        return consumer.takes_fp8_codes
    return (
        isinstance(consumer, Linear)
        and getattr(consumer._format, "code_mode", None) == "tensor"
        and consumer.qweight.shape[1] == consumer.in_features
    )


class Probe:
    """fa3-fp8 in every Attention of a model, recording each call's q / k / v kinds and lengths, and the
    operands the fp8 kernel itself received (`fp8_operand`: only the fp8 path calls it)."""

    def __init__(self, model, monkeypatch):
        self.calls: list[tuple[str, tuple[bool, ...], int]] = []  # (module, (q, k, v are codes), Lq)
        self.operands: list[bool] = []  # per fp8 kernel operand: given as codes
        for name, mod in model.named_modules():
            if isinstance(mod, Attention):
                mod.op = AttentionBackend("fa3-fp8", self._wrap(name), takes_codes=True)
        real = fa3_mod.fp8_operand

        def operand(x, heads_kv):
            self.operands.append(isinstance(x, Fp8Codes))
            return real(x, heads_kv)

        monkeypatch.setattr(fa3_mod, "fp8_operand", operand)
        monkeypatch.setattr(fused_ops, "takes_codes", _force_codes)

    def _wrap(self, name):
        def fn(q, k, v, scale, return_lse):
            self.calls.append((name, tuple(isinstance(t, Fp8Codes) for t in (q, k, v)), q.shape[1]))
            return FA3_FP8.fn(q, k, v, scale, return_lse)

        return fn


def record_linear_inputs(model) -> dict[str, list[bool]]:
    """Per block Linear, whether each call's input came as fp8 codes."""
    seen: dict[str, list[bool]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Linear):
            seen[name] = []
            mod.register_forward_pre_hook(
                lambda _, args, n=name: seen[n].append(isinstance(args[0], Fp8Codes))
            )
    return seen


# ------------------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    ref = make_flux_transformer()
    return ref, load_from_hub_layout(ref, tmp_path_factory.mktemp("flux_fp8")).eval()


def flux_inputs(ref, text_len):
    if text_len != "padded":
        return inputs(ref, text_len=text_len)
    kw = inputs(ref, text_len=16)  # 5 prompt tokens, then 11 rows of one pad state (as T5 pads a prompt)
    ctx = kw["encoder_hidden_states"].clone()
    ctx[:, 5:] = ctx[:1, 4:5] * 0.3
    return dict(kw, encoder_hidden_states=ctx)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and out.dtype == ref.dtype and torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


def check_attention_paths(probe: Probe, lt: int, li: int) -> None:
    """Every attention ran once on the fp8 kernel over the joint [txt; img] sequence: double blocks with
    tensors (quantized in the backend per batch and head), single blocks with q and k as RMSNorm + RoPE
    codes and v as a tensor."""
    double = [c for c in probe.calls if c[0].startswith("transformer_blocks.")]
    single = [c for c in probe.calls if c[0].startswith("single_transformer_blocks.")]
    assert (
        len(double) == FLUX_TRANSFORMER["num_layers"] and len(single) == FLUX_TRANSFORMER["num_single_layers"]
    )
    assert len(probe.calls) == len(double) + len(single)
    assert all(codes == (False, False, False) and n == lt + li for _, codes, n in double)
    assert all(codes == (True, True, False) and n == lt + li for _, codes, n in single)
    # the fp8 kernel itself (not the bf16 short-sequence fallback) took q, k and v of every call
    want = [False] * 3 * len(double) + [True, True, False] * len(single)
    assert probe.operands == want


@torch.no_grad()
@pytest.mark.parametrize("text_len", TEXT_LENGTHS)
def test_fa3_fp8_joint_attention(flux, monkeypatch, text_len):
    ref, model = flux
    kw = flux_inputs(ref, text_len)
    exact = model(**kw)  # float32, sdpa
    plain = rel(plain_model(model, None)(**kw), exact)
    m = copy.deepcopy(model)
    probe = Probe(m, monkeypatch)
    err = rel(m(**kw), exact)
    check_attention_paths(probe, kw["encoder_hidden_states"].shape[1], kw["hidden_states"].shape[1])
    assert 0 < err <= RATIO * plain, f"fa3-fp8: {err:.3g} vs plain fp8 attention {plain:.3g}"


@torch.no_grad()
@pytest.mark.parametrize("text_len", TEXT_LENGTHS)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_linear_formats_with_fa3_fp8(flux, monkeypatch, fmt, text_len):
    ref, model = flux
    kw = flux_inputs(ref, text_len)
    exact = model(**kw)
    plain = rel(plain_model(model, fmt)(**kw), exact)
    m = quantize_(copy.deepcopy(model), fmt, **FORMATS[fmt])
    linears = {n: mod for n, mod in m.named_modules() if isinstance(mod, Linear)}
    assert linears and all(mod.fmt == fmt for mod in linears.values())
    seen = record_linear_inputs(m)
    probe = Probe(m, monkeypatch)
    fused_ffn = fmt in ("fp8-per-tensor", "fp8-rowwise")  # as on an fp8 GPU: GELU into down's quantization
    if fused_ffn:
        ffn = lambda up, down, x: gelu_ffn(up, down, x, fused=True)  # noqa: E731
        monkeypatch.setattr(flux_transformer, "gelu_ffn", ffn)
    err = rel(m(**kw), exact)
    check_attention_paths(probe, kw["encoder_hidden_states"].shape[1], kw["hidden_states"].shape[1])
    # fp8-per-tensor takes the modulated LayerNorms' codes: the fused q/k/v of both streams, the single
    # blocks' fused qkv + MLP projection and the MLPs' up projections; every other input is a tensor
    takes = {"attn.to_qkv", "attn.add_qkv", "qkv_mlp", "ff.net.0.proj", "ff_context.net.0.proj"}
    # (the fused FFN hands its hidden codes to the down projection's GEMM directly, not through its call)
    for name, calls in seen.items():
        local = name.split(".", 2)[2]
        want = [] if fused_ffn and local.endswith("net.2") else [fmt == "fp8-per-tensor" and local in takes]
        assert calls == want, (name, calls)
    assert 0 < err <= RATIO * plain, f"{fmt} + fa3-fp8: {err:.3g} vs plain torch {plain:.3g}"
