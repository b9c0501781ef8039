"""CLIP towers: the vision tower of Wan 2.1 image-to-video's `image_encoder` (OpenCLIP ViT-H/14, laion2B)
and the text tower of FLUX.1's `text_encoder` (OpenAI ViT-L/14). Both share the pre-LN layer.

Text tower: module names equal the Hub `CLIPTextModel` keys (`text_model.embeddings.*`,
`text_model.encoder.layers.N.*`, `text_model.final_layer_norm.*`), with the same fused `qkv_proj`. Its
attention is causal and runs through `F.scaled_dot_product_attention(is_causal=True)` rather than the
`dit_rt.ops` seam, whose (q, k, v, scale) contract has no mask; the encoder runs once per prompt on 77
tokens, so kernel choice is moot. FLUX reads the pooled output: the final-normed state at the EOS token.

Vision tower: module names equal the checkpoint keys of transformers' `CLIPVisionModelWithProjection` as
stored on the Hub (`vision_model.embeddings.*`, `vision_model.encoder.layers.N.*`, ...), except the fused
`self_attn.qkv_proj` (loaded from `q_proj`, `k_proj`, `v_proj`). `ckpt_key_map` also accepts the
unprefixed keys that transformers 5 writes for a bare `CLIPVisionModel`, and drops `visual_projection`.

Wan conditions on hidden_states[-2]: the output of the second-to-last encoder layer, before any final
norm, for all 1 + (image_size / patch_size)^2 tokens. `forward` returns exactly that and never runs the
last layer (its output is unused), which saves 1/32 of the encoder at ViT-H size; `hidden_states` runs
every layer when all of them are wanted. `post_layernorm` only normalises the pooled CLS token, which Wan
does not use: it is kept so that checkpoints load strictly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dit_rt.ops import Attention, Linear, fused
from dit_rt.runner import BlockRunner


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,  # exact (erf); OpenCLIP ViT-H/14 uses it
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def _square(name: str, value) -> int:
    # transformers accepts int or [h, w] for image_size / patch_size; the CLIP towers on the Hub are square.
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"CLIP vision {name} {value!r}: only square sizes are supported")
        value = value[0]
    return int(value)


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Hyper-parameters of a CLIP vision tower, named as in the Hub `image_encoder/config.json`.

    Defaults are OpenCLIP ViT-H/14 (Wan 2.1 I2V): 32 layers of width 1280, 16 heads of 80, 224 px images in
    14 px patches -> 257 tokens.
    """

    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_attention_heads: int = 16
    num_hidden_layers: int = 32
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r}: expected one of {', '.join(_ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_positions(self) -> int:
        """Tokens per image: the CLS token and one per patch."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_config(cls, config: dict) -> CLIPVisionConfig:
        """Read a transformers `CLIPVisionConfig` dict, or a full `CLIPConfig` dict (its `vision_config`)."""
        model_type = config.get("model_type", "clip_vision_model")
        if model_type == "clip":
            config = config["vision_config"]
        elif model_type != "clip_vision_model":
            raise ValueError(
                f"image encoder model_type {model_type!r}: expected 'clip_vision_model' or 'clip'"
            )
        kwargs = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config}
        for name in ("image_size", "patch_size"):
            if name in kwargs:
                kwargs[name] = _square(name, kwargs[name])
        return cls(**kwargs)


# Named presets. Hub configs remain the source of truth when a folder is loaded.
PRESETS = {
    "clip-vit-h-14": CLIPVisionConfig(),
    "clip-vit-l-14": CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
        hidden_act="quick_gelu",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters of a CLIP text tower, named as in the Hub `text_encoder/config.json`.

    Defaults are OpenAI ViT-L/14 (FLUX.1): 12 layers of width 768, 12 heads of 64, 77 positions.
    eos_token_id picks the pooling rule, as transformers does: the legacy value 2 (the FLUX.1 config)
    pools at the largest input id (the EOS 49407 is the largest id in the vocabulary), any other value at
    the first occurrence of that id.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_hidden_layers: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r}: expected one of {', '.join(_ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_config(cls, config: dict) -> CLIPTextConfig:
        """Read a transformers `CLIPTextConfig` dict, or a full `CLIPConfig` dict (its `text_config`)."""
        model_type = config.get("model_type", "clip_text_model")
        if model_type == "clip":
            config = config["text_config"]
        elif model_type != "clip_text_model":
            raise ValueError(f"text encoder model_type {model_type!r}: expected 'clip_text_model' or 'clip'")
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config})


TEXT_PRESETS = {"clip-vit-l-14": CLIPTextConfig()}


class CLIPVisionEmbeddings(nn.Module):
    """Patchify (conv, no bias), prepend the class token, add learned absolute positions."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.image_size, self.patch_size = cfg.image_size, cfg.patch_size
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, _, h, w = pixel_values.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(
                f"the image encoder takes {self.image_size}x{self.image_size} pixel_values, got {h}x{w}: "
                "preprocess images with dit_rt.image.clip_preprocess"
            )
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [B, D, H/p, W/p]
        x = x.flatten(2).transpose(1, 2)  # [B, N, D]
        cls = self.class_embedding.to(x.dtype).expand(B, 1, -1)  # [B, 1, D]
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # [B, 1 + N, D]


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biases on q, k, v and out: bidirectional through the attention seam
    (vision), or causal through SDPA (text; see the module docstring). Scale 1/sqrt(head_dim)."""

    def __init__(self, cfg: CLIPVisionConfig | CLIPTextConfig, causal: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.causal = cfg.num_attention_heads, cfg.head_dim, causal
        D = cfg.hidden_size
        self.qkv_proj = fused(D, D, sources=("q_proj", "k_proj", "v_proj"))
        self.out_proj = Linear(D, D)
        self.attn = None if causal else Attention(cfg.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, L, 3, self.heads, self.head_dim).unbind(2)  # 3 x [B, L, H, Dh]
        if self.causal:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, Dh]
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)  # [B, L, H, Dh]
        else:
            out = self.attn(q, k, v)  # [B, L, H, Dh]
        return self.out_proj(out.reshape(B, L, -1))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig | CLIPTextConfig):
        super().__init__()
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(LN1 x), then x + mlp(LN2 x)."""

    def __init__(self, cfg: CLIPVisionConfig | CLIPTextConfig, causal: bool = False):
        super().__init__()
        self.self_attn = CLIPAttention(cfg, causal)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig | CLIPTextConfig, causal: bool = False):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg, causal) for _ in range(cfg.num_hidden_layers)])


class CLIPVisionTransformer(nn.Module):
    """`vision_model.*`: embeddings, the (misspelt, as in the checkpoints) `pre_layrnorm`, the layers."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # pooled CLS only


class CLIPVisionEncoder(nn.Module):
    """CLIP vision tower: pixel_values -> hidden states, as transformers' `CLIPVisionModel` hidden_states."""

    # The whole tower stays fp32 whatever the load dtype, as the Diffusers docs and model cards load Wan's
    # image encoder: it runs once per video on 257 tokens, so fp32 costs 1.3 GB more than bf16 (2.5 GB)
    # and no time worth counting.
    keep_fp32: ClassVar[tuple[str, ...]] = ("vision_model.",)
    ckpt_key_map: ClassVar[tuple[tuple[str, str | None], ...]] = (
        (r"^visual_projection\.", None),  # CLIPVisionModelWithProjection's head; Wan does not use it
        (r"position_ids$", None),  # a non-persistent buffer some older files still carry
        # transformers 5 saves a bare CLIPVisionModel without the `vision_model.` prefix.
        (r"^(embeddings|pre_layrnorm|encoder|post_layernorm)\.", r"vision_model.\1."),
    )

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = CLIPVisionTransformer(cfg)
        self.runner = BlockRunner()

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, S, S] -> hidden_states[0] [B, T, D]: embeddings after `pre_layrnorm`."""
        vm = self.vision_model
        return vm.pre_layrnorm(vm.embeddings(pixel_values))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, C, S, S] (see `clip_preprocess`) -> hidden_states[-2] [B, T, D], T = 1 + (S/p)^2.

        The penultimate layer's output, which Wan 2.1 I2V cross-attends to; the last layer is not run.
        Returned in the encoder's parameter dtype (fp32 when loaded with `keep_fp32`).
        """
        layers = self.vision_model.encoder.layers
        return self.runner(layers[:-1], self.embed(pixel_values))

    def hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All num_hidden_layers + 1 hidden states [B, T, D], indexed as transformers' `hidden_states`:
        [0] is the normed embeddings, [i] the output of layer i - 1, [-1] the last layer (no final norm)."""
        x = self.embed(pixel_values)
        out = [x]
        for i in range(len(self.vision_model.encoder.layers)):
            x = self.runner(self.vision_model.encoder.layers[i : i + 1], x)
            out.append(x)
        return tuple(out)


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute positions."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n, most = input_ids.shape[1], self.position_embedding.num_embeddings
        if n > most:
            raise ValueError(f"the CLIP text encoder reads at most {most} tokens, got {n}")
        return self.token_embedding(input_ids) + self.position_embedding.weight[:n]  # [B, L, D]


class CLIPTextTransformer(nn.Module):
    """`text_model.*`: embeddings, the causal layers, the final norm."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg, causal=True)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # [B, L, D], after the final norm
    pooled: torch.Tensor  # [B, D], last_hidden_state at each prompt's EOS token


class CLIPTextEncoder(nn.Module):
    """CLIP text tower: token ids -> transformers' `CLIPTextModel` last_hidden_state and pooler_output."""

    ckpt_key_map: ClassVar[tuple[tuple[str, str | None], ...]] = (
        (r"position_ids$", None),  # a non-persistent buffer some older files still carry
        # transformers 5 saves a bare CLIPTextModel without the `text_model.` prefix.
        (r"^(embeddings|encoder|final_layer_norm)\.", r"text_model.\1."),
    )

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        self.runner = BlockRunner()

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B] index of the token whose state is pooled (see `CLIPTextConfig`)."""
        if self.cfg.eos_token_id == 2:
            return input_ids.argmax(dim=-1)
        # argmax returns the first maximum: the first EOS (padding may repeat the EOS id).
        return (input_ids == self.cfg.eos_token_id).int().argmax(dim=-1)

    def forward(self, input_ids: torch.Tensor) -> CLIPTextOutput:
        """input_ids [B, L] int64, L <= max_position_embeddings (FLUX: 77, padded with EOS) -> CLIPTextOutput.

        No padding mask, as FLUX calls it: the causal mask already keeps every real token from seeing the
        padding after it.
        """
        tm = self.text_model
        x = tm.embeddings(input_ids)  # [B, L, D]
        x = tm.final_layer_norm(self.runner(tm.encoder.layers, x))
        pooled = x[torch.arange(x.shape[0], device=x.device), self.eos_positions(input_ids).to(x.device)]
        return CLIPTextOutput(x, pooled)
