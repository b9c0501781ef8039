"""Cosmos DiT (diffusers' `CosmosTransformer3DModel`): Cosmos-1.0 Diffusion, Cosmos-Predict2 and Predict2.5.

One class serves every variant through its config: Cosmos-1.0 adds a learnable absolute position embedding
(`learnable_pos_embed`, added to the tokens at the start of every block); Video2World models take a
condition-mask channel (in_channels 17) and per-frame timesteps [B, 1, T, 1, 1]; Predict2.5 projects its
100,352-wide Qwen hidden-state stack to the 1,024-wide cross-attention context (`crossattn_proj`).

Module names equal the diffusers checkpoint keys except the fused projections, which the loader fills by
concatenating their sources along the output dimension: `attn1.to_qkv` <- to_q, to_k, to_v and
`attn2.to_kv` <- to_k, to_v. There are no biases but `crossattn_proj.0.bias`.

Modulation is AdaLN-LoRA: each sub-layer's (shift, scale, gate) is `linear_2(linear_1(SiLU(e)))` plus the
shared 3D-wide timestep embedding `temb`, where e is the RMS-normalised timestep sinusoid. Both are
computed per distinct timestep ([B, 1, .] or, per-frame, [B, T, .]) and only spread over the tokens when
applied: the reference's per-token modulation GEMMs (84,480 rows each, 3 per block) become a few rows.

Precision: the reference keeps only `learnable_pos_embed` in fp32; here the modulation vectors, the
LayerNorms, the gated residual adds and RoPE are computed in fp32 as well and cast back (dit_rt.ops), which
is at least as precise as the reference. RoPE angles are formed in float64.

Layout: tokens stay [B, L, D] in (t, h, w) row-major order; q/k/v are [B, L, H, Dh]. RoPE rotates the
channel pairs (j, j + Dh/2) ("split_half", diffusers' `use_real_unbind_dim=-2`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dit_rt.cache.teacache import TeaCacheRule
from dit_rt.contract import BlockStack, CachePlan
from dit_rt.ops import Attention, Linear, fused
from dit_rt.ops.attention import set_video_grid
from dit_rt.ops.elementwise import gated_residual, layer_norm_modulate, rms_norm_rope
from dit_rt.ops.fused_ops import add_norm_into, attention_into, norm_into, qkv_norm_rope
from dit_rt.parallel.sequence import Replicate, SequencePlan, Split
from dit_rt.runner import BlockRunner, forward_seam

EPS = 1e-6  # the modulated LayerNorms, the timestep RMSNorm and the position-embedding normalisation
QK_EPS = 1e-5  # diffusers' Attention default for its per-head RMSNorms (qk_norm="rms_norm")
ROPE_THETA = 10000.0
BASE_FPS = 24  # the frame rate RoPE's time positions are measured in (positions scale by 24 / fps)
ROPE = dict(per_head=True, layout="split_half")
# TeaCache: no published coefficients (pass `coefficients=`); the signals are the Wan rules' counterparts,
# the AdaLN base `temb` (Wan's timestep projection) and the embedded timestep (Wan's time embedding).
COSMOS_RULES = {
    True: TeaCacheRule("temb", 5, False),
    False: TeaCacheRule("embedded_timestep", 1, True),
}


@dataclass(frozen=True)
class CosmosTransformerConfig:
    """Hyper-parameters, named as in the Hub `transformer/config.json`; defaults are diffusers' (the
    Cosmos-1.0-Diffusion-7B shape)."""

    in_channels: int = 16
    out_channels: int = 16
    num_attention_heads: int = 32
    attention_head_dim: int = 128
    num_layers: int = 28
    mlp_ratio: float = 4.0
    text_embed_dim: int = 1024
    adaln_lora_dim: int = 256
    max_size: tuple[int, int, int] = (128, 240, 240)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    rope_scale: tuple[float, float, float] = (2.0, 1.0, 1.0)
    concat_padding_mask: bool = True
    extra_pos_embed_type: str | None = "learnable"
    use_crossattn_projection: bool = False  # Predict2.5: Linear + GELU on the text features
    crossattn_proj_in_channels: int = 1024
    encoder_hidden_states_channels: int = 1024
    # Cosmos-Transfer2.5 (ControlNet blocks, image context): out of scope, accepted only when unset.
    controlnet_block_every_n: int | None = None
    img_context_dim_in: int | None = None
    img_context_num_tokens: int = 256
    img_context_dim_out: int = 2048
    # Derived in __post_init__.
    dim: int = dataclasses.field(init=False)
    ffn_dim: int = dataclasses.field(init=False)

    def __post_init__(self):
        for name in ("max_size", "patch_size", "rope_scale"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "dim", self.num_attention_heads * self.attention_head_dim)
        object.__setattr__(self, "ffn_dim", int(self.dim * self.mlp_ratio))
        if len(self.patch_size) != 3 or len(self.max_size) != 3 or len(self.rope_scale) != 3:
            raise ValueError("patch_size, max_size and rope_scale are (t, h, w) triples")
        if self.patch_size[0] != 1:
            raise ValueError(f"patch_size {self.patch_size}: per-frame timesteps need a temporal patch of 1")
        if self.attention_head_dim // 6 * 2 <= 2 or self.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim {self.attention_head_dim}: too small for the 3-D RoPE")
        if self.extra_pos_embed_type not in (None, "learnable"):
            raise ValueError(
                f"extra_pos_embed_type {self.extra_pos_embed_type!r}: expected null or 'learnable'"
            )
        if self.use_crossattn_projection and self.encoder_hidden_states_channels != self.text_embed_dim:
            raise ValueError(
                f"encoder_hidden_states_channels {self.encoder_hidden_states_channels} must equal "
                f"text_embed_dim {self.text_embed_dim}: the projection feeds the cross-attention"
            )
        if self.controlnet_block_every_n or self.img_context_dim_in:
            raise NotImplementedError(
                "Cosmos-Transfer2.5 (controlnet_block_every_n / img_context_dim_in) is not supported"
            )

    @property
    def context_dim(self) -> int:
        """Width of `encoder_hidden_states` as the forward takes it (before any projection)."""
        return self.crossattn_proj_in_channels if self.use_crossattn_projection else self.text_embed_dim

    @classmethod
    def from_config(cls, config: dict) -> CosmosTransformerConfig:
        """Read a diffusers `CosmosTransformer3DModel` config dict; `_`-prefixed metadata is skipped."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = {k for k in config if not k.startswith("_")} - names
        if unknown:
            raise ValueError(
                f"unknown Cosmos transformer config keys {sorted(unknown)}; known: {sorted(names)}"
            )
        return cls(**{k: config[k] for k in names if k in config})


_PREDICT2_2B = CosmosTransformerConfig(
    num_attention_heads=16, rope_scale=(1.0, 4.0, 4.0), extra_pos_embed_type=None
)  # Text2Image
_PREDICT2_14B = dataclasses.replace(_PREDICT2_2B, num_attention_heads=40, num_layers=36)
COSMOS_TRANSFORMER_PRESETS: dict[str, CosmosTransformerConfig] = {
    "cosmos-1.0-diffusion-7b-text2world": CosmosTransformerConfig(),
    "cosmos-predict2-2b-text2image": _PREDICT2_2B,
    "cosmos-predict2-14b-text2image": _PREDICT2_14B,
    "cosmos-predict2-2b-video2world": dataclasses.replace(
        _PREDICT2_2B, in_channels=17, rope_scale=(1.0, 3.0, 3.0)
    ),
    "cosmos-predict2-14b-video2world": dataclasses.replace(
        _PREDICT2_14B, in_channels=17, rope_scale=(20 / 24, 2.0, 2.0)
    ),
    "cosmos-predict2.5-2b": dataclasses.replace(
        _PREDICT2_2B,
        in_channels=17,
        rope_scale=(1.0, 3.0, 3.0),
        use_crossattn_projection=True,
        crossattn_proj_in_channels=100352,
    ),
}


# ------------------------------------------------------------------------------------------------ leaf math


class RotaryFreqs(NamedTuple):
    """Per-token RoPE rotation, fp32, [L, 1, Dh/2] each (broadcasts over batch and heads)."""

    cos: torch.Tensor
    sin: torch.Tensor


def rope_freqs(
    grid: tuple[int, int, int],
    head_dim: int,
    rope_scale: tuple[float, float, float],
    fps: float | None,
    device: torch.device,
) -> RotaryFreqs:
    """3-D RoPE angles for a (frames, height, width) token grid in row-major token order.

    The half head dim splits into time / height / width chunks of m = head_dim - 4*(head_dim//6),
    2*(head_dim//6), 2*(head_dim//6) channels (44/42/42 of 128); channel j < m/2 of an axis turns at
    theta^(-2j/m) per position, theta = 10000 * rope_scale^(m/(m-2)) (NTK scaling per axis). Time positions
    are frame indices times 24 / fps when fps is given (videos), plain indices otherwise (images).
    """
    d_hw = 2 * (head_dim // 6)
    chunks = (head_dim - 2 * d_hw, d_hw, d_hw)
    angles = []
    for axis, (n, m, s) in enumerate(zip(grid, chunks, rope_scale)):
        theta = ROPE_THETA * s ** (m / (m - 2))
        omega = 1.0 / theta ** (torch.arange(0, m, 2, dtype=torch.float64, device=device) / m)
        pos = torch.arange(n, dtype=torch.float64, device=device)
        if axis == 0 and fps is not None:
            pos = pos / fps * BASE_FPS
        shape = [1, 1, 1, m // 2]
        shape[axis] = n
        angles.append((pos[:, None] * omega).view(shape).expand(*grid, m // 2))
    a = torch.cat(angles, dim=-1).reshape(-1, 1, head_dim // 2)  # [L, 1, Dh/2]
    return RotaryFreqs(a.cos().float(), a.sin().float())


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t [N] -> [N, dim] fp32, cos half first, frequencies 10000^(-k/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs  # [N, dim/2]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def _token_rows(x: torch.Tensor, mods: tuple, frames: torch.Tensor | None, frame_tokens: int) -> tuple:
    """The modulation rows for the tokens of x: as they are ([B, 1, D], or per frame [B, T, D] when x holds
    all T * frame_tokens tokens: the fused kernels index frames themselves), else each token's frame row
    [B, L, D] (x a sequence shard, frames its tokens' frame indices)."""
    if frames is None or x.shape[1] == mods[0].shape[1] * frame_tokens:
        return mods
    return tuple(m[:, frames] for m in mods)


# ------------------------------------------------------------------------------------------------ embedders
# Embedders, modulation linears and the output head are plain nn.Linear: they run on few rows (one per
# timestep, or the text tokens once per forward) and weight formats target the block projections.


class PatchEmbed(nn.Module):
    """[B, C, T, H, W] -> [B, L, D]: each (pt, ph, pw) patch as one vector ordered (c, pt, ph, pw), then
    `proj` (no bias)."""

    def __init__(self, cin: int, dim: int, patch: tuple[int, int, int]):
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(cin * math.prod(patch), dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        pt, ph, pw = self.patch
        x = x.reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, -1, C * pt * ph * pw)  # [B, L, C*pt*ph*pw]
        return self.proj(x)  # [B, L, D]


class TimestepMLP(nn.Module):
    """`t_embedder`: linear_1 -> SiLU -> linear_2, D -> D -> 3D (the AdaLN-LoRA base `temb`), no biases."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim, bias=False)
        self.linear_2 = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(s)))


class TimeEmbed(nn.Module):
    """`time_embed`: timestep sinusoid -> (temb [N, 3D] by the MLP, embedded timestep [N, D] by RMSNorm)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.t_embedder = TimestepMLP(dim)
        self.norm = nn.RMSNorm(dim, eps=EPS)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        s = timestep_sinusoid(t, self.dim).to(dtype)  # rounded to the model dtype, as the reference does
        e = F.rms_norm(s.float(), (self.dim,), self.norm.weight.float(), EPS).to(dtype)
        return self.t_embedder(s), e


class LearnablePosEmbed(nn.Module):
    """Cosmos-1.0's absolute position embedding: pos_t[f] + pos_h[y] + pos_w[x], normalised per token to
    unit RMS (E / (eps + ||E|| / sqrt(D))), in fp32."""

    def __init__(self, dim: int, grid_max: tuple[int, int, int]):
        super().__init__()
        self.pos_emb_t = nn.Parameter(torch.empty(grid_max[0], dim))
        self.pos_emb_h = nn.Parameter(torch.empty(grid_max[1], dim))
        self.pos_emb_w = nn.Parameter(torch.empty(grid_max[2], dim))

    def forward(self, grid: tuple[int, int, int]) -> torch.Tensor:
        t, h, w = grid
        e = (
            self.pos_emb_t[:t].float()[:, None, None]
            + self.pos_emb_h[:h].float()[None, :, None]
            + self.pos_emb_w[:w].float()[None, None, :]
        ).reshape(1, t * h * w, -1)  # [1, L, D]
        norm = torch.linalg.vector_norm(e, dim=-1, keepdim=True) / math.sqrt(e.shape[-1])
        return e / (EPS + norm)


class AdaLNLoRA(nn.Module):
    """diffusers' CosmosAdaLayerNorm(Zero): linear_1 (D -> r) and linear_2 (r -> n*D), no biases; the
    block applies the affine-free LayerNorm itself."""

    def __init__(self, dim: int, rank: int, chunks: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, rank, bias=False)
        self.linear_2 = nn.Linear(rank, chunks * dim, bias=False)
        self.chunks = chunks

    def forward(self, silu_e: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """silu_e [B, T', D], temb [B, T', 3D] -> (shift, 1 + scale[, gate]), fp32 [B, T', D] each: T' = 1
        (one timestep per item) or the latent frames (per-frame timesteps)."""
        mod = self.linear_2(self.linear_1(silu_e)).float() + temb[..., : self.linear_2.out_features].float()
        shift, scale, *gate = mod.chunk(self.chunks, dim=-1)
        return (shift, 1 + scale, *gate)


class FeedForward(nn.Module):
    """`net.0.proj` -> exact GELU -> `net.2`, no biases; `net.1` is diffusers' dropout slot."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(_Proj(dim, hidden), nn.Identity(), Linear(hidden, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x)))


class _Proj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out, bias=False)


# ------------------------------------------------------------------------------------------------ blocks


class SelfAttention(nn.Module):
    """`attn1`: fused QKV, per-head RMSNorm on q and k, split-half 3-D RoPE, no mask, no biases."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        hd = dim // heads
        self.heads = heads
        self.to_qkv = fused(dim, dim, sources=("to_q", "to_k", "to_v"), bias=False)
        self.norm_q, self.norm_k = nn.RMSNorm(hd, eps=QK_EPS), nn.RMSNorm(hd, eps=QK_EPS)
        self.to_out = nn.ModuleList([Linear(dim, dim, bias=False)])
        self.attn = Attention(head_dim=hd)

    def forward(self, x: torch.Tensor, rope: RotaryFreqs) -> torch.Tensor:
        out = self.to_out[0]
        q, k, v = qkv_norm_rope(
            self.to_qkv, x, self.norm_q, self.norm_k, self.heads, rope, attn=self.attn, out=out, **ROPE
        )  # [B, L, H, Dh] each
        return attention_into(out, self.attn, q, [(k, v)])  # [B, L, D]


class CrossAttention(nn.Module):
    """`attn2`: queries from the video tokens, keys / values from the text context (fused to_k | to_v),
    per-head RMSNorm on q and k, no RoPE, no mask (the pipelines' padded text rows are attended to)."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        hd = dim // heads
        self.heads = heads
        self.to_q = Linear(dim, dim, bias=False)
        self.to_kv = fused(context_dim, dim, sources=("to_k", "to_v"), bias=False)
        self.norm_q, self.norm_k = nn.RMSNorm(hd, eps=QK_EPS), nn.RMSNorm(hd, eps=QK_EPS)
        self.to_out = nn.ModuleList([Linear(dim, dim, bias=False)])
        self.attn = Attention(head_dim=hd)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.heads
        # q and k stay in the model dtype (plain `rms_norm_rope`): over 512 text keys a low-precision
        # attention gains nothing.
        q = rms_norm_rope(
            self.to_q(x), self.norm_q.weight, self.norm_q.eps, h, per_head=True
        )  # [B, L, H, Dh]
        k, v = self.to_kv(context).chunk(2, dim=-1)  # [B, Lt, D] each
        k = rms_norm_rope(k, self.norm_k.weight, self.norm_k.eps, h, per_head=True)
        return attention_into(self.to_out[0], self.attn, q, [(k, v.unflatten(-1, (h, -1)))])


class CosmosBlock(nn.Module):
    """(+ position embedding) -> AdaLN-LoRA self-attention -> cross-attention -> GELU MLP, each gated."""

    def __init__(self, cfg: CosmosTransformerConfig):
        super().__init__()
        D, r = cfg.dim, cfg.adaln_lora_dim
        self.norm1 = AdaLNLoRA(D, r, 3)
        self.attn1 = SelfAttention(D, cfg.num_attention_heads)
        self.norm2 = AdaLNLoRA(D, r, 3)
        self.attn2 = CrossAttention(D, cfg.num_attention_heads, cfg.text_embed_dim)
        self.norm3 = AdaLNLoRA(D, r, 3)
        self.ff = FeedForward(D, cfg.ffn_dim)

    def forward(
        self,
        x: torch.Tensor,  # [B, L, D] model dtype
        context: torch.Tensor,  # [B, Lt, text_embed_dim] (projected) text
        embedded_timestep: torch.Tensor,  # [B, T', D] model dtype: T' = 1, or frames (per-frame timesteps)
        temb: torch.Tensor,  # [B, T', 3D] model dtype
        rope: RotaryFreqs,  # [L, 1, Dh/2]
        pos: torch.Tensor | None,  # [1, L, D] model dtype (Cosmos-1.0) or None
        frames: torch.Tensor | None,  # [L] frame index per token (per-frame timesteps) or None
        frame_tokens: int,  # tokens per latent frame (per-frame timesteps) or 0
    ) -> torch.Tensor:
        if pos is not None:
            x = x + pos
        e = F.silu(embedded_timestep)
        # fp32 [B, 1 or T, D] each, or [B, L, D] on a sequence shard with per-frame timesteps
        shift, scale1, gate = _token_rows(x, self.norm1(e, temb), frames, frame_tokens)
        y = self.attn1(norm_into(self.attn1.to_qkv, x, shift, scale1, EPS), rope)

        c_shift, c_scale1, c_gate = _token_rows(x, self.norm2(e, temb), frames, frame_tokens)
        x, y = add_norm_into(self.attn2.to_q, x, y, c_shift, c_scale1, EPS, gate=gate)
        y = self.attn2(y, context)

        f_shift, f_scale1, f_gate = _token_rows(x, self.norm3(e, temb), frames, frame_tokens)
        x, y = add_norm_into(self.ff.net[0].proj, x, y, f_shift, f_scale1, EPS, gate=c_gate)
        return gated_residual(x, self.ff(y), f_gate)


# ------------------------------------------------------------------------------------------------ model


class CosmosTransformer(nn.Module):
    """Cosmos DiT: latents (+ condition / padding mask channels), timestep, text context -> model output
    (the pipelines' EDM / flow preconditioning is applied outside)."""

    # diffusers' `_keep_in_fp32_modules` (substring match).
    keep_fp32: ClassVar[tuple[str, ...]] = ("learnable_pos_embed",)
    ckpt_key_map: ClassVar[tuple[tuple[str, str | None], ...]] = ()  # fused projections: `sources`
    # The block seam (dit_rt.contract): one stack,
    # `runner(blocks, x, context, embedded_timestep, temb, rope, pos, frames, frame_tokens)`.
    stacks: ClassVar[tuple[BlockStack, ...]] = (
        BlockStack(
            "transformer_blocks",
            carry=("x",),
            args=("context", "embedded_timestep", "temb", "rope", "pos", "frames", "frame_tokens"),
        ),
    )
    # FBCache compares the first block's residual; TeaCache measures a runner argument (COSMOS_RULES).
    cache_plan: ClassVar[CachePlan] = CachePlan(
        runner_args={"temb": "temb", "embedded_timestep": "embedded_timestep"}, teacache=COSMOS_RULES
    )
    # Sequence parallelism: the video tokens split along dim 1 with every per-token input (RoPE rows,
    # position embedding, frame indices); the text context and the per-timestep modulation replicate; only
    # attn1 attends over the tokens.
    video_attention: ClassVar[tuple[str, ...]] = ("transformer_blocks.*.attn1.attn",)  # svg: frames x h x w
    sequence_plan: ClassVar[SequencePlan] = SequencePlan(
        inputs={
            "x": Split("x"), "rope": Split("x", dim=0), "pos": Split("x"), "frames": Split("x", dim=0),
            "context": Replicate(), "embedded_timestep": Replicate(), "temb": Replicate(),
            "frame_tokens": Replicate(),
        },
        attention={"transformer_blocks.*.attn1.attn": ("x",)},
    )  # fmt: skip

    def __init__(self, cfg: CosmosTransformerConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        cin = cfg.in_channels + int(cfg.concat_padding_mask)
        self.grid_max = tuple(s // p for s, p in zip(cfg.max_size, cfg.patch_size))
        self.patch_embed = PatchEmbed(cin, D, cfg.patch_size)
        self.learnable_pos_embed = (
            LearnablePosEmbed(D, self.grid_max) if cfg.extra_pos_embed_type == "learnable" else None
        )
        self.time_embed = TimeEmbed(D)
        self.transformer_blocks = nn.ModuleList([CosmosBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = AdaLNLoRA(D, cfg.adaln_lora_dim, 2)
        self.proj_out = nn.Linear(D, math.prod(cfg.patch_size) * cfg.out_channels, bias=False)
        if cfg.use_crossattn_projection:
            self.crossattn_proj = nn.Sequential(
                nn.Linear(cfg.crossattn_proj_in_channels, cfg.encoder_hidden_states_channels), nn.GELU()
            )
        else:
            self.crossattn_proj = None
        self.runner = BlockRunner()
        self._rope_cache: tuple[tuple, RotaryFreqs] | None = None

    def rope(self, grid: tuple[int, int, int], fps: float | None, device: torch.device) -> RotaryFreqs:
        """RoPE for this token grid and fps; recomputed only when they or the device change."""
        key = (grid, fps, device)
        if self._rope_cache is None or self._rope_cache[0] != key:
            freqs = rope_freqs(grid, self.cfg.attention_head_dim, self.cfg.rope_scale, fps, device)
            self._rope_cache = (key, freqs)
        return self._rope_cache[1]

    def _check(self, x, timestep, context, condition_mask, padding_mask) -> tuple[int, int, int]:
        cfg, B = self.cfg, x.shape[0]
        cin = cfg.in_channels - (condition_mask is not None)
        if x.ndim != 5 or x.shape[1] != cin:
            why = " (the condition_mask channel makes in_channels)" if condition_mask is not None else ""
            raise ValueError(f"hidden_states must be [B, {cin}, T, H, W]{why}, got {tuple(x.shape)}")
        if condition_mask is not None and condition_mask.shape != (B, 1, *x.shape[2:]):
            raise ValueError(f"condition_mask must be [B, 1, T, H, W], got {tuple(condition_mask.shape)}")
        if any(n % p for n, p in zip(x.shape[2:], cfg.patch_size)):
            raise ValueError(
                f"latent (T, H, W) {tuple(x.shape[2:])} must be multiples of patch {cfg.patch_size}"
            )
        grid = tuple(n // p for n, p in zip(x.shape[2:], cfg.patch_size))
        # RoPE takes positions up to the largest max_size axis; the learnable embedding each axis' own.
        limit = self.grid_max if self.learnable_pos_embed is not None else (max(self.grid_max),) * 3
        if any(n > m for n, m in zip(grid, limit)):
            raise ValueError(f"token grid {grid} exceeds {limit} (max_size {cfg.max_size} / patch)")
        if timestep.shape not in ((B,), (B, 1, x.shape[2], 1, 1)):
            raise ValueError(
                f"timestep must be [B] or per-frame [B, 1, T, 1, 1] = [{B}, 1, {x.shape[2]}, 1, 1], got "
                f"{tuple(timestep.shape)}"
            )
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.context_dim:
            want = f"[B, Lt, {cfg.context_dim}]"
            raise ValueError(f"encoder_hidden_states must be {want}, got {tuple(context.shape)}")
        if padding_mask is not None and (padding_mask.ndim != 4 or padding_mask.shape[:2] != (1, 1)):
            raise ValueError(f"padding_mask must be [1, 1, H, W], got {tuple(padding_mask.shape)}")
        return grid

    @forward_seam
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *,
        fps: float | None = None,
        condition_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The model output for latents hidden_states [B, C, T, H, W] (model dtype), as diffusers'
        `CosmosTransformer3DModel.forward(..., return_dict=False)[0]`.

        timestep: [B], or per frame [B, 1, T, 1, 1] (Video2World: conditioning frames get their own);
        the pipelines' preconditioned noise level, not an index. encoder_hidden_states: [B, Lt, ctx] text
        states (ctx = text_embed_dim, or crossattn_proj_in_channels for Predict2.5). fps: the video's
        frame rate, scaling RoPE's time positions (None for images and Predict2.5). condition_mask: [B, 1, T,
        H, W] (Video2World), appended as a channel. padding_mask: [1, 1, H_px, W_px], resized (nearest) to
        the latent grid and appended as a channel when `concat_padding_mask`; None means all zeros, which is
        what every pipeline passes. Returns [B, out_channels, T, H, W] in the model dtype.
        """
        x, context = hidden_states, encoder_hidden_states
        grid = self._check(x, timestep, context, condition_mask, padding_mask)
        set_video_grid(self, grid)
        B, _, T, H, W = x.shape
        dtype = x.dtype
        pt, ph, pw = self.cfg.patch_size
        t, h, w = grid

        channels = [x] if condition_mask is None else [x, condition_mask.to(dtype)]
        if self.cfg.concat_padding_mask:
            if padding_mask is None:
                pad = x.new_zeros(1, 1, H, W)
            else:  # torchvision's nearest resize, as the reference does it, is F.interpolate's "nearest"
                pad = F.interpolate(padding_mask.to(dtype), size=(H, W), mode="nearest")
            channels.append(pad[:, :, None].expand(B, 1, T, H, W))
        x = self.patch_embed(torch.cat(channels, dim=1))  # [B, L, D]

        rope = self.rope(grid, None if fps is None else float(fps), x.device)
        pos = self.learnable_pos_embed(grid).to(dtype) if self.learnable_pos_embed is not None else None

        per_frame = timestep.ndim == 5
        temb, e = self.time_embed(timestep.flatten(), dtype)  # [B or B*T, 3D], [B or B*T, D]
        temb, e = temb.view(B, -1, temb.shape[-1]), e.view(B, -1, e.shape[-1])  # [B, T', .]
        frames = (
            torch.arange(t, device=x.device).repeat_interleave(h * w) if per_frame and t > 1 else None
        )  # [L]: each token's frame (temporal patch 1)

        if self.crossattn_proj is not None:
            context = self.crossattn_proj(context)  # [B, Lt, text_embed_dim]

        frame_tokens = h * w if frames is not None else 0
        x = self.runner(self.transformer_blocks, x, context, e, temb, rope, pos, frames, frame_tokens)

        shift, scale1 = self.norm_out(F.silu(e), temb)  # fp32 [B, 1 or T, D]
        x = layer_norm_modulate(x, shift, scale1, EPS)  # [B, L, D]
        x = self.proj_out(x)  # [B, L, ph*pw*pt*Cout], features ordered (ph, pw, pt, c)
        x = x.reshape(B, t, h, w, ph, pw, pt, -1).permute(0, 7, 1, 6, 2, 4, 3, 5)
        return x.reshape(B, -1, T, H, W)

    def flops(
        self, num_frames_latent: int, height_latent: int, width_latent: int, text_len: int = 512
    ) -> int:
        """Matmul + attention FLOPs of one forward at batch 1 with one timestep (2*M*N*K per GEMM,
        4*Lq*Lk*Dh*H per attention). Arguments are latent sizes (before patchify); elementwise ops, norms
        and softmax are not counted."""
        cfg = self.cfg
        pt, ph, pw = cfg.patch_size
        L = (num_frames_latent // pt) * (height_latent // ph) * (width_latent // pw)
        D, F_, Lt, C, r = cfg.dim, cfg.ffn_dim, text_len, cfg.text_embed_dim, cfg.adaln_lora_dim
        patch = pt * ph * pw
        per_block = (
            2 * L * D * 3 * D  # attn1.to_qkv
            + 4 * L * L * D  # self-attention
            + 2 * L * D * D * 2  # attn1.to_out, attn2.to_q
            + 2 * Lt * C * 2 * D  # attn2.to_kv
            + 4 * L * Lt * D  # cross-attention
            + 2 * L * D * D  # attn2.to_out
            + 2 * L * D * F_ * 2  # ff
            + 3 * 2 * (D * r + r * 3 * D)  # AdaLN-LoRA modulation (one timestep row)
        )
        total = cfg.num_layers * per_block
        total += 2 * L * (cfg.in_channels + int(cfg.concat_padding_mask)) * patch * D  # patch embedding
        total += 2 * (D * D + D * 3 * D)  # timestep MLP
        if cfg.use_crossattn_projection:
            total += 2 * Lt * cfg.crossattn_proj_in_channels * C
        total += 2 * (D * r + r * 2 * D) + 2 * L * D * cfg.out_channels * patch  # norm_out, proj_out
        return total


def build_from_folder(folder: str | Path) -> CosmosTransformer:
    """The component builder for "CosmosTransformer3DModel": the model from `folder`'s config.json (call
    under `torch.device("meta")`; the loader fills the weights)."""
    from dit_rt import loaders

    return CosmosTransformer(CosmosTransformerConfig.from_config(loaders.read_config(Path(folder))))
