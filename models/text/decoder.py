"""The decoder layer of the Llama-style language models dit_rt runs as prompt encoders (FLUX.2's
Mistral-Small, Cosmos-Predict2.5's Qwen2.5-VL): pre-norm RMSNorm, grouped-query attention with rotate-half
RoPE, SwiGLU MLP.

Module names equal transformers' checkpoint keys (`input_layernorm`, `self_attn`, `post_attention_layernorm`,
`mlp`), except the fused `qkv_proj` (loaded from `q_proj`, `k_proj`, `v_proj`) and `gate_up_proj` (from
`gate_proj`, `up_proj`), `dit_rt.ops` Linears so that linear= quantizes them at load. Attention runs through
`F.scaled_dot_product_attention` with a causal (+ padding) mask rather than the `dit_rt.ops` seam, whose
(q, k, v, scale) contract has no mask; an encoder runs once per prompt.

A config passes as `cfg`: hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim,
rms_norm_eps, rope_theta.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dit_rt.ops import Linear
from dit_rt.ops.elementwise import swiglu


class RMSNorm(nn.Module):
    """RMSNorm as Mistral and Qwen have it: normalised in fp32, cast back to the input dtype, then scaled."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(cfg, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, head_dim] for positions 0..L-1 in the rotate-half layout (each frequency twice, halves
    side by side). Angles are fp32; the tables take the activations' dtype, as the reference's do."""
    d = cfg.head_dim
    # Frequencies are computed on the CPU in fp32, as the reference builds its buffer.
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    pos = torch.arange(length, device=device, dtype=torch.float32)
    angles = pos[:, None] * inv_freq.to(device)[None, :]  # [L, d/2]
    angles = torch.cat([angles, angles], dim=-1)  # [L, d]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D]: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """`self_attn`: grouped-query attention with RoPE (adjacent query heads share a key/value head); q | k | v
    fused in one Linear, with biases where the model has them (Qwen); none on the output."""

    def __init__(self, cfg, qkv_bias: bool):
        super().__init__()
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv_proj = Linear(
            cfg.hidden_size,
            q_dim + 2 * kv_dim,
            bias=qkv_bias,
            sources=("q_proj", "k_proj", "v_proj"),
            splits=(q_dim, kv_dim, kv_dim),
        )
        self.o_proj = Linear(q_dim, cfg.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x [B, L, hidden]; mask [B, 1, L, L] bool (True = visible), or None for plain causal attention."""
        B, L, _ = x.shape
        H, G, D = self.heads, self.kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split((H * D, G * D, G * D), dim=-1)
        q = apply_rope(q.view(B, L, H, D).transpose(1, 2), cos, sin)  # [B, H, L, D]
        k = apply_rope(k.view(B, L, G, D).transpose(1, 2), cos, sin)  # [B, G, L, D]
        v = v.view(B, L, G, D).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=G != H
        )  # [B, H, L, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, L, H * D))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x), gate | up fused in one Linear."""

    def __init__(self, cfg):
        super().__init__()
        n = cfg.intermediate_size
        self.gate_up_proj = Linear(
            cfg.hidden_size, 2 * n, bias=False, sources=("gate_proj", "up_proj"), splits=(n, n)
        )
        self.down_proj = Linear(n, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # 2 x [B, L, intermediate]
        return self.down_proj(swiglu(gate, up))


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP, each with a residual."""

    def __init__(self, cfg, qkv_bias: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, qkv_bias)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def unbuilt_parts(*vision: str) -> tuple[tuple[str, None], ...]:
    """`ckpt_key_map` rules that drop what a prompt encoder never builds: the vision tower and projector
    (`vision`: their top-level names, under an optional `model.`) and `lm_head`."""
    return ((rf"^(?:model\.)?(?:{'|'.join(vision)})\.", None), (r"(?:^|\.)lm_head\.", None))
