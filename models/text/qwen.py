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

The decoder layers are models/text/decoder.py's (shared with FLUX.2's Mistral): attention through
`F.scaled_dot_product_attention`, causal with an optional padding mask.

Prompt embeddings (`QwenTextEncoder.forward`): the pipeline asks transformers for all hidden states,
drops the first (the embedding output), keeps the outputs of layers 1..N-1 and, for the last layer, the
final-normed state (transformers replaces hidden_states[-1] by it), standardizes each per token (mean 0,
unbiased std, + 1e-8) and concatenates them: N * hidden features (28 * 3584 = 100,352 for 7B).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from dit_rt import loaders
from dit_rt.models.text.decoder import DecoderLayer, RMSNorm, rope_tables, unbuilt_parts
from dit_rt.models.text.tokenizer import _PaddedTokenizer
from dit_rt.runner import BlockRunner


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


class TextModel(nn.Module):
    """`model.*`: the token embedding, the decoder layers, the final norm."""

    def __init__(self, cfg: QwenTextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, qkv_bias=True) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def standardize(h: torch.Tensor) -> torch.Tensor:
    """Per token over features: (h - mean) / (unbiased std + 1e-8), in fp32 (Cosmos-Predict2.5's recipe)."""
    h = h.float()
    return (h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-8)


class QwenTextEncoder(nn.Module):
    """Qwen2.5-VL text decoder: token ids -> Cosmos-Predict2.5 prompt embeddings [B, L, N * hidden]."""

    ckpt_key_map: ClassVar[tuple[tuple[str, str | None], ...]] = (
        *unbuilt_parts("visual"),  # the vision tower (text prompts never reach it) and lm_head
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
        cos, sin = rope_tables(cfg, L, x.device, x.dtype)
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


class QwenPromptTokenizer(_PaddedTokenizer):
    """Token ids as Cosmos-Predict2.5's `tokenizer.apply_chat_template(..., tokenize=True,
    add_generation_prompt=False, max_length=512, truncation=True, padding="max_length")` gives them: the
    rendered chat (`chat_text`) encoded without added special tokens (the `<|im_start|>` / `<|im_end|>`
    markers are the tokenizer's added tokens, matched in the text), cut to max_length, padded with the
    pad token on the tokenizer's padding side."""

    default_max_length = 512
    default_pad_token = "<|endoftext|>"
    special_tokens = False  # the template writes them
    counted = ", chat template included"

    def texts(self, prompts: list[str]) -> list[str]:
        return [chat_text(p) for p in prompts]
