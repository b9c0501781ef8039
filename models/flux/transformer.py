"""FLUX.1 MM-DiT (diffusers' `FluxTransformer2DModel`): FLUX.1-dev and FLUX.1-schnell.

Text and image tokens run through `num_layers` double-stream blocks (separate weights per stream, one joint
attention over [txt; img]) and then `num_single_layers` single-stream blocks over their concatenation, all
modulated (adaLN-Zero) by one conditioning vector: timestep + guidance (dev) + pooled CLIP text.

Module names equal the diffusers checkpoint keys except the fused projections, which the loader fills by
concatenating their sources along the output dimension: `attn.to_qkv` <- to_q, to_k, to_v and
`attn.add_qkv` <- add_q_proj, add_k_proj, add_v_proj (double blocks); a single block's `qkv_mlp` <-
attn.to_q, attn.to_k, attn.to_v, proj_mlp (one GEMM for the attention input and the MLP's up projection,
which is how Black Forest Labs store it: `linear1`).

Precision: the reference keeps no module in fp32, so every weight loads in the model dtype; the modulation
vectors are taken to fp32 and the LayerNorms, modulations, gated residual adds and RoPE are computed in fp32
and cast back (dit_rt.ops.elementwise), which is at least as precise as the reference.

Layout: tokens stay [B, L, D]; q/k/v are [B, L, H, Dh]. RoPE pairs channels (2j, 2j+1) ("interleaved"),
as diffusers' `apply_rotary_emb(use_real_unbind_dim=-1)` does; rotation is position-wise, so each stream
is rotated with its own rows of the joint [txt; img] table before the streams are concatenated.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dit_rt.cache.teacache import FLUX_RULES
from dit_rt.contract import BlockStack, CachePlan
from dit_rt.ops import Attention, Linear, fused
from dit_rt.ops.elementwise import gated_residual, layer_norm_modulate
from dit_rt.ops.fused_ops import add_norm_into, norm_into, qk_norm_rope
from dit_rt.ops.linear import gelu_ffn
from dit_rt.parallel.sequence import Replicate, SequencePlan, Split
from dit_rt.runner import BlockRunner, forward_seam

EPS = 1e-6  # every LayerNorm and QK RMSNorm of the model (hard-coded in the reference)
ROPE_THETA = 10000.0
QK = dict(per_head=True, layout="interleaved")  # q / k: per-head RMSNorm, channel pairs (2j, 2j+1) rotated


@dataclass(frozen=True)
class FluxTransformerConfig:
    """Hyper-parameters, named as in the Hub `transformer/config.json`; the defaults are FLUX.1-dev."""

    patch_size: int = 1  # the pipeline packs 2x2 latent patches into 64-wide tokens itself
    in_channels: int = 64
    out_channels: int | None = None  # None: in_channels
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = True  # False for FLUX.1-schnell
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    mlp_ratio: float = 4.0  # hard-coded in the reference, not a config key
    # Derived in __post_init__.
    dim: int = dataclasses.field(init=False)
    mlp_dim: int = dataclasses.field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        object.__setattr__(self, "dim", self.num_attention_heads * self.attention_head_dim)
        object.__setattr__(self, "mlp_dim", int(self.dim * self.mlp_ratio))
        if self.patch_size != 1:
            raise ValueError(f"patch_size {self.patch_size}: FLUX.1 packs latents in the pipeline (1 here)")
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must be even and sum to attention_head_dim "
                f"{self.attention_head_dim}"
            )

    @classmethod
    def from_config(cls, config: dict) -> FluxTransformerConfig:
        """Read a diffusers `FluxTransformer2DModel` config dict; `_`-prefixed metadata is skipped."""
        names = {f.name for f in dataclasses.fields(cls) if f.init} - {"mlp_ratio"}
        unknown = {k for k in config if not k.startswith("_")} - names
        if unknown:
            raise ValueError(
                f"unknown FLUX transformer config keys {sorted(unknown)}; known: {sorted(names)}"
            )
        return cls(**{k: config[k] for k in names if k in config})


FLUX_TRANSFORMER_PRESETS: dict[str, FluxTransformerConfig] = {
    "flux.1-dev": FluxTransformerConfig(),
    "flux.1-schnell": FluxTransformerConfig(guidance_embeds=False),
}


# ------------------------------------------------------------------------------------------------ leaf math


class RotaryFreqs(NamedTuple):
    """Per-token RoPE rotation, fp32, [L, 1, Dh/2] each (broadcasts over batch and heads)."""

    cos: torch.Tensor
    sin: torch.Tensor


def rope_from_ids(ids: torch.Tensor, axes_dims: tuple[int, ...], theta: float = ROPE_THETA) -> RotaryFreqs:
    """RoPE angles for position ids [L, n_axes]: axis a owns axes_dims[a] head channels, whose pair j turns
    at theta^(-2j/d_a) per unit of that axis' position. Angles in float64 (positions reach ~100s), stored
    fp32 [L, 1, Dh/2]."""
    angles = []
    for a, d in enumerate(axes_dims):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)
        angles.append(ids[:, a].double()[:, None] * omega)  # [L, d/2]
    a = torch.cat(angles, dim=-1)[:, None]  # [L, 1, Dh/2]
    return RotaryFreqs(a.cos().float(), a.sin().float())


def timestep_sinusoid(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """t [B] -> [B, dim] fp32, cos half first, frequencies 10000^(-k/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs  # [B, dim/2]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def _mod(linear: nn.Linear, temb: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """adaLN modulation: `linear(SiLU(temb))` as n fp32 chunks [B, 1, D]."""
    return linear(F.silu(temb))[:, None].float().chunk(n, dim=-1)


# ------------------------------------------------------------------------------------------------ embedders
# Embedders, modulation linears and the output head are plain nn.Linear: they run on few rows (B, or the
# text tokens once per step) and weight formats target the block projections.


class MLPEmbedder(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding and PixArtAlphaTextProjection(silu);
    FLUX.2's have no biases)."""

    def __init__(self, dim_in: int, dim: int, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim, bias=bias)
        self.linear_2 = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """temb = MLP(sinusoid(t)) [+ MLP(sinusoid(guidance))] + MLP(pooled text), [B, D]."""

    def __init__(self, cfg: FluxTransformerConfig):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, cfg.dim)
        self.guidance_embedder = MLPEmbedder(256, cfg.dim) if cfg.guidance_embeds else None
        self.text_embedder = MLPEmbedder(cfg.pooled_projection_dim, cfg.dim)

    def forward(self, t: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        dtype = pooled.dtype
        temb = self.timestep_embedder(timestep_sinusoid(t).to(dtype))
        if self.guidance_embedder is not None:
            temb = temb + self.guidance_embedder(timestep_sinusoid(guidance).to(dtype))
        return temb + self.text_embedder(pooled)


class AdaNorm(nn.Module):
    """diffusers' AdaLayerNormZero(Single) / AdaLayerNormContinuous: only `linear` holds weights (the
    modulation of `temb`); the affine-free LayerNorm is applied by the block through `norm`."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.linear = nn.Linear(dim, chunks * dim)
        self.norm = ModulatedNorm()


class ModulatedNorm(nn.Module):
    """fp32 LayerNorm(x) * scale1 + shift for the Linear `consumer` that reads it (`norm_into`): a module so
    that its output, the modulated block input, can be observed (TeaCache's FLUX signal)."""

    def __init__(self, eps: float = EPS):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor, shift, scale1, consumer: nn.Module):
        return norm_into(consumer, x, shift, scale1, self.eps)


class FeedForward(nn.Module):
    """`net.0.proj` -> GELU(tanh) -> `net.2`; `net.1` is diffusers' dropout slot, kept so the keys line up."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(_Proj(dim, hidden), nn.Identity(), Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_ffn(self.net[0].proj, self.net[2], x)  # GELU fused into the GEMMs where possible


class _Proj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out)


# ------------------------------------------------------------------------------------------------ blocks


class JointAttention(nn.Module):
    """A double block's attention weights: image `to_qkv`, text `add_qkv`, per-head QK RMSNorms, outputs
    (FLUX.2's the same without biases)."""

    def __init__(self, dim: int, heads: int, eps: float = EPS, bias: bool = True):
        super().__init__()
        hd = dim // heads
        self.heads = heads
        self.to_qkv = fused(dim, dim, sources=("to_q", "to_k", "to_v"), bias=bias)
        self.add_qkv = fused(dim, dim, sources=("add_q_proj", "add_k_proj", "add_v_proj"), bias=bias)
        self.norm_q, self.norm_k = nn.RMSNorm(hd, eps=eps), nn.RMSNorm(hd, eps=eps)
        self.norm_added_q, self.norm_added_k = nn.RMSNorm(hd, eps=eps), nn.RMSNorm(hd, eps=eps)
        self.to_out = nn.ModuleList([Linear(dim, dim, bias=bias)])
        self.to_add_out = Linear(dim, dim, bias=bias)
        self.attn = Attention(head_dim=hd)

    def _qkv(self, proj, x, norm_q, norm_k, rope) -> tuple[torch.Tensor, ...]:
        # Tensors, not fp8 codes (attn=None): the two streams' q / k are concatenated before the attention,
        # and codes of different scales do not concatenate; an fp8 attention quantizes the joint sequence.
        q, k, v = proj(x).chunk(3, dim=-1)  # [B, L, D] views of one GEMM output
        q = qk_norm_rope(None, q, norm_q, self.heads, rope, **QK)  # [B, L, H, Dh]
        k = qk_norm_rope(None, k, norm_k, self.heads, rope, **QK)
        return q, k, v.unflatten(-1, (self.heads, -1))

    def forward(self, img, txt, rope: RotaryFreqs) -> tuple[torch.Tensor, torch.Tensor]:
        lt = txt.shape[1]
        rope_t = RotaryFreqs(rope.cos[:lt], rope.sin[:lt])
        rope_i = RotaryFreqs(rope.cos[lt:], rope.sin[lt:])
        t = self._qkv(self.add_qkv, txt, self.norm_added_q, self.norm_added_k, rope_t)
        i = self._qkv(self.to_qkv, img, self.norm_q, self.norm_k, rope_i)
        q, k, v = (torch.cat(pair, dim=1) for pair in zip(t, i))  # [B, Lt + Li, H, Dh], order [txt; img]
        o = self.attn(q, k, v).flatten(2)  # [B, Lt + Li, D]
        return self.to_out[0](o[:, lt:]), self.to_add_out(o[:, :lt])


class FluxDoubleBlock(nn.Module):
    """Image and text streams, each with its own adaLN-Zero, projections and MLP; one joint attention."""

    def __init__(self, cfg: FluxTransformerConfig):
        super().__init__()
        D = cfg.dim
        self.norm1 = AdaNorm(D, 6)
        self.norm1_context = AdaNorm(D, 6)
        self.attn = JointAttention(D, cfg.num_attention_heads)
        self.ff = FeedForward(D, cfg.mlp_dim)
        self.ff_context = FeedForward(D, cfg.mlp_dim)

    def forward(
        self,
        img: torch.Tensor,  # [B, Li, D]
        txt: torch.Tensor,  # [B, Lt, D]
        temb: torch.Tensor,  # [B, D]
        rope: RotaryFreqs,  # [Lt + Li, 1, Dh/2], rows ordered [txt; img]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.attn
        shift, scale, gate, shift2, scale2, gate2 = _mod(self.norm1.linear, temb, 6)  # [B, 1, D] fp32
        c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = _mod(self.norm1_context.linear, temb, 6)
        img_n = self.norm1.norm(img, shift, 1 + scale, a.to_qkv)
        txt_n = self.norm1_context.norm(txt, c_shift, 1 + c_scale, a.add_qkv)
        attn_img, attn_txt = a(img_n, txt_n, rope)

        # gated residual of the attention and the MLP's modulated LayerNorm in one pass, per stream
        img, y = add_norm_into(self.ff.net[0].proj, img, attn_img, shift2, 1 + scale2, EPS, gate=gate)
        img = gated_residual(img, self.ff(y), gate2)
        txt, y = add_norm_into(
            self.ff_context.net[0].proj, txt, attn_txt, c_shift2, 1 + c_scale2, EPS, gate=c_gate
        )
        txt = gated_residual(txt, self.ff_context(y), c_gate2)
        return img, txt


class SingleAttention(nn.Module):
    """A single block's attention: per-head QK RMSNorms and the seam (q/k/v come from the block's
    `qkv_mlp`; the output projection is folded into the block's `proj_out`)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        hd = dim // heads
        self.heads = heads
        self.norm_q, self.norm_k = nn.RMSNorm(hd, eps=EPS), nn.RMSNorm(hd, eps=EPS)
        self.attn = Attention(head_dim=hd)

    def forward(self, q, k, v, rope: RotaryFreqs) -> torch.Tensor:
        q = qk_norm_rope(self.attn, q, self.norm_q, self.heads, rope, **QK)  # [B, L, H, Dh] (or fp8 codes)
        k = qk_norm_rope(self.attn, k, self.norm_k, self.heads, rope, **QK)
        return self.attn(q, k, v.unflatten(-1, (self.heads, -1))).flatten(2)  # [B, L, D]


class FluxSingleBlock(nn.Module):
    """Joint [txt; img] tokens: adaLN-Zero, one GEMM for q | k | v | MLP-in, attention and GELU MLP side by
    side, one output projection over [attention; MLP]."""

    def __init__(self, cfg: FluxTransformerConfig):
        super().__init__()
        D, M = cfg.dim, cfg.mlp_dim
        self.norm = AdaNorm(D, 3)
        self.qkv_mlp = Linear(
            D, 3 * D + M, sources=("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), splits=(D, D, D, M)
        )
        self.attn = SingleAttention(D, cfg.num_attention_heads)
        self.proj_out = Linear(D + M, D)
        self.dim = D

    def forward(self, x: torch.Tensor, temb: torch.Tensor, rope: RotaryFreqs) -> torch.Tensor:
        D = self.dim
        shift, scale, gate = _mod(self.norm.linear, temb, 3)  # [B, 1, D] fp32
        y = self.qkv_mlp(self.norm.norm(x, shift, 1 + scale, self.qkv_mlp))  # [B, L, 3D + M]
        q, k, v, mlp = y.split([D, D, D, y.shape[-1] - 3 * D], dim=-1)
        o = self.attn(q, k, v, rope)  # [B, L, D]
        if torch.compiler.is_compiling():  # inductor fuses the GELU into the concatenation itself
            joint = torch.cat([o, F.gelu(mlp, approximate="tanh")], dim=-1)
        else:  # eager: the GELU writes its half of [attention; GELU(MLP)] in place, no second copy of it
            joint = y.new_empty(*y.shape[:-1], D + mlp.shape[-1])  # [B, L, D + M]
            torch.ops.aten.gelu.out(mlp, approximate="tanh", out=joint[..., D:])
            joint[..., :D] = o
        return gated_residual(x, self.proj_out(joint), gate)


# ------------------------------------------------------------------------------------------------ model


class FluxTransformer(nn.Module):
    """FLUX.1: packed latent tokens, T5 states, CLIP pooled text, timestep (and guidance) -> velocity."""

    keep_fp32: ClassVar[tuple[str, ...]] = ()  # the reference keeps nothing in fp32 (no _keep_in_fp32)
    ckpt_key_map: ClassVar[tuple[tuple[str, str | None], ...]] = ()  # fused projections: `sources`
    # The block seams (dit_rt.contract): the double stack carries (img, txt), the single stack their
    # concatenation [txt; img]; both take the conditioning vector and the joint RoPE table.
    stacks: ClassVar[tuple[BlockStack, ...]] = (
        BlockStack("transformer_blocks", carry=("img", "txt"), args=("temb", "rope")),
        BlockStack("single_transformer_blocks", carry=("x",), args=("temb", "rope")),
    )
    # FBCache compares the image stream's first-block residual; TeaCache (the authors' FLUX rule) measures
    # the first double block's modulated image input, as TeaCache4FLUX does.
    cache_plan: ClassVar[CachePlan] = CachePlan(
        residual="img", module_outputs={"modulated": "transformer_blocks.0.norm1.norm"}, teacache=FLUX_RULES
    )
    # Sequence parallelism: text and image tokens are both split (each padded on its own); the joint
    # sequence and the RoPE table are [txt; img] shards; temb is replicated.
    sequence_plan: ClassVar[SequencePlan] = SequencePlan(
        inputs={
            "img": Split("img"), "txt": Split("txt"), "x": Split("txt", "img"),
            "rope": Split("txt", "img", dim=0), "temb": Replicate(),
        },
        attention={
            "transformer_blocks.*.attn.attn": ("txt", "img"),
            "single_transformer_blocks.*.attn.attn": ("txt", "img"),
        },
    )  # fmt: skip

    def __init__(self, cfg: FluxTransformerConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.x_embedder = nn.Linear(cfg.in_channels, D)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, D)
        self.time_text_embed = TimeTextEmbed(cfg)
        self.transformer_blocks = nn.ModuleList([FluxDoubleBlock(cfg) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nn.ModuleList(
            [FluxSingleBlock(cfg) for _ in range(cfg.num_single_layers)]
        )
        self.norm_out = AdaNorm(D, 2)  # output order (scale, shift)
        self.proj_out = nn.Linear(D, cfg.out_channels)
        self.runner = BlockRunner()

    def _check(self, x, context, pooled, timestep, img_ids, txt_ids, guidance) -> None:
        cfg, B = self.cfg, x.shape[0]
        if x.ndim != 3 or x.shape[2] != cfg.in_channels:
            raise ValueError(f"hidden_states must be [B, L, {cfg.in_channels}], got {tuple(x.shape)}")
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.joint_attention_dim:
            want = f"[B, Lt, {cfg.joint_attention_dim}]"
            raise ValueError(f"encoder_hidden_states must be {want}, got {tuple(context.shape)}")
        if pooled.shape != (B, cfg.pooled_projection_dim):
            raise ValueError(
                f"pooled_projections must be [B, {cfg.pooled_projection_dim}], got {pooled.shape}"
            )
        if timestep.shape != (B,):
            raise ValueError(f"timestep must be [B] = [{B}], got {tuple(timestep.shape)}")
        if cfg.guidance_embeds != (guidance is not None):
            raise ValueError(
                f"this FLUX transformer {'needs' if cfg.guidance_embeds else 'takes no'} guidance"
            )
        if img_ids.shape != (x.shape[1], len(cfg.axes_dims_rope)):
            raise ValueError(f"img_ids must be [L, {len(cfg.axes_dims_rope)}], got {tuple(img_ids.shape)}")
        if txt_ids.shape != (context.shape[1], len(cfg.axes_dims_rope)):
            raise ValueError(f"txt_ids must be [Lt, {len(cfg.axes_dims_rope)}], got {tuple(txt_ids.shape)}")

    @forward_seam
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity for packed latents hidden_states [B, L, in_channels] (model dtype).

        encoder_hidden_states: [B, Lt, joint_attention_dim] T5 states; pooled_projections: [B,
        pooled_projection_dim] CLIP pooled output; timestep: [B] sigma in [0, 1] (the pipeline's timestep /
        1000; multiplied by 1000 here, as the reference does); img_ids [L, 3] / txt_ids [Lt, 3]: RoPE
        positions ([B, L, 3] accepted, the first row used, as the reference does); guidance: [B] embedded
        guidance scale (guidance_embeds models only). Returns [B, L, out_channels] in the model dtype.
        """
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        args = (encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance)
        self._check(hidden_states, *args)
        dtype = hidden_states.dtype
        rope = rope_from_ids(torch.cat([txt_ids, img_ids]), self.cfg.axes_dims_rope)  # [Lt + Li, 1, Dh/2]

        img = self.x_embedder(hidden_states)  # [B, L, D]
        t = timestep.to(dtype) * 1000  # rounded in the model dtype, as the reference does
        g = guidance.to(dtype) * 1000 if guidance is not None else None
        temb = self.time_text_embed(t, g, pooled_projections)  # [B, D]
        txt = self.context_embedder(encoder_hidden_states)  # [B, Lt, D]

        img, txt = self.runner(self.transformer_blocks, (img, txt), temb, rope)
        lt = txt.shape[1]
        x = self.runner(self.single_transformer_blocks, torch.cat([txt, img], dim=1), temb, rope)
        img = x[:, lt:]  # [B, L, D]

        scale, shift = _mod(self.norm_out.linear, temb, 2)  # [B, 1, D] fp32, scale first
        return self.proj_out(layer_norm_modulate(img, shift, 1 + scale, EPS))  # [B, L, out_channels]

    def flops(self, image_tokens: int, text_tokens: int = 512) -> int:
        """Matmul + attention FLOPs of one forward at batch 1 (2*M*N*K per GEMM, 4*L*L*D per attention);
        image_tokens = (H/16)*(W/16) for an H x W image. Elementwise ops, norms and softmax not counted."""
        cfg = self.cfg
        Li, Lt, D, M = image_tokens, text_tokens, cfg.dim, cfg.mlp_dim
        L = Li + Lt
        double = 2 * L * D * 3 * D + 4 * L * L * D + 2 * L * D * D + 2 * L * D * M * 2
        single = 2 * L * D * (3 * D + M) + 4 * L * L * D + 2 * L * (D + M) * D
        n_emb = 3 if cfg.guidance_embeds else 2
        total = cfg.num_layers * (double + 2 * 12 * D * D) + cfg.num_single_layers * (single + 2 * 3 * D * D)
        total += 2 * Li * cfg.in_channels * D + 2 * Lt * cfg.joint_attention_dim * D  # x / context embedders
        total += 2 * (n_emb - 1) * (256 * D + D * D) + 2 * (cfg.pooled_projection_dim * D + D * D)
        total += 2 * 2 * D * D + 2 * Li * D * cfg.out_channels  # norm_out, proj_out
        return total
