"""Wan 2.1 / 2.2 diffusion transformer (diffusers' `WanTransformer3DModel`): T2V, Wan2.1 I2V/FLF2V, A14B.

Module names equal the diffusers checkpoint keys except the fused projections, which the loader fills by
concatenating their sources along the output dimension: `attn1.to_qkv` <- to_q, to_k, to_v;
`attn2.to_kv` <- to_k, to_v; `attn2.add_kv` <- add_k_proj, add_v_proj (Wan2.1 I2V image keys/values).

Precision follows the reference: the timestep MLP, the modulation tables and the LayerNorms hold fp32
weights (`keep_fp32`), every LayerNorm, modulation and gated residual add is computed in fp32 and cast back,
and RoPE is a rotation in fp32 of the (model-dtype) q and k. Everything else runs in the load dtype.

Layout: tokens stay [B, L, D]; q/k/v are [B, L, H, Dh] views of the fused projection output, which is what
the attention seam takes, so no head transposes happen in this file. The patch embedding is written as a
GEMM over patch vectors (a Conv3d with stride == kernel is exactly that) so its output is already [B, L, D].
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dit_rt.cache.teacache import WAN_RULES
from dit_rt.contract import BlockStack, CachePlan
from dit_rt.ops import Attention, Linear, fused
from dit_rt.ops.attention import set_video_grid
from dit_rt.ops.elementwise import gated_residual, layer_norm_modulate, rms_norm_rope
from dit_rt.ops.fused_ops import add_norm_into, attention_into, norm_into, qkv_norm_rope
from dit_rt.ops.linear import gelu_ffn
from dit_rt.parallel.sequence import Replicate, SequencePlan, Split
from dit_rt.runner import BlockRunner, forward_seam


@dataclass(frozen=True)
class WanTransformerConfig:
    """Hyper-parameters, named as in the Hub `transformer/config.json` (diffusers `WanTransformer3DModel`)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None  # CLIP width (1280) for Wan2.1 I2V/FLF2V; None = no image branch
    added_kv_proj_dim: int | None = None  # input width of the image K/V projections (the inner dim)
    rope_max_seq_len: int = 1024  # largest latent grid extent (frames, height or width patches) allowed
    pos_embed_seq_len: int | None = None  # FLF2V: 2 x 257 CLIP tokens get a learned position embedding
    # Derived in __post_init__.
    dim: int = dataclasses.field(init=False)

    # Keys diffusers' docstring still names but the model never reads; accepted and ignored.
    _IGNORED_KEYS: ClassVar[frozenset[str]] = frozenset({"window_size", "add_img_emb"})

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        object.__setattr__(self, "dim", self.num_attention_heads * self.attention_head_dim)
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size {self.patch_size}: expected (t, h, w)")
        if self.qk_norm != "rms_norm_across_heads":
            raise ValueError(f"qk_norm {self.qk_norm!r}: only 'rms_norm_across_heads' (every Wan checkpoint)")
        if self.attention_head_dim % 2 or (self.attention_head_dim - 4 * (self.attention_head_dim // 6)) % 2:
            raise ValueError(f"attention_head_dim {self.attention_head_dim}: RoPE needs even axis chunks")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError("image_dim and added_kv_proj_dim must both be set (Wan2.1 I2V) or both be null")
        if self.added_kv_proj_dim is not None and self.added_kv_proj_dim != self.dim:
            # The image K/V projections read the image embedder's output, which is `dim` wide.
            raise ValueError(
                f"added_kv_proj_dim {self.added_kv_proj_dim} must equal the inner dim {self.dim}"
            )
        if self.pos_embed_seq_len is not None and self.image_dim is None:
            raise ValueError("pos_embed_seq_len (FLF2V) needs the image branch (image_dim)")

    @property
    def has_image_branch(self) -> bool:
        return self.image_dim is not None

    @classmethod
    def from_config(cls, config: dict) -> WanTransformerConfig:
        """Read a diffusers `WanTransformer3DModel` config dict; `_`-prefixed metadata is skipped."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = {k for k in config if not k.startswith("_")} - names - cls._IGNORED_KEYS
        if unknown:
            raise ValueError(f"unknown Wan transformer config keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**{k: config[k] for k in names if k in config})

    @classmethod
    def preset(cls, name: str) -> WanTransformerConfig:
        if name not in WAN_TRANSFORMER_PRESETS:
            raise KeyError(
                f"unknown Wan transformer preset {name!r}; known: {sorted(WAN_TRANSFORMER_PRESETS)}"
            )
        return WAN_TRANSFORMER_PRESETS[name]


_14B = WanTransformerConfig()  # the class defaults are the 14B shape
WAN_TRANSFORMER_PRESETS: dict[str, WanTransformerConfig] = {
    "wan2.1-t2v-1.3b": WanTransformerConfig(num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "wan2.1-t2v-14b": _14B,
    "wan2.1-i2v-14b": dataclasses.replace(_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120),
    "wan2.1-flf2v-14b": dataclasses.replace(
        _14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120, pos_embed_seq_len=514
    ),
    # Wan2.2 A14B: `transformer` (high noise) and `transformer_2` (low noise) are two instances of this.
    "wan2.2-t2v-a14b": _14B,
    # Wan2.2 I2V conditions through the 20 extra latent channels only: no CLIP branch.
    "wan2.2-i2v-a14b": dataclasses.replace(_14B, in_channels=36),
}


# ------------------------------------------------------------------------------------------------ leaf math


class RotaryFreqs(NamedTuple):
    """Per-token RoPE rotation, fp32, [L, 1, Dh/2] each (broadcasts over batch and heads)."""

    cos: torch.Tensor
    sin: torch.Tensor


def rope_freqs(
    grid: tuple[int, int, int], head_dim: int, device: torch.device, theta: float = 10000.0
) -> RotaryFreqs:
    """3-D RoPE angles for a (frames, height, width) token grid in row-major token order.

    The head dim splits into time / height / width chunks of head_dim - 4*(head_dim//6), 2*(head_dim//6),
    2*(head_dim//6) channels (44/42/42 for 128); channel pair j of a chunk of size m turns at
    theta^(-2j/m) per position. Angles are formed in float64 (positions reach ~1000) and stored fp32.
    """
    d_hw = 2 * (head_dim // 6)
    chunks = (head_dim - 2 * d_hw, d_hw, d_hw)
    angles = []
    for axis, (n, m) in enumerate(zip(grid, chunks)):
        omega = 1.0 / theta ** (torch.arange(0, m, 2, dtype=torch.float64, device=device) / m)
        a = torch.arange(n, dtype=torch.float64, device=device)[:, None] * omega  # [n, m/2]
        shape = [1, 1, 1, m // 2]
        shape[axis] = n
        angles.append(a.view(shape).expand(*grid, m // 2))
    a = torch.cat(angles, dim=-1).reshape(-1, 1, head_dim // 2)  # [L, 1, Dh/2]
    return RotaryFreqs(a.cos().float(), a.sin().float())


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t [B] (int or float) -> [B, dim] fp32, cos half first, frequencies 10000^(-k/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs  # [B, dim/2]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype; returns fp32 (callers modulate in fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class GeluProj(nn.Module):
    """`proj` then GELU: diffusers' `FeedForward.net.0`."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str, linear=Linear):
        super().__init__()
        self.proj = linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.approximate == "tanh" and isinstance(self.proj, Linear):
            return self.proj.gelu_tanh(x)  # GELU fused into the GEMM where the format allows it
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """`net.0.proj` -> GELU -> `net.2`; `net.1` is diffusers' dropout slot, kept so the keys line up."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, approximate: str, linear=Linear):
        super().__init__()
        self.net = nn.Sequential(
            GeluProj(dim_in, hidden, approximate, linear), nn.Identity(), linear(hidden, dim_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.net[0], self.net[2]
        if up.approximate == "tanh" and isinstance(up.proj, Linear) and isinstance(down, Linear):
            return gelu_ffn(up.proj, down, x)  # GELU fused into the GEMMs where the format allows it
        return self.net(x)


# ------------------------------------------------------------------------------------------------ embedders
# The condition embedders, patch embedding and proj_out use plain nn.Linear: they are boundary layers run on
# few tokens (or once per step), and weight formats target the block linears only.


class PatchEmbed(nn.Module):
    """Conv3d(Cin -> D, kernel = stride = patch) as a GEMM: [B, C, T, H, W] -> [B, L, D], L = t*h*w."""

    def __init__(self, cin: int, dim: int, patch: tuple[int, int, int]):
        super().__init__()
        self.patch = patch
        self.weight = nn.Parameter(torch.empty(dim, cin, *patch))
        self.bias = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        pt, ph, pw = self.patch
        # Gather each patch into one vector ordered (c, pt, ph, pw) like the conv weight; this copies the thin
        # Cin-channel input instead of transposing the D-wide conv output.
        x = x.reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, -1, C * pt * ph * pw)  # [B, L, C*pt*ph*pw]
        return F.linear(x, self.weight.flatten(1), self.bias)  # [B, L, D]


class TimestepEmbedder(nn.Module):
    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(s)))


class TextEmbedder(nn.Module):
    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(text_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(c), approximate="tanh"))


class ImageEmbedder(nn.Module):
    """CLIP tokens [B, Li, image_dim] -> [B, Li, D]: LN, Linear, GELU, Linear, LN (LNs in fp32, eps 1e-5)."""

    def __init__(self, image_dim: int, dim: int, pos_embed_seq_len: int | None):
        super().__init__()
        self.norm1 = FP32LayerNorm(image_dim, eps=1e-5)
        self.ff = FeedForward(image_dim, image_dim, dim, approximate="none", linear=nn.Linear)
        self.norm2 = FP32LayerNorm(dim, eps=1e-5)
        self.pos_embed = (
            nn.Parameter(torch.empty(1, pos_embed_seq_len, image_dim)) if pos_embed_seq_len else None
        )

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        dtype = e.dtype
        if self.pos_embed is not None:
            # FLF2V: first- and last-frame tokens (stacked along the batch) become one 514-token sequence.
            e = e.reshape(-1, self.pos_embed.shape[1], e.shape[-1]) + self.pos_embed
        e = self.ff(self.norm1(e).to(dtype))
        return self.norm2(e).to(dtype)


class ConditionEmbedder(nn.Module):
    def __init__(self, cfg: WanTransformerConfig):
        super().__init__()
        D = cfg.dim
        self.freq_dim = cfg.freq_dim
        self.time_embedder = TimestepEmbedder(cfg.freq_dim, D)
        self.time_proj = nn.Linear(D, 6 * D)
        self.text_embedder = TextEmbedder(cfg.text_dim, D)
        self.image_embedder = (
            ImageEmbedder(cfg.image_dim, D, cfg.pos_embed_seq_len) if cfg.has_image_branch else None
        )


# ------------------------------------------------------------------------------------------------ blocks


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    return x.unflatten(-1, (h, -1))  # [B, L, D] -> [B, L, H, Dh]


class SelfAttention(nn.Module):
    """`attn1`: fused QKV, RMSNorm over the whole inner dim on q and k, 3-D RoPE, no mask."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.to_qkv = fused(dim, dim, sources=("to_q", "to_k", "to_v"))
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.to_out = nn.ModuleList([Linear(dim, dim)])
        self.attn = Attention(head_dim=dim // heads)

    def forward(self, x: torch.Tensor, rope: RotaryFreqs) -> torch.Tensor:
        out = self.to_out[0]
        # to_qkv(x) -> whole-width RMSNorm of q and k, interleaved RoPE -> [B, L, H, Dh] each
        q, k, v = qkv_norm_rope(
            self.to_qkv, x, self.norm_q, self.norm_k, self.heads, rope, attn=self.attn, out=out
        )
        return attention_into(out, self.attn, q, [(k, v)])  # to_out(attention(q, k, v) as [B, L, D])


class CrossAttention(nn.Module):
    """`attn2`: text cross-attention, plus (Wan2.1 I2V) a second attention over the CLIP image tokens."""

    def __init__(self, dim: int, heads: int, eps: float, image_branch: bool):
        super().__init__()
        self.heads = heads
        self.to_q = Linear(dim, dim)
        self.to_kv = fused(dim, dim, sources=("to_k", "to_v"))
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.to_out = nn.ModuleList([Linear(dim, dim)])
        if image_branch:
            self.add_kv = fused(dim, dim, sources=("add_k_proj", "add_v_proj"))
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)
        else:
            self.add_kv = self.norm_added_k = None
        self.attn = Attention(head_dim=dim // heads)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_img: torch.Tensor | None
    ) -> torch.Tensor:
        # q stays in the model dtype whatever the backend (plain `rms_norm_rope`, not the fused op): over
        # 257-514 keys a low-precision attention gains nothing (see fa3.BF16_BELOW_KEYS).
        h = self.heads
        q = rms_norm_rope(self.to_q(x), self.norm_q.weight, self.norm_q.eps, h)  # [B, L, H, Dh], for both
        k, v = self.to_kv(context).chunk(2, dim=-1)  # [B, Lt, D] each
        kv = [(_heads(self.norm_k(k), h), _heads(v, h))]
        if self.add_kv is not None:
            k, v = self.add_kv(context_img).chunk(2, dim=-1)  # [B, Li, D] each
            kv.append((_heads(self.norm_added_k(k), h), _heads(v, h)))
        return attention_into(self.to_out[0], self.attn, q, kv)  # text (+ image) attention, summed


class WanBlock(nn.Module):
    """adaLN self-attention -> (affine-LN) cross-attention -> adaLN FFN, each with a residual."""

    def __init__(self, cfg: WanTransformerConfig):
        super().__init__()
        D = cfg.dim
        self.eps = cfg.eps
        self.attn1 = SelfAttention(D, cfg.num_attention_heads, cfg.eps)
        self.attn2 = CrossAttention(D, cfg.num_attention_heads, cfg.eps, cfg.has_image_branch)
        self.norm2 = FP32LayerNorm(D, eps=cfg.eps) if cfg.cross_attn_norm else None
        self.ffn = FeedForward(D, cfg.ffn_dim, D, approximate="tanh")
        self.scale_shift_table = nn.Parameter(torch.empty(1, 6, D))

    def forward(
        self,
        x: torch.Tensor,  # [B, L, D] model dtype
        context: torch.Tensor,  # [B, Lt, D] embedded text
        context_img: torch.Tensor | None,  # [B, Li, D] embedded CLIP tokens (Wan2.1 I2V) or None
        tproj: torch.Tensor,  # [B, 6, D] fp32 timestep projection
        rope: RotaryFreqs,
    ) -> torch.Tensor:
        # [B, 1, D] fp32 each, computed once per block.
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + tproj).chunk(6, dim=1)

        # fp32 LayerNorm(x) * (1 + scale) + shift, one fused pass handing its result to the next GEMM in the
        # form that GEMM takes (`dit_rt.ops.fused_ops`).
        y = self.attn1(norm_into(self.attn1.to_qkv, x, shift, 1 + scale, self.eps), rope)

        n = self.norm2
        if n is None:
            x = y = gated_residual(x, y, gate)  # x + y * gate in fp32
        else:  # the gated residual and the cross-attention's affine LayerNorm in one pass
            x, y = add_norm_into(
                self.attn2.to_q, x, y, None, None, n.eps, gate=gate, weight=n.weight, bias=n.bias,
                row_norm=False,
            )  # fmt: skip
        # x + attn2(...) (no gate, model dtype, as the reference) and the FFN's LayerNorm in one pass
        x, y = add_norm_into(
            self.ffn.net[0].proj, x, self.attn2(y, context, context_img), c_shift, 1 + c_scale, self.eps
        )
        return gated_residual(x, self.ffn(y), c_gate)


# ------------------------------------------------------------------------------------------------ model


class WanTransformer(nn.Module):
    """Wan DiT: noisy latents, timestep, text (and CLIP image) embeddings -> flow-matching velocity."""

    # diffusers' `_keep_in_fp32_modules` (substring match): timestep MLP, modulation tables, LayerNorms.
    keep_fp32: ClassVar[tuple[str, ...]] = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")
    # Older I2V conversions carry an unused `norm_added_q`; diffusers drops it on load, so do we.
    ckpt_key_map: ClassVar[tuple[tuple[str, str | None], ...]] = (
        (r"^blocks\.\d+\.attn2\.norm_added_q\.\w+$", None),
    )
    # The block seam (dit_rt.contract): one stack, `runner(blocks, x, context, context_img, tproj, rope)`.
    stacks: ClassVar[tuple[BlockStack, ...]] = (
        BlockStack("blocks", carry=("x",), args=("context", "context_img", "tproj", "rope")),
    )
    # TeaCache (the authors' Wan rules) measures the runner's `tproj`, or the time embedder's output `temb`.
    cache_plan: ClassVar[CachePlan] = CachePlan(
        runner_args={"tproj": "tproj"},
        module_outputs={"temb": "condition_embedder.time_embedder"},
        teacache=WAN_RULES,
    )
    # Sequence parallelism (applied from dit_rt.parallel): one stream, the video tokens x [B, L, D] split
    # along dim 1 with their RoPE tables [L, 1, Dh/2] (dim 0); text / image context and tproj replicated;
    # only attn1 attends over the tokens.
    sequence_plan: ClassVar[SequencePlan] = SequencePlan(
        inputs={
            "x": Split("x"), "rope": Split("x", dim=0),
            "context": Replicate(), "context_img": Replicate(), "tproj": Replicate(),
        },
        attention={"blocks.*.attn1.attn": ("x",)},
    )  # fmt: skip
    # Attention modes (dit_rt.ops.attention.svg): attn1 attends over the video tokens alone, in (t, h, w)
    # row-major order; the forward declares their grid with `set_video_grid`.
    video_attention: ClassVar[tuple[str, ...]] = ("blocks.*.attn1.attn",)

    def __init__(self, cfg: WanTransformerConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.patch_embedding = PatchEmbed(cfg.in_channels, D, cfg.patch_size)
        self.condition_embedder = ConditionEmbedder(cfg)
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(cfg.num_layers)])
        self.proj_out = nn.Linear(D, cfg.out_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.empty(1, 2, D))
        self.runner = BlockRunner()
        self._rope_cache: tuple[tuple, RotaryFreqs] | None = None

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> RotaryFreqs:
        """RoPE for this token grid; recomputed only when the grid or device changes, so steps reuse it."""
        key = (grid, device)
        if self._rope_cache is None or self._rope_cache[0] != key:
            self._rope_cache = (key, rope_freqs(grid, self.cfg.attention_head_dim, device))
        return self._rope_cache[1]

    def _check(self, x: torch.Tensor, timestep: torch.Tensor, context, image_context) -> tuple[int, int, int]:
        cfg = self.cfg
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be [B, {cfg.in_channels}, T, H, W], got {tuple(x.shape)}")
        if any(n % p for n, p in zip(x.shape[2:], cfg.patch_size)):
            raise ValueError(
                f"latent (T, H, W) {tuple(x.shape[2:])} must be multiples of patch {cfg.patch_size}"
            )
        grid = tuple(n // p for n, p in zip(x.shape[2:], cfg.patch_size))
        if max(grid) > cfg.rope_max_seq_len:
            raise ValueError(f"token grid {grid} exceeds rope_max_seq_len {cfg.rope_max_seq_len}")
        if timestep.shape != (x.shape[0],):
            raise ValueError(f"timestep must be [B] = [{x.shape[0]}], got {tuple(timestep.shape)}")
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context must be [B, Lt, {cfg.text_dim}], got {tuple(context.shape)}")
        if cfg.has_image_branch != (image_context is not None):
            need = (
                "needs image_context [B, 257, image_dim]"
                if cfg.has_image_branch
                else "takes no image_context"
            )
            raise ValueError(f"this Wan transformer {need}")
        return grid

    @forward_seam
    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        image_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity for latents x [B, Cin, T, H, W] (model dtype) at timestep [B] (int or float, 0..1000).

        context: [B, Lt, text_dim] text-encoder states (model dtype; Lt = 512 in the pipelines).
        image_context: [B, 257, image_dim] CLIP penultimate states for Wan2.1 I2V ([2B, 257, ...] or
        [B, 514, ...] for FLF2V), else None. Returns [B, Cout, T, H, W] in the model dtype.
        """
        t, h, w = self._check(x, timestep, context, image_context)
        B, _, T, H, W = x.shape
        pt, ph, pw = self.cfg.patch_size
        rope = self.rope((t, h, w), x.device)
        set_video_grid(self, (t, h, w))

        x = self.patch_embedding(x)  # [B, L, D]

        emb = self.condition_embedder
        s = timestep_sinusoid(timestep, emb.freq_dim)  # [B, freq_dim] fp32
        temb = emb.time_embedder(s.to(emb.time_embedder.linear_1.weight.dtype)).to(context.dtype)  # [B, D]
        tproj = emb.time_proj(F.silu(temb)).unflatten(1, (6, -1)).float()  # [B, 6, D]
        context = emb.text_embedder(context)  # [B, Lt, D]
        context_img = emb.image_embedder(image_context) if emb.image_embedder is not None else None

        x = self.runner(self.blocks, x, context, context_img, tproj, rope)  # [B, L, D]

        shift, scale = (self.scale_shift_table + temb[:, None]).chunk(2, dim=1)  # [B, 1, D] fp32 (uses temb)
        x = layer_norm_modulate(x, shift, 1 + scale, self.cfg.eps)
        x = self.proj_out(x)  # [B, L, pt*ph*pw*Cout], features ordered (pt, ph, pw, c)
        x = x.reshape(B, t, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, -1, T, H, W)

    def flops(
        self,
        num_frames_latent: int,
        height_latent: int,
        width_latent: int,
        text_len: int = 512,
        image_tokens: int = 0,
    ) -> int:
        """Matmul + attention FLOPs of one forward at batch 1 (2*M*N*K per GEMM, 4*Lq*Lk*Dh*H per attention).

        Arguments are latent sizes (before patchify); elementwise ops, norms and softmax are not counted.
        """
        cfg = self.cfg
        pt, ph, pw = cfg.patch_size
        L = (num_frames_latent // pt) * (height_latent // ph) * (width_latent // pw)
        D, F_, Lt, Li = cfg.dim, cfg.ffn_dim, text_len, image_tokens
        patch = pt * ph * pw
        per_block = (
            2 * L * D * 3 * D  # attn1.to_qkv
            + 4 * L * L * D  # self-attention
            + 2 * L * D * D * 2  # attn1.to_out, attn2.to_q
            + 2 * Lt * D * 2 * D  # attn2.to_kv
            + 4 * L * Lt * D  # text cross-attention
            + 2 * L * D * D  # attn2.to_out
            + 2 * L * D * F_ * 2  # ffn
        )
        if Li and not cfg.has_image_branch:
            raise ValueError("image_tokens > 0 but this Wan transformer has no image branch")
        if Li:
            per_block += 2 * Li * D * 2 * D + 4 * L * Li * D  # image K/V + image cross-attention
        total = cfg.num_layers * per_block
        total += 2 * L * cfg.in_channels * patch * D  # patch embedding
        total += 2 * (cfg.freq_dim * D + D * D + D * 6 * D)  # timestep MLP + time_proj
        total += 2 * Lt * (cfg.text_dim * D + D * D)  # text embedder
        if Li:
            total += 2 * Li * (cfg.image_dim * cfg.image_dim + cfg.image_dim * D)  # image embedder
        total += 2 * L * D * cfg.out_channels * patch  # proj_out
        return total
