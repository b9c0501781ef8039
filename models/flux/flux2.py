"""FLUX.2 MM-DiT (diffusers' `Flux2Transformer2DModel`): FLUX.2-dev (8 double + 48 single blocks, D = 6144).

The FLUX.1 layout (double-stream blocks over (img, txt) with one joint attention, then single-stream blocks
over [txt; img]) with these differences (spec flux-encoders-schedulers.md B.2-B.4):
- no bias in any Linear, no pooled text vector: the conditioning vector is timestep (+ guidance) only;
- modulation is shared: three global Linears turn it into the image / text double-block vectors and the
  single-block vector once per forward, and every block reads the same ones (they are the blocks' runner
  arguments, so caches, offload and sequence parallelism see them as replicated inputs);
- the MLPs are SwiGLU (`linear_in` -> SiLU(first half) * second half -> `linear_out`, ratio 3); a single
  block's q | k | v | gate | up come from one stored GEMM (`attn.to_qkv_mlp_proj`) and its attention and
  MLP outputs share `attn.to_out`;
- RoPE has 4 axes (T, H, W, L) at theta 2000: image tokens (t, row, col, 0), text tokens (0, 0, 0, index);
  reference images ride along as extra image tokens with their own t.
The parts that are FLUX.1's but for biases and eps (the joint attention, the embedder MLP, the modulated
norm) are imported from models/flux/transformer.py.

Module names equal the diffusers checkpoint keys except the double blocks' fused projections, filled by
the loader from their sources: `attn.to_qkv` <- to_q, to_k, to_v and `attn.add_qkv` <- add_q_proj,
add_k_proj, add_v_proj. Precision as FLUX.1 (models/flux/transformer.py): modulation vectors in fp32, the
LayerNorms, modulations, gated residuals and RoPE in fp32, cast back to the model dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dit_rt.cache.teacache import FLUX_RULES
from dit_rt.contract import BlockStack, CachePlan
from dit_rt.models.flux.transformer import (
    QK,
    JointAttention,
    MLPEmbedder,
    ModulatedNorm,
    RotaryFreqs,
    rope_from_ids,
    timestep_sinusoid,
)
from dit_rt.ops import Attention, Linear
from dit_rt.ops.codes import Fp8Codes
from dit_rt.ops.elementwise import cat_swiglu, gated_residual, layer_norm_modulate, swiglu
from dit_rt.ops.fused_ops import add_norm_into, qk_norm_rope
from dit_rt.parallel.sequence import Replicate, SequencePlan, Split
from dit_rt.runner import BlockRunner, forward_seam


@dataclass(frozen=True)
class Flux2TransformerConfig:
    """Hyper-parameters, named as in the Hub `transformer/config.json`; the defaults are FLUX.2-dev."""

    patch_size: int = 1  # the pipeline patchifies 2x2 latent patches into 128-wide tokens itself
    in_channels: int = 128
    out_channels: int | None = None  # None: in_channels
    num_layers: int = 8
    num_single_layers: int = 48
    attention_head_dim: int = 128
    num_attention_heads: int = 48
    joint_attention_dim: int = 15360  # 3 stacked Mistral hidden states of 5120
    timestep_guidance_channels: int = 256
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: float = 2000.0
    eps: float = 1e-6
    guidance_embeds: bool = True
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
            raise ValueError(
                f"patch_size {self.patch_size}: FLUX.2 patchifies latents in the pipeline (1 here)"
            )
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must be even and sum to attention_head_dim "
                f"{self.attention_head_dim}"
            )

    @classmethod
    def from_config(cls, config: dict) -> Flux2TransformerConfig:
        """Read a diffusers `Flux2Transformer2DModel` config dict; `_`-prefixed metadata is skipped."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = {k for k in config if not k.startswith("_")} - names
        if unknown:
            raise ValueError(
                f"unknown FLUX.2 transformer config keys {sorted(unknown)}; known: {sorted(names)}"
            )
        return cls(**{k: config[k] for k in names if k in config})


FLUX2_TRANSFORMER_PRESETS: dict[str, Flux2TransformerConfig] = {"flux.2-dev": Flux2TransformerConfig()}


# ------------------------------------------------------------------------------------------------ leaf math
# Embedders and the modulation / output Linears are plain nn.Linear: they run on B rows once per forward,
# and weight formats target the block projections.


class TimeGuidanceEmbed(nn.Module):
    """temb = MLP(sinusoid(t)) [+ MLP(sinusoid(guidance))], [B, D]."""

    def __init__(self, cfg: Flux2TransformerConfig):
        super().__init__()
        self.channels = cfg.timestep_guidance_channels
        self.timestep_embedder = MLPEmbedder(self.channels, cfg.dim, bias=False)
        self.guidance_embedder = (
            MLPEmbedder(self.channels, cfg.dim, bias=False) if cfg.guidance_embeds else None
        )

    def forward(self, t: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        temb = self.timestep_embedder(timestep_sinusoid(t, self.channels).to(t.dtype))
        if self.guidance_embedder is not None:
            temb = temb + self.guidance_embedder(timestep_sinusoid(guidance, self.channels).to(t.dtype))
        return temb


class Modulation(nn.Module):
    """`linear(SiLU(temb))`: the shared modulation vectors (diffusers' Flux2Modulation and the output
    AdaLayerNormContinuous keep only this Linear)."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.linear = nn.Linear(dim, chunks * dim, bias=False)

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        return self.linear(F.silu(temb))[:, None].float()  # [B, 1, chunks * D] fp32


class SwiGLU(nn.Module):
    """`linear_out`(SiLU(a) * b) for [a | b] = `linear_in`(x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_in = Linear(dim, 2 * hidden, bias=False)
        self.linear_out = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.linear_in(x).chunk(2, dim=-1)
        return self.linear_out(swiglu(a, b))


# ------------------------------------------------------------------------------------------------ blocks


class Flux2DoubleBlock(nn.Module):
    """Image and text streams, each with its own projections and SwiGLU MLP, modulated by the shared
    per-stream vectors; one joint attention."""

    def __init__(self, cfg: Flux2TransformerConfig):
        super().__init__()
        D = cfg.dim
        self.eps = cfg.eps
        self.norm1 = ModulatedNorm(cfg.eps)
        self.norm1_context = ModulatedNorm(cfg.eps)
        self.attn = JointAttention(D, cfg.num_attention_heads, cfg.eps, bias=False)
        self.ff = SwiGLU(D, cfg.mlp_dim)
        self.ff_context = SwiGLU(D, cfg.mlp_dim)

    def forward(
        self,
        img: torch.Tensor,  # [B, Li, D]
        txt: torch.Tensor,  # [B, Lt, D]
        mod_img: torch.Tensor,  # [B, 1, 6D] fp32: shift, scale, gate of the attention, then of the MLP
        mod_txt: torch.Tensor,  # [B, 1, 6D] fp32
        rope: RotaryFreqs,  # [Lt + Li, 1, Dh/2], rows ordered [txt; img]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a, eps = self.attn, self.eps
        shift, scale, gate, shift2, scale2, gate2 = mod_img.chunk(6, dim=-1)  # [B, 1, D] each
        c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = mod_txt.chunk(6, dim=-1)
        img_n = self.norm1(img, shift, 1 + scale, a.to_qkv)
        txt_n = self.norm1_context(txt, c_shift, 1 + c_scale, a.add_qkv)
        attn_img, attn_txt = a(img_n, txt_n, rope)

        # gated residual of the attention and the MLP's modulated LayerNorm in one pass, per stream
        img, y = add_norm_into(self.ff.linear_in, img, attn_img, shift2, 1 + scale2, eps, gate=gate)
        img = gated_residual(img, self.ff(y), gate2)
        txt, y = add_norm_into(
            self.ff_context.linear_in, txt, attn_txt, c_shift2, 1 + c_scale2, eps, gate=c_gate
        )
        txt = gated_residual(txt, self.ff_context(y), c_gate2)
        return img, txt


class ParallelSelfAttention(nn.Module):
    """A single block's weights (diffusers' Flux2ParallelSelfAttention): one GEMM for q | k | v | gate | up,
    per-head QK RMSNorms, the attention seam, one output GEMM over [attention; SwiGLU(gate, up)]."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, eps: float):
        super().__init__()
        hd = dim // heads
        self.heads, self.dim, self.mlp_dim = heads, dim, mlp_dim
        self.to_qkv_mlp_proj = Linear(dim, 3 * dim + 2 * mlp_dim, bias=False)
        self.norm_q, self.norm_k = nn.RMSNorm(hd, eps=eps), nn.RMSNorm(hd, eps=eps)
        self.to_out = Linear(dim + mlp_dim, dim, bias=False)
        self.attn = Attention(head_dim=hd)

    def forward(self, x: torch.Tensor | Fp8Codes, rope: RotaryFreqs) -> torch.Tensor:
        D, M = self.dim, self.mlp_dim
        # x: the modulated input (codes where the GEMM takes them)
        y = self.to_qkv_mlp_proj(x)  # [B, L, 3D + 2M]
        q, k, v, gate, up = y.split([D, D, D, M, M], dim=-1)
        q = qk_norm_rope(self.attn, q, self.norm_q, self.heads, rope, **QK)  # [B, L, H, Dh] (or fp8 codes)
        k = qk_norm_rope(self.attn, k, self.norm_k, self.heads, rope, **QK)
        o = self.attn(q, k, v.unflatten(-1, (self.heads, -1))).flatten(2)  # [B, L, D]
        return self.to_out(cat_swiglu(o, gate, up))  # [attention; SiLU(gate) * up]


class Flux2SingleBlock(nn.Module):
    """Joint [txt; img] tokens: modulated LayerNorm (shared single-stream vector), attention and SwiGLU MLP
    side by side, gated residual."""

    def __init__(self, cfg: Flux2TransformerConfig):
        super().__init__()
        self.norm = ModulatedNorm(cfg.eps)
        self.attn = ParallelSelfAttention(cfg.dim, cfg.num_attention_heads, cfg.mlp_dim, cfg.eps)

    def forward(self, x: torch.Tensor, mod: torch.Tensor, rope: RotaryFreqs) -> torch.Tensor:
        shift, scale, gate = mod.chunk(3, dim=-1)  # [B, 1, D] fp32 each
        y = self.norm(x, shift, 1 + scale, self.attn.to_qkv_mlp_proj)
        return gated_residual(x, self.attn(y, rope), gate)


# ------------------------------------------------------------------------------------------------ model


class Flux2Transformer(nn.Module):
    """FLUX.2: patchified latent tokens (plus reference-image tokens), stacked Mistral hidden states,
    timestep and guidance -> velocity."""

    keep_fp32: ClassVar[tuple[str, ...]] = ()  # the reference keeps nothing in fp32
    ckpt_key_map: ClassVar[tuple[tuple[str, str | None], ...]] = ()  # fused projections: `sources`
    # The block seams (dit_rt.contract): the double stack carries (img, txt), the single stack their
    # concatenation [txt; img]; the shared modulation vectors and the joint RoPE table are arguments.
    stacks: ClassVar[tuple[BlockStack, ...]] = (
        BlockStack("transformer_blocks", carry=("img", "txt"), args=("mod_img", "mod_txt", "rope")),
        BlockStack("single_transformer_blocks", carry=("x",), args=("mod", "rope")),
    )
    # FBCache compares the image stream's first-block residual; TeaCache measures the first double block's
    # modulated image input (FLUX.1's rule; the flux.2-dev coefficients are NVIDIA's fit on that signal).
    cache_plan: ClassVar[CachePlan] = CachePlan(
        residual="img", module_outputs={"modulated": "transformer_blocks.0.norm1"}, teacache=FLUX_RULES
    )
    # Sequence parallelism: text and image tokens (reference images included) are both split; the joint
    # sequence and the RoPE table are [txt; img] shards; the modulation vectors are replicated.
    sequence_plan: ClassVar[SequencePlan] = SequencePlan(
        inputs={
            "img": Split("img"), "txt": Split("txt"), "x": Split("txt", "img"),
            "rope": Split("txt", "img", dim=0),
            "mod_img": Replicate(), "mod_txt": Replicate(), "mod": Replicate(),
        },
        attention={
            "transformer_blocks.*.attn.attn": ("txt", "img"),
            "single_transformer_blocks.*.attn.attn": ("txt", "img"),
        },
    )  # fmt: skip

    def __init__(self, cfg: Flux2TransformerConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.time_guidance_embed = TimeGuidanceEmbed(cfg)
        self.double_stream_modulation_img = Modulation(D, 6)
        self.double_stream_modulation_txt = Modulation(D, 6)
        self.single_stream_modulation = Modulation(D, 3)
        self.x_embedder = nn.Linear(cfg.in_channels, D, bias=False)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, D, bias=False)
        self.transformer_blocks = nn.ModuleList([Flux2DoubleBlock(cfg) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nn.ModuleList(
            [Flux2SingleBlock(cfg) for _ in range(cfg.num_single_layers)]
        )
        self.norm_out = Modulation(D, 2)  # output order (scale, shift)
        self.proj_out = nn.Linear(D, cfg.out_channels, bias=False)
        self.runner = BlockRunner()

    def _check(self, x, context, timestep, img_ids, txt_ids, guidance) -> None:
        cfg, B, n = self.cfg, x.shape[0], len(self.cfg.axes_dims_rope)
        if x.ndim != 3 or x.shape[2] != cfg.in_channels:
            raise ValueError(f"hidden_states must be [B, L, {cfg.in_channels}], got {tuple(x.shape)}")
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.joint_attention_dim:
            want = f"[B, Lt, {cfg.joint_attention_dim}]"
            raise ValueError(f"encoder_hidden_states must be {want}, got {tuple(context.shape)}")
        if timestep.shape != (B,):
            raise ValueError(f"timestep must be [B] = [{B}], got {tuple(timestep.shape)}")
        if cfg.guidance_embeds and guidance is None:
            raise ValueError("this FLUX.2 transformer needs guidance (it embeds the guidance scale)")
        if img_ids.shape != (x.shape[1], n):
            raise ValueError(f"img_ids must be [L, {n}], got {tuple(img_ids.shape)}")
        if txt_ids.shape != (context.shape[1], n):
            raise ValueError(f"txt_ids must be [Lt, {n}], got {tuple(txt_ids.shape)}")

    @forward_seam
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity for latent tokens hidden_states [B, L, in_channels] (model dtype; L counts the noisy
        image's tokens and any reference-image tokens after them).

        encoder_hidden_states: [B, Lt, joint_attention_dim] stacked text states; timestep: [B] sigma in
        [0, 1] (multiplied by 1000 here, as the reference does); img_ids [L, 4] / txt_ids [Lt, 4]: RoPE
        positions (t, h, w, l) ([B, L, 4] accepted, the first row used, as the reference does); guidance:
        [B] embedded guidance scale (ignored, as the reference does, when the model embeds none). Returns
        [B, L, out_channels] in the model dtype.
        """
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        self._check(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance)
        cfg, dtype = self.cfg, hidden_states.dtype
        rope = rope_from_ids(torch.cat([txt_ids, img_ids]), cfg.axes_dims_rope, cfg.rope_theta)

        t = timestep.to(dtype) * 1000  # rounded in the model dtype, as the reference does
        g = guidance.to(dtype) * 1000 if cfg.guidance_embeds else None
        temb = self.time_guidance_embed(t, g)  # [B, D]
        mod_img = self.double_stream_modulation_img(temb)  # [B, 1, 6D] fp32, once for every block
        mod_txt = self.double_stream_modulation_txt(temb)
        mod = self.single_stream_modulation(temb)  # [B, 1, 3D]

        img = self.x_embedder(hidden_states)  # [B, L, D]
        txt = self.context_embedder(encoder_hidden_states)  # [B, Lt, D]
        img, txt = self.runner(self.transformer_blocks, (img, txt), mod_img, mod_txt, rope)
        lt = txt.shape[1]
        x = self.runner(self.single_transformer_blocks, torch.cat([txt, img], dim=1), mod, rope)
        img = x[:, lt:]  # [B, L, D]

        scale, shift = self.norm_out(temb).chunk(2, dim=-1)  # [B, 1, D] fp32, scale first
        return self.proj_out(layer_norm_modulate(img, shift, 1 + scale, cfg.eps))  # [B, L, out_channels]

    def flops(self, image_tokens: int, text_tokens: int = 512) -> int:
        """Matmul + attention FLOPs of one forward at batch 1 (2*M*N*K per GEMM, 4*L*L*D per attention);
        image_tokens = (H/16)*(W/16) for an H x W image, plus any reference-image tokens. Elementwise ops,
        norms and softmax not counted."""
        cfg = self.cfg
        Li, Lt, D, M = image_tokens, text_tokens, cfg.dim, cfg.mlp_dim
        L = Li + Lt
        double = 2 * L * D * 3 * D + 4 * L * L * D + 2 * L * D * D + 2 * L * D * 2 * M + 2 * L * M * D
        single = 2 * L * D * (3 * D + 2 * M) + 4 * L * L * D + 2 * L * (D + M) * D
        total = cfg.num_layers * double + cfg.num_single_layers * single
        total += 2 * Li * cfg.in_channels * D + 2 * Lt * cfg.joint_attention_dim * D  # x / context embedders
        n_emb = 2 if cfg.guidance_embeds else 1
        total += 2 * n_emb * (cfg.timestep_guidance_channels * D + D * D)
        total += 2 * (6 + 6 + 3 + 2) * D * D + 2 * Li * D * cfg.out_channels  # modulations, proj_out
        return total
