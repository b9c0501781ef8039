"""The fused ops a transformer block names: each hand-off between a producer and its consumer, with the fp8
dataflow behind it.

A model file writes its block with these (modulated norm into the next Linear, QK norm + RoPE into the
attention, attention into the output projection) and keeps the math; each op decides here, from what its
consumer takes, whether the hand-off is a model-dtype tensor or per-tensor e4m3 codes (`Fp8Codes`) whose
scale the producer knows from a bound, so neither side runs an amax pass. A consumer takes codes when it
says so: `Linear.takes_fp8_codes(x)` (an fp8 per-tensor format on an fp8 GPU) and
`Attention.takes_fp8_codes` (its backend's `takes_codes` capability, fa3-fp8). On CPU every hand-off is a
tensor, so the CPU tests see the plain math. The variants the families need: whole-width (Wan) or
per-head (FLUX, Cosmos) QK RMSNorm, interleaved (Wan, FLUX) or split-half (Cosmos) RoPE.

The bounds: a modulated LayerNorm's output and row norm follow from the modulation vectors
(`layer_norm_modulate_fp8`), an RMSNorm's from its weight (`rms_norm_bound`), a projection's from its
weight row norms and its input's row-norm bound (`fp8.output_bound`), and an attention output's from its
values (softmax weights sum to 1: |o| <= max|v|).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dit_rt.ops.attention import Attention
from dit_rt.ops.codes import Fp8Codes
from dit_rt.ops.elementwise import (
    add_layer_norm_modulate,
    layer_norm_modulate,
    layer_norm_modulate_fp8,
    qkv_norm_rope_fp8,
    rms_norm_rope,
    rms_norm_rope_fp8,
)
from dit_rt.ops.linear import Linear
from dit_rt.ops.linear.fp8 import output_bound, quantize_act
from dit_rt.ops.linear.triton_quant import quantize_bounded

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), fp32 [L, 1, Dh/2] each (any NamedTuple of the two)


def takes_codes(consumer: nn.Module, x: torch.Tensor | Fp8Codes) -> bool:
    """Whether `consumer` (a Linear, an Attention or anything else) would take its input `x` as codes."""
    if isinstance(consumer, Attention):
        return consumer.takes_fp8_codes and x.is_cuda
    return isinstance(consumer, Linear) and consumer.takes_fp8_codes(x)


# ------------------------------------------------------------------------------- modulated norm -> Linear


def norm_into(consumer: nn.Module, x: torch.Tensor, *args) -> torch.Tensor | Fp8Codes:
    """`layer_norm_modulate(x, *args)` (x [B, L, D]; args shift, scale1, eps[, weight, bias] as there) for
    the Linear `consumer`: its per-tensor fp8 codes, with a row-norm bound, when the consumer takes them
    (its activation quantization then fuses into this pass), else a tensor in x's dtype."""
    if takes_codes(consumer, x):
        return layer_norm_modulate_fp8(x, *args)
    return layer_norm_modulate(x, *args)


def add_norm_into(consumer: nn.Module, x: torch.Tensor, residual: torch.Tensor, *args, **kwargs):
    """(x + residual, `norm_into(consumer, that sum, ...)`) in one pass on CUDA: `add_layer_norm_modulate`
    with its arguments (shift, scale1, eps; gate=, weight=, bias=, row_norm=), in fp8 codes when `consumer`
    takes them (row_norm=False: without the row-norm bound, where the consumer does not read it)."""
    return add_layer_norm_modulate(x, residual, *args, fp8=takes_codes(consumer, x), **kwargs)


# ------------------------------------------------------------------------------- QK norm + RoPE -> attention


def qk_norm_rope(
    attn: Attention,
    x: torch.Tensor,
    norm: nn.Module,
    heads: int,
    rope: Rope | None = None,
    *,
    per_head: bool = False,
    layout: str = "interleaved",
) -> torch.Tensor | Fp8Codes:
    """`rms_norm_rope` of a q or k projection x [B, L, D] (norm: an RMSNorm module, weight [D] or, per_head,
    [Dh]) for `attn`: [B, L, heads, Dh] per-tensor e4m3 codes when its backend takes them, else a tensor
    in x's dtype. attn=None: always a tensor (an attention that should stay in the model dtype)."""
    cos, sin = (None, None) if rope is None else rope
    args = (x, norm.weight, norm.eps, heads, cos, sin)
    if attn is not None and takes_codes(attn, x):
        q, scale = rms_norm_rope_fp8(*args, per_head=per_head, layout=layout)
        return Fp8Codes(q, scale, x.dtype)
    return rms_norm_rope(*args, per_head=per_head, layout=layout)


def v_codes(v: torch.Tensor, heads: int) -> Fp8Codes:
    """Attention values [B, L, D] (a strided slice of a fused projection) as per-tensor e4m3 codes
    [B, L, H, Dh]: one amax pass and one cast, as the attention would do itself, but with a scale the
    caller knows, which bounds the attention's output (`out_codes`)."""
    B, L, D = v.shape
    q, s = quantize_act(v.reshape(B * L, D), "tensor", D)
    return Fp8Codes(q.view(B, L, heads, D // heads), s, v.dtype)


def qkv_norm_rope(
    proj: nn.Module,
    x: torch.Tensor | Fp8Codes,
    norm_q: nn.Module,
    norm_k: nn.Module,
    heads: int,
    rope: Rope | None,
    *,
    attn: Attention,
    out: nn.Module,
    per_head: bool = False,
    layout: str = "interleaved",
) -> tuple[torch.Tensor | Fp8Codes, ...]:
    """q, k, v [B, L, heads, Dh] of a self-attention from its fused projection `proj` ([q | k | v] outputs)
    of x: q and k through `qk_norm_rope`, v as it is. The hand-offs are codes as far as `attn` and the
    output projection `out` take them: with x already codes carrying a row-norm bound, q, k and v come as
    codes from one pass over the projection's output (v's scale from `output_bound`, the projection's bias
    added in that pass); with q and k as codes and `out` taking codes, v becomes codes too, so the attention
    output can be quantized from v's scale (`attention_into`)."""
    if takes_codes(attn, x) and isinstance(x, Fp8Codes) and takes_codes(out, x.q):
        v_bound = output_bound(proj, x)  # |v| <= ||W_j|| ||x|| + |b_j|: no amax pass over v
        if v_bound is not None:
            qkv = proj(x, bias=False)  # [B, L, 3D]; the bias joins in the next pass
            cos, sin = rope
            w = (norm_q.weight, norm_k.weight)
            fmt = dict(per_head=per_head, layout=layout)
            return qkv_norm_rope_fp8(qkv, *w, norm_q.eps, heads, cos, sin, v_bound, proj.bias, **fmt)
    q, k, v = proj(x).chunk(3, dim=-1)  # [B, L, D] views of one [B, L, 3D] GEMM output
    fmt = dict(per_head=per_head, layout=layout)
    q = qk_norm_rope(attn, q, norm_q, heads, rope, **fmt)  # [B, L, H, Dh], one fused pass
    k = qk_norm_rope(attn, k, norm_k, heads, rope, **fmt)
    if isinstance(q, Fp8Codes) and takes_codes(out, v):
        return q, k, v_codes(v, heads)
    return q, k, v.unflatten(-1, (heads, -1))


# ------------------------------------------------------------------------------- attention -> out projection


def out_codes(o: torch.Tensor, v_scales: list[torch.Tensor], o2: torch.Tensor | None = None) -> Fp8Codes:
    """An attention output o [B, L, H, Dh] (plus a second one, o2, summed in: Wan I2V's text and image
    attentions) as per-tensor codes for the output projection, in one pass without an amax: softmax
    weights sum to 1, so |o| <= max|v| <= 448 s_v for fp8 values of scale s_v; the bound gets 1/8 of
    headroom for FA3 rounding the softmax weights to e4m3."""
    B, L = o.shape[:2]
    bound = sum(v_scales) * (448.0 * 1.125)
    q, s = quantize_bounded(o.reshape(B * L, -1), bound, None if o2 is None else o2.reshape(B * L, -1))
    return Fp8Codes(q.view(B, L, -1), s, o.dtype)


def _v_scale(v: torch.Tensor | Fp8Codes) -> torch.Tensor:
    """The scale of values that bound an attention output: fp8 codes' own, a tensor's max|v| / 448."""
    return v.scale if isinstance(v, Fp8Codes) else v.abs().amax().float() / 448.0


def attention_into(
    out: nn.Module,
    attn: Attention,
    q: torch.Tensor | Fp8Codes,
    kv: Sequence[tuple[torch.Tensor | Fp8Codes, torch.Tensor | Fp8Codes]],
) -> torch.Tensor:
    """out(sum over (k, v) in kv of attn(q, k, v)), q [B, Lq, H, Dh], each k / v [B, Lk, H, Dh]: one
    attention, or several over different keys summed (Wan I2V's text and image cross-attentions). When the
    backend and the output projection take codes, the sum enters `out` as codes bounded by the values
    (`out_codes`, no amax pass over the output), else as a tensor [B, Lq, H * Dh]."""
    o, *more = (attn(q, k, v) for k, v in kv)  # [B, Lq, H, Dh] each
    if attn.takes_fp8_codes and takes_codes(out, o):
        o2 = sum(more[1:], more[0]) if more else None
        return out(out_codes(o, [_v_scale(v) for _, v in kv], o2))
    for extra in more:
        o = o + extra
    return out(o.flatten(2))
