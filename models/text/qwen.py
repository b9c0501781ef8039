"""The Qwen2.5-VL language stack as Cosmos-Predict2.5 runs it for prompt embeddings (Cosmos-Reason1-7B,
the `text_encoder` of `Cosmos2_5_PredictBasePipeline`), and its chat-template tokenizer.

Only the text decoder is built: token embedding, the decoder layers (RMSNorm, GQA attention with biases on
q/k/v, SwiGLU MLP) and the final norm. The vision tower (`visual.*`) and `lm_head` are never built; their
checkpoint keys are dropped at load (`ckpt_key_map`). Module names equal the keys transformers 5.24
writes for `Qwen2_5_VLForConditionalGeneration` (`model.embed_tokens`, `model.layers.N.*`, `model.norm`),
except the fused `qkv_proj` (from `q_proj`, `k_proj`, `v_proj`) and `gate_up_proj` (from `gate_proj`,
`up_proj`); the `model.language_model.*` layout is accepted too.

Positions: Qwen2.5-VL rotates q/k with multimodal RoPE, three position streams (time, height, width)
each owning a section (`mrope_section`) of the rotary frequencies. For text-only input transformers
gives all three streams the same positions 0..L-1 (with or without an attention mask), so the sections
collapse to plain rotate-half RoPE over the whole head and `mrope_section` plays no part.

Attention runs through `F.scaled_dot_product_attention` (causal, optional padding mask) rather than the
`dit_rt.ops` seam, whose (q, k, v, scale) contract has no mask; the encoder runs once per prompt.

Prompt embeddings (`QwenTextEncoder.forward`): the pipeline asks transformers for all hidden states,
drops the first (the embedding output), keeps the outputs of layers 1..N-1 and, for the last layer, the
final-normed state (transformers replaces hidden_states[-1] by it), standardizes each per token (mean 0,
unbiased std, + 1e-8) and concatenates them: N * hidden features (28 * 3584 = 100,352 for 7B).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from dit_rt import loaders
from dit_rt.ops import Linear
from dit_rt.runner import BlockRunner

log = logging.getLogger("dit_rt")


@dataclass(frozen=True)
class QwenTextConfig:
    """Hyper-parameters of the Qwen2.5-VL text decoder, named as in the Hub config. Defaults: Qwen2.5-VL-7B
    (Cosmos-Reason1-7B): 28 layers of width 3584, 28 query heads and 4 key/value heads of 128."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}"
            )

    @property
    def head_dim(self) -> int:
        # transformers' Qwen2.5-VL attention derives it from the width and ignores any `head_dim` key.
        return self.hidden_size // self.num_attention_heads

    @property
    def embed_dim(self) -> int:
        """Width of the prompt embeddings `forward` returns: every layer's hidden state, concatenated."""
        return self.num_hidden_layers * self.hidden_size

    @classmethod
    def from_config(cls, config: dict) -> QwenTextConfig:
        """Read `text_encoder/config.json` of `Qwen2_5_VLForConditionalGeneration`: the text fields in
        `text_config` (transformers >= 4.5x saves) or at the top level (older files, Cosmos-Reason1-7B)."""
        model_type = config.get("model_type", "qwen2_5_vl")
        if model_type not in ("qwen2_5_vl", "qwen2_5_vl_text"):
            raise ValueError(f"text encoder model_type {model_type!r}: expected 'qwen2_5_vl'")
        text = config["text_config"] if isinstance(config.get("text_config"), dict) else config
        if text.get("use_sliding_window"):
            raise ValueError("Qwen2.5-VL text config: use_sliding_window=true is not supported")
        if text.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Qwen2.5-VL hidden_act {text['hidden_act']!r}: only 'silu' is supported")
        # RoPE: `rope_parameters` (transformers 5), else `rope_theta` + `rope_scaling` (older files).
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"Qwen2.5-VL rope type {rope_type!r}: only default / mrope are supported")
        theta = rope.get("rope_theta", text.get("rope_theta", cls.rope_theta))
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_theta"}
        return cls(**{k: text[k] for k in names if k in text}, rope_theta=float(theta))


class RMSNorm(nn.Module):
    """Qwen RMSNorm: normalised in fp32, cast back to the input dtype, then scaled by the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(
    length: int, head_dim: int, theta: float, dtype: torch.dtype, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, head_dim] for positions 0..L-1, rotate-half layout (the frequencies repeated twice).

    Computed in fp32 and cast to the activation dtype, as transformers does before rotating.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    freqs = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq  # [L, Dh/2]
    angles = torch.cat([freqs, freqs], dim=-1)  # [L, Dh]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, Dh] rotated by positions: x * cos + rotate_half(x) * sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """`self_attn`: causal grouped-query attention, biases on q/k/v, none on the output."""

    def __init__(self, cfg: QwenTextConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv_proj = Linear(
            cfg.hidden_size,
            q_dim + 2 * kv_dim,
            bias=True,
            sources=("q_proj", "k_proj", "v_proj"),
            splits=(q_dim, kv_dim, kv_dim),
        )
        self.o_proj = Linear(q_dim, cfg.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        B, L, _ = x.shape
        Dh = self.head_dim
        q, k, v = self.qkv_proj(x).split([self.heads * Dh, self.kv_heads * Dh, self.kv_heads * Dh], dim=-1)
        q = apply_rope(q.view(B, L, self.heads, Dh).transpose(1, 2), cos, sin)  # [B, H, L, Dh]
        k = apply_rope(k.view(B, L, self.kv_heads, Dh).transpose(1, 2), cos, sin)  # [B, Hkv, L, Dh]
        v = v.view(B, L, self.kv_heads, Dh).transpose(1, 2)  # [B, Hkv, L, Dh]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.kv_heads != self.heads
        )  # [B, H, L, Dh]
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x), gate and up in one GEMM."""

    def __init__(self, cfg: QwenTextConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = Linear(
            cfg.hidden_size,
            2 * self.inter,
            bias=False,
            sources=("gate_proj", "up_proj"),
            splits=(self.inter,) * 2,
        )
        self.down_proj = Linear(self.inter, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)  # 2 x [B, L, inter]
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: x + attn(norm x), then x + mlp(norm x)."""

    def __init__(self, cfg: QwenTextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """`model.*`: the token embedding, the decoder layers, the final norm."""

    def __init__(self, cfg: QwenTextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def standardize(h: torch.Tensor) -> torch.Tensor:
    """Per token over features: (h - mean) / (unbiased std + 1e-8), in fp32 (Cosmos-Predict2.5's recipe)."""
    h = h.float()
    return (h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-8)


class QwenTextEncoder(nn.Module):
    """Qwen2.5-VL text decoder: token ids -> Cosmos-Predict2.5 prompt embeddings [B, L, N * hidden]."""

    ckpt_key_map: ClassVar[tuple[tuple[str, str | None], ...]] = (
        (r"^(model\.)?visual\.", None),  # the vision tower: text prompts never reach it
        (r"^lm_head\.", None),  # next-token logits: not part of the embeddings
        (r"^model\.language_model\.", "model."),  # transformers 5's in-memory names, if a file has them
    )

    def __init__(self, cfg: QwenTextConfig):
        super().__init__()
        self.cfg = cfg
        self.model = TextModel(cfg)
        self.runner = BlockRunner()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, L] int64 -> [B, L, num_hidden_layers * hidden_size] in the weights' dtype.

        attention_mask [B, L] (1 = token, 0 = padding), optional: padding keys are masked on top of the
        causal mask; positions stay 0..L-1 either way, as in transformers. Cosmos-Predict2.5 passes none
        (its prompts are right-padded, so the causal mask already keeps padding out of the real rows).
        A mask must leave every row some key: pad on the right.
        """
        cfg = self.cfg
        B, L = input_ids.shape
        m = self.model
        x = m.embed_tokens(input_ids)  # [B, L, D]
        cos, sin = rope_tables(L, cfg.head_dim, cfg.rope_theta, x.dtype, x.device)
        mask = None
        if attention_mask is not None:
            keys = attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]  # [B, 1, 1, L]
            causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
            mask = causal & keys  # [B, 1, L, L]
        D, n = cfg.hidden_size, cfg.num_hidden_layers
        out = x.new_empty(B, L, n * D)
        for i in range(n):
            x = self.runner.run(m.layers, x, (cos, sin, mask), start=i, stop=i + 1)
            h = m.norm(x) if i == n - 1 else x  # transformers' hidden_states[-1] is after the final norm
            out[..., i * D : (i + 1) * D] = standardize(h)
        return out


def build_from_folder(folder: str | Path) -> QwenTextEncoder:
    """The encoder for a `text_encoder/` folder, built on the current default device (components.py builds
    on meta and loads the weights)."""
    return QwenTextEncoder(QwenTextConfig.from_config(loaders.read_config(Path(folder))))


SYSTEM_MESSAGE = "You are a helpful assistant who will provide prompts to an image generator."


def chat_text(prompt: str, system: str = SYSTEM_MESSAGE) -> str:
    """Qwen2.5-VL's chat template rendered for [system, user] text messages, no generation prompt, as
    Cosmos-Predict2.5 applies it (a system message is given, so the template adds no default one)."""
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(value) -> str | None:
    return value["content"] if isinstance(value, dict) else value


class QwenPromptTokenizer:
    """Token ids as Cosmos-Predict2.5's `tokenizer.apply_chat_template(..., tokenize=True,
    add_generation_prompt=False, max_length=512, truncation=True, padding="max_length")` gives them: the
    rendered chat (`chat_text`) encoded without added special tokens (the `<|im_start|>` / `<|im_end|>`
    markers are the tokenizer's added tokens, matched in the text), cut to max_length, padded with the
    pad token on the tokenizer's padding side."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        pad_token: str = "<|endoftext|>",
        padding_side: str = "right",
        truncation_side: str = "right",
    ):
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"tokenizer has no pad token {pad_token!r}")
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("right", "left"):
                raise ValueError(f"{name} {side!r}: expected 'right' or 'left'")
        self.tokenizer, self.pad_token, self.pad_id = tokenizer, pad_token, pad_id
        self.padding_side, self.truncation_side = padding_side, truncation_side

    @classmethod
    def from_folder(cls, folder: str | Path) -> QwenPromptTokenizer:
        """Load `folder/tokenizer.json`; pad token and sides from `tokenizer_config.json` if present."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: dit_rt needs the fast-tokenizer file (tokenizer.json)"
            )
        config = _read_json(folder / "tokenizer_config.json")
        return cls(
            Tokenizer.from_file(str(path)),
            _token_text(config.get("pad_token")) or "<|endoftext|>",
            config.get("padding_side", "right"),
            config.get("truncation_side", "right"),
        )

    def encode(self, prompts: list[str], max_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input_ids [B, max_length] int64, attention_mask [B, max_length] int64 (1 = token)."""
        tok = self.tokenizer
        texts = [chat_text(p) for p in prompts]
        tok.enable_truncation(max_length, direction=self.truncation_side)
        tok.enable_padding(
            direction=self.padding_side, pad_id=self.pad_id, pad_token=self.pad_token, length=max_length
        )
        encodings = tok.encode_batch(texts, add_special_tokens=False)
        cut = [i for i, e in enumerate(encodings) if e.overflowing]
        if cut:  # said once per call: a silently dropped end of a prompt misleads
            tok.no_truncation()
            tok.no_padding()
            counts = {i: len(tok.encode(texts[i], add_special_tokens=False).ids) for i in cut}
            log.warning(
                "%s (the text encoder reads max_sequence_length=%d tokens, chat template included)",
                "; ".join(
                    f"prompt {i} has {n} tokens, the last {n - max_length} dropped" for i, n in counts.items()
                ),
                max_length,
            )
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask
