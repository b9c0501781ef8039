"""T5-family text encoder: UMT5 (Wan's `text_encoder`) and T5 v1.1 / original T5 (FLUX, Cosmos).

Module names equal the checkpoint keys of transformers' `UMT5EncoderModel` / `T5EncoderModel`, except the
fused `SelfAttention.qkv` projection (loaded from `q`, `k`, `v`). The two models differ in one place only:
UMT5 gives every block its own relative-position bias table, T5 has one in block 0 that all blocks share
(`UMT5Config.per_layer_position_bias`).

Attention runs through `F.scaled_dot_product_attention` with an additive float mask rather than the
`dit_rt.ops` attention seam: T5 adds a learned per-head position bias to the scores, which the seam's
(q, k, v, scale) contract has no room for, and the encoder runs once per prompt, so kernel choice is moot.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dit_rt.ops import Linear, fused
from dit_rt.runner import BlockRunner


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """The tanh-approximated GELU written out op by op, as both references compute it (transformers'
    `NewGELUActivation`, which "gated-gelu" maps to, and Wan's own T5): in bf16 every op rounds, so it is not
    F.gelu(approximate="tanh") (float32 inside, one rounding) to the last bit. Those bits matter: in the
    tests' 2-layer UMT5 the fused form left the bf16 prompt states about as far from the reference's bf16
    states as from float32's, and a bf16 Wan generation's frames ~5% further from float32 than diffusers'
    on most prompts (tools/bench_e2e.py --cpu-bf16, with the prompt-length pass of wan_text_embeddings);
    written out, the encoder equals the reference bit for bit."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


_ACTIVATIONS = {
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),  # transformers' PytorchGELUTanh
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass(frozen=True)
class UMT5Config:
    """Hyper-parameters of a T5-family encoder, named as in the Hub `text_encoder/config.json`."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    # UMT5: every block owns a bias table. T5: block 0 owns it and the other blocks reuse its bias.
    per_layer_position_bias: bool = True
    # Derived from feed_forward_proj in __post_init__.
    gated: bool = dataclasses.field(init=False)
    act: str = dataclasses.field(init=False)

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        gated = parts[0] == "gated" and len(parts) == 2
        if len(parts) > 2 or (len(parts) == 2 and not gated):
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r}: expected 'ACT' or 'gated-ACT'")
        act = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
        if act not in _ACTIVATIONS:
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r}: unknown activation {act!r}")
        object.__setattr__(self, "gated", gated)
        object.__setattr__(self, "act", act)

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_config(cls, config: dict) -> UMT5Config:
        """Read a transformers `T5Config`/`UMT5Config` dict (`text_encoder/config.json`); a missing
        `feed_forward_proj` takes the default of the class the model_type names."""
        model_type = config.get("model_type", "umt5")
        if model_type not in ("umt5", "t5"):
            raise ValueError(f"text encoder model_type {model_type!r}: expected 'umt5' or 't5'")
        names = {f.name for f in dataclasses.fields(cls) if f.init} - {"per_layer_position_bias"}
        kwargs = {k: config[k] for k in names if k in config}
        # transformers' defaults differ by class: T5Config's FFN is "relu" (original T5; google-t5/t5-11b's
        # own config.json predates the key), UMT5Config's "gated-gelu".
        kwargs.setdefault("feed_forward_proj", "relu" if model_type == "t5" else "gated-gelu")
        return cls(**kwargs, per_layer_position_bias=model_type == "umt5")


# Named presets (encoder halves only). Hub configs remain the source of truth when a folder is loaded.
PRESETS = {
    "umt5-xxl": UMT5Config(),
    "t5-v1_1-xxl": UMT5Config(vocab_size=32128, per_layer_position_bias=False),
    "t5-11b": UMT5Config(
        vocab_size=32128, d_model=1024, d_kv=128, d_ff=65536, num_heads=128, feed_forward_proj="relu",
        per_layer_position_bias=False,
    ),
}  # fmt: skip


class RMSNorm(nn.Module):
    """T5 LayerNorm: no mean subtraction, no bias; the variance is accumulated in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.eps)
        # Like the reference: the normalised value takes the (half-precision) weight's dtype before scaling.
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """Bidirectional T5 buckets of r = key_pos - query_pos: [L, L] int64 in [0, num_buckets).

    Half of the buckets per direction; within a direction, distances below half of that are exact and
    the rest are log-spaced up to max_distance (everything farther shares the last bucket).
    """
    pos = torch.arange(length, dtype=torch.long, device=device)
    r = pos[None, :] - pos[:, None]  # [Lq, Lk]
    half = num_buckets // 2
    offset = (r > 0).long() * half
    n = r.abs()
    exact = half // 2
    # n == 0 gives log(0) = -inf here; those entries take the exact branch below.
    log_bucket = (
        exact + (torch.log(n.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    )
    log_bucket = log_bucket.clamp(max=half - 1)
    return offset + torch.where(n < exact, n, log_bucket)


class SelfAttention(nn.Module):
    def __init__(self, cfg: UMT5Config, has_bias_table: bool):
        super().__init__()
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.qkv = fused(cfg.d_model, cfg.inner_dim, sources=("q", "k", "v"), bias=False)
        self.o = Linear(cfg.inner_dim, cfg.d_model, bias=False)
        if has_bias_table:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
        else:
            self.relative_attention_bias = None

    def position_bias(self, buckets: torch.Tensor) -> torch.Tensor:
        """[L, L] buckets -> [1, H, L, L] learned bias."""
        table = self.relative_attention_bias.weight
        if hasattr(table, "full_tensor"):
            # T5's shared bias is read from block 0 before the blocks run: under FSDP the table is still a
            # sharded DTensor there (a block's parameters are gathered only inside its own forward).
            table = table.full_tensor()
        return F.embedding(buckets, table).permute(2, 0, 1).unsqueeze(0)

    def forward(
        self, x: torch.Tensor, buckets: torch.Tensor, key_mask: torch.Tensor, shared_bias: torch.Tensor | None
    ) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, self.d_kv).permute(2, 0, 3, 1, 4)  # 3 x [B, H, L, D]
        bias = self.position_bias(buckets) if self.relative_attention_bias is not None else shared_bias
        bias = bias.to(q.dtype)
        # Padding keys get the most negative finite value (not -inf, so a row is never all -inf).
        bias = torch.where(key_mask[:, None, None, :], bias, torch.finfo(q.dtype).min)  # [B, H, L, L]
        # No 1/sqrt(d_kv) scaling: T5 folds it into the initialisation of q.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # [B, H, L, D]
        return self.o(out.transpose(1, 2).reshape(B, L, -1))


class SelfAttentionLayer(nn.Module):
    """`layer.0`: pre-norm self-attention with a residual."""

    def __init__(self, cfg: UMT5Config, has_bias_table: bool):
        super().__init__()
        self.SelfAttention = SelfAttention(cfg, has_bias_table)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x, buckets, key_mask, shared_bias):
        return x + self.SelfAttention(self.layer_norm(x), buckets, key_mask, shared_bias)


class DenseReluDense(nn.Module):
    """FFN: gated `wo(act(wi_0 x) * wi_1 x)` (T5 v1.1, UMT5) or plain `wo(act(wi x))` (original T5)."""

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.gated, self.act = cfg.gated, _ACTIVATIONS[cfg.act]
        if cfg.gated:
            self.wi_0 = Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))  # [B, L, d_ff]
        return self.wo(h)


class FeedForwardLayer(nn.Module):
    """`layer.1`: pre-norm FFN with a residual."""

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.DenseReluDense = DenseReluDense(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    # The reference clamps fp16 activations below the dtype max after every sub-layer (T5 overflows in
    # fp16); it is a no-op in bf16 and fp32, which never reach it.
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return x.clamp(-limit, limit)


class Block(nn.Module):
    def __init__(self, cfg: UMT5Config, has_bias_table: bool):
        super().__init__()
        self.layer = nn.ModuleList([SelfAttentionLayer(cfg, has_bias_table), FeedForwardLayer(cfg)])

    def forward(self, x, buckets, key_mask, shared_bias):
        x = _clamp_fp16(self.layer[0](x, buckets, key_mask, shared_bias))
        return _clamp_fp16(self.layer[1](x))


class Stack(nn.Module):
    """`encoder.*`: the blocks and the final norm (the token embedding lives at the top, as `shared`)."""

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.block = nn.ModuleList(
            [Block(cfg, has_bias_table=cfg.per_layer_position_bias or i == 0) for i in range(cfg.num_layers)]
        )
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)


class UMT5Encoder(nn.Module):
    """UMT5 / T5 encoder: token ids -> last hidden state (transformers' `*EncoderModel.last_hidden_state`)."""

    # transformers keeps `wo` in fp32 only for fp16 loads; for bf16 (the runtime's half type) everything
    # follows the load dtype, and so do we.
    keep_fp32: ClassVar[tuple[str, ...]] = ()
    # `encoder.embed_tokens.weight` is transformers' tied alias of `shared.weight` (some files store both).
    ckpt_key_map: ClassVar[tuple[tuple[str, str | None], ...]] = ((r"^encoder\.embed_tokens\.weight$", None),)

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg)
        self.runner = BlockRunner()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, L] int64, attention_mask [B, L] (1 = token, 0 = padding) -> [B, L, d_model].

        Padding rows still get values (they attend to the real tokens), as in the reference; callers that
        need them zeroed do it themselves (see `wan_text_embeddings`).
        """
        B, L = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        key_mask = attention_mask.to(input_ids.device) > 0  # [B, L] bool
        cfg = self.cfg
        buckets = relative_position_buckets(
            L, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance, input_ids.device
        )
        blocks = self.encoder.block
        shared_bias = None
        if not cfg.per_layer_position_bias:
            shared_bias = blocks[0].layer[0].SelfAttention.position_bias(buckets)  # [1, H, L, L]
        x = self.shared(input_ids)  # [B, L, d_model]
        x = self.runner(blocks, x, buckets, key_mask, shared_bias)
        return self.encoder.final_layer_norm(x)


# FLUX / Cosmos code reads better with the T5 names; they are the same classes.
T5Config = UMT5Config
T5Encoder = UMT5Encoder
