"""FLUX.2's text stack: the Mistral-Small-3.x language model as Flux2Pipeline runs it, and its tokenizer.

Encoder. Flux2Pipeline conditions on the hidden states of decoder layers 10, 20 and 30 (1-based: index 0 of
transformers' `hidden_states` is the token embedding, index k the output of layer k, and the last index the
final-norm output), concatenated per token into 3 x hidden features (15,360 for the 24B model). Only the
layers up to the deepest requested one are built, loaded and run: 30 of Mistral-Small's 40, and neither the
final norm (unless the last index is requested), `lm_head` nor the Pixtral vision tower and projector. Their
checkpoint keys are dropped by `ckpt_key_map`, which also maps the other key layouts (`model.language_model.`
of transformers 4.5x, a bare `MistralForCausalLM` / `MistralModel`) onto the module names, which equal the
keys transformers 5.24 writes for `Mistral3ForConditionalGeneration` (`language_model.model.layers.N...`).

The projections are `dit_rt.ops` Linears (q | k | v and gate | up fused, loaded from the separate checkpoint
projections), so `linear="fp8-per-tensor"` etc. quantize the encoder at load like the transformer. Attention
runs through `F.scaled_dot_product_attention` with a boolean causal + padding mask rather than the
`dit_rt.ops` seam, whose (q, k, v, scale) contract has no mask; the encoder runs once per prompt. The layers
form one block stack (`stacks`), so block offload streams them like a transformer's blocks.

Tokenizer. The processor's Jinja chat template, for Flux2Pipeline's two-message chat (the system message,
then the prompt as a user message) and `add_generation_prompt=False`, renders
`<s>[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT][INST]{prompt}[/INST]`; `Flux2PromptTokenizer` writes that string
in Python and encodes it with `tokenizer.json` as transformers does for a chat (special tokens come from the
text, none are added), then truncates and pads to 512 as `padding="max_length", truncation=True` does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from dit_rt.contract import BlockStack
from dit_rt.ops import Linear
from dit_rt.runner import BlockRunner

log = logging.getLogger("dit_rt")

# Flux2Pipeline's default `text_encoder_out_layers`: indices into transformers' hidden_states tuple.
FLUX2_OUTPUT_LAYERS = (10, 20, 30)


@dataclass(frozen=True)
class MistralTextConfig:
    """The Mistral language model's hyper-parameters, named as in `text_config` of the Hub
    `text_encoder/config.json`; defaults are Mistral-Small-3.x 24B. `output_layers` are the hidden-state
    indices the encoder returns (not a config.json key)."""

    vocab_size: int = 131072
    hidden_size: int = 5120
    intermediate_size: int = 32768
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e9
    sliding_window: int | None = None
    hidden_act: str = "silu"
    output_layers: tuple[int, ...] = FLUX2_OUTPUT_LAYERS

    def __post_init__(self):
        object.__setattr__(self, "output_layers", tuple(self.output_layers))
        bad = [k for k in self.output_layers if not 0 <= k <= self.num_hidden_layers]
        if bad or not self.output_layers:
            raise ValueError(
                f"output_layers {self.output_layers}: hidden-state indices lie in 0..{self.num_hidden_layers}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r}: the Mistral MLP here is SwiGLU (silu)")

    @property
    def layers_built(self) -> int:
        """Decoder layers that run: up to the deepest requested hidden state."""
        return max(self.output_layers)

    @property
    def uses_final_norm(self) -> bool:
        # transformers replaces the last hidden state by the final-norm output.
        return self.num_hidden_layers in self.output_layers

    @classmethod
    def from_config(
        cls, config: dict, output_layers: tuple[int, ...] = FLUX2_OUTPUT_LAYERS
    ) -> MistralTextConfig:
        """Read a `Mistral3Config` dict (its `text_config` is the language model) or a plain `MistralConfig`.

        transformers 5 writes RoPE as `rope_parameters`; older configs as a top-level `rope_theta` with an
        optional `rope_scaling`. Only plain RoPE is supported (Mistral-Small-3.x uses no scaling).
        """
        text = config.get("text_config") or config
        model_type = text.get("model_type", "mistral")
        if model_type != "mistral":
            raise ValueError(f"text encoder model_type {model_type!r}: expected 'mistral' (or 'mistral3')")
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise NotImplementedError(f"text encoder rope_type {rope_type!r}: only plain RoPE is implemented")
        # Without a rope theta a Mistral3 config gets transformers' Mistral-Small default, a bare Mistral 1e4.
        theta_default = cls.rope_theta if text is not config else 10000.0
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_theta", "head_dim", "output_layers"}
        kwargs = {k: text[k] for k in names if text.get(k) is not None}
        heads = kwargs.get("num_attention_heads", cls.num_attention_heads)
        head_dim = text.get("head_dim") or kwargs.get("hidden_size", cls.hidden_size) // heads
        theta = rope.get("rope_theta", text.get("rope_theta", theta_default))
        return cls(**kwargs, head_dim=head_dim, rope_theta=float(theta), output_layers=tuple(output_layers))


# Named presets. Hub configs remain the source of truth when a folder is loaded.
PRESETS = {"mistral-small-3.2-24b": MistralTextConfig()}


class RMSNorm(nn.Module):
    """Mistral's RMSNorm: normalised in fp32, cast back to the input dtype, then scaled (reference order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(cfg: MistralTextConfig, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, head_dim] for positions 0..L-1 in the rotate-half layout (each frequency twice, halves
    side by side). Angles are fp32; the tables take the activations' dtype, as the reference's do."""
    d = cfg.head_dim
    # Frequencies are computed on the CPU in fp32, as the reference builds its buffer.
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    pos = torch.arange(length, device=device, dtype=torch.float32)
    angles = pos[:, None] * inv_freq.to(device)[None, :]  # [L, d/2]
    angles = torch.cat([angles, angles], dim=-1)  # [L, d]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D]: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class SelfAttention(nn.Module):
    """`self_attn`: GQA with RoPE; q | k | v fused in one Linear loaded from `q_proj`, `k_proj`, `v_proj`."""

    def __init__(self, cfg: MistralTextConfig):
        super().__init__()
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv_proj = Linear(
            cfg.hidden_size,
            q_dim + 2 * kv_dim,
            bias=False,
            sources=("q_proj", "k_proj", "v_proj"),
            splits=(q_dim, kv_dim, kv_dim),
        )
        self.o_proj = Linear(q_dim, cfg.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        B, L, _ = x.shape
        H, G, D = self.heads, self.kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split((H * D, G * D, G * D), dim=-1)
        q = q.view(B, L, H, D).transpose(1, 2)  # [B, H, L, D]
        k = k.view(B, L, G, D).transpose(1, 2)  # [B, G, L, D]
        v = v.view(B, L, G, D).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        # Each key/value head serves H / G query heads (adjacent query heads share one).
        k = k.repeat_interleave(H // G, dim=1)  # [B, H, L, D]
        v = v.repeat_interleave(H // G, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, L, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, L, H * D))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x), gate | up fused in one Linear loaded from `gate_proj`, `up_proj`."""

    def __init__(self, cfg: MistralTextConfig):
        super().__init__()
        n = cfg.intermediate_size
        self.gate_up_proj = Linear(
            cfg.hidden_size, 2 * n, bias=False, sources=("gate_proj", "up_proj"), splits=(n, n)
        )
        self.down_proj = Linear(n, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # 2 x [B, L, intermediate]
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP, each with a residual."""

    def __init__(self, cfg: MistralTextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), mask, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class MistralModel(nn.Module):
    """`language_model.model.*`: token embedding, the decoder layers that run, and the final norm if used."""

    def __init__(self, cfg: MistralTextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.layers_built)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if cfg.uses_final_norm else None


class LanguageModel(nn.Module):
    """`language_model.*` (the Mistral3 checkpoint's causal LM; its `lm_head` is not built)."""

    def __init__(self, cfg: MistralTextConfig):
        super().__init__()
        self.model = MistralModel(cfg)


_PREFIXES = r"(?:language_model\.model\.|model\.language_model\.|model\.)?"


def _key_map(cfg: MistralTextConfig) -> tuple[tuple[str, str | None], ...]:
    """Checkpoint key -> module name; None drops the parts Flux2Pipeline never runs. First match wins."""
    rules: list[tuple[str, str | None]] = [
        (r"^(?:model\.)?(?:vision_tower|multi_modal_projector)\.", None),
        (r"(?:^|\.)lm_head\.", None),
    ]
    unused = range(cfg.layers_built, cfg.num_hidden_layers)
    if unused:
        rules.append((rf"^{_PREFIXES}layers\.(?:{'|'.join(map(str, unused))})\.", None))
    if not cfg.uses_final_norm:
        rules.append((rf"^{_PREFIXES}norm\.weight$", None))
    rules += [
        (r"^model\.language_model\.", "language_model.model."),  # transformers 4.5x Mistral3
        (r"^model\.", "language_model.model."),  # MistralForCausalLM
        (r"^(embed_tokens|layers|norm)\.", r"language_model.model.\1."),  # MistralModel
    ]
    return tuple(rules)


class MistralTextEncoder(nn.Module):
    """Token ids -> Flux2Pipeline's prompt embeddings: the hidden states `output_layers` side by side."""

    stacks = (BlockStack("language_model.model.layers", carry=("x",), args=("mask", "cos", "sin")),)

    def __init__(self, cfg: MistralTextConfig):
        super().__init__()
        self.cfg = cfg
        self.output_layers = cfg.output_layers
        self.language_model = LanguageModel(cfg)
        self.runner = BlockRunner()
        self.ckpt_key_map = _key_map(cfg)  # depends on how many layers are built

    def attention_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] (1 = token) -> [B, 1, L, L] bool: causal, padding keys hidden, and the sliding window if
        the config has one. A query with no visible key (a left-padding row) gets zeros from SDPA."""
        L = attention_mask.shape[1]
        pos = torch.arange(L, device=attention_mask.device)
        visible = pos[None, :] <= pos[:, None]  # [Lq, Lk]
        if self.cfg.sliding_window is not None:
            visible = visible & (pos[:, None] - pos[None, :] < self.cfg.sliding_window)
        return visible[None, None] & (attention_mask[:, None, None, :] > 0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, L] int64, attention_mask [B, L] (1 = token, 0 = padding) -> [B, L, k * hidden], k =
        len(output_layers): per token, hidden state output_layers[0], then [1], ... (Flux2Pipeline's stack).

        Positions are 0..L-1 whatever the padding, and padded positions keep their values, as in the
        reference (the FLUX.2 transformer reads all of them).
        """
        B, L = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lm = self.language_model.model
        x = lm.embed_tokens(input_ids)  # [B, L, hidden]
        mask = self.attention_mask(attention_mask.to(x.device))
        cos, sin = rope_tables(self.cfg, L, x.device, x.dtype)  # [L, head_dim]
        states = {0: x}
        done = 0
        # The layers run in segments between the requested states; `run` keeps the block hooks (offload) and
        # skips only the stack hook, a step cache, which a once-per-prompt encoder never has.
        for k in sorted(set(self.output_layers) - {0}):
            x = self.runner.run(lm.layers, x, (mask, cos, sin), start=done, stop=k)
            done = k
            states[k] = lm.norm(x) if k == self.cfg.num_hidden_layers else x
        return torch.stack([states[k] for k in self.output_layers], dim=2).reshape(B, L, -1)

    def flops(self, batch: int, length: int) -> int:
        """Matmul and attention FLOPs of one forward over [batch, length] tokens (attention counted over the
        full L x L scores, as the masked kernel computes them)."""
        c = self.cfg
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        weights = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
        per_layer = 2 * batch * length * weights + 4 * batch * c.num_attention_heads * length**2 * c.head_dim
        return c.layers_built * per_layer


def build_from_folder(folder: Path) -> MistralTextEncoder:
    """The encoder for a Hub `text_encoder/` folder (Mistral3ForConditionalGeneration or a bare Mistral
    config), built on the current device (the component loader builds it on `meta`)."""
    from dit_rt import loaders

    return MistralTextEncoder(MistralTextConfig.from_config(loaders.read_config(folder)))


# ------------------------------------------------------------------------------------------------ tokenizer

# Flux2Pipeline's system message (diffusers `pipelines/flux2/system_messages.py`, from BFL's flux2 repo):
# model input, so it must match byte for byte, line break included.
SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation."
)

# Markers the re-implemented rendering relies on; a chat template without them is a different format.
_TEMPLATE_MARKERS = ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]", "bos_token")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value) -> str | None:
    return value["content"] if isinstance(value, dict) else value  # older configs store AddedToken dicts


def find_chat_template(folder: Path) -> str | None:
    """The chat template saved in a tokenizer or processor folder, wherever transformers put it: a
    `chat_template.jinja` file, `chat_template.json`, or a `chat_template` entry of `tokenizer_config.json`
    / `processor_config.json` (a string, or a list of named templates whose "default" is used)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        template = _read_json(folder / name).get("chat_template")
        if isinstance(template, list):
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template:
            return template
    return None


class Flux2PromptTokenizer:
    """Encodes prompts as Flux2Pipeline does: `apply_chat_template` on [system, user] messages with
    `add_generation_prompt=False, padding="max_length", truncation=True, max_length=512`."""

    default_max_length = 512

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_token: str = "<s>",
        pad_token: str = "<pad>",
        padding_side: str = "right",
        truncation_side: str = "right",
        system_message: str = SYSTEM_MESSAGE,
    ):
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("right", "left"):
                raise ValueError(f"{name} {side!r}: expected 'right' or 'left'")
        for token in (bos_token, pad_token):
            if tokenizer.token_to_id(token) is None:
                raise ValueError(f"tokenizer has no token {token!r}")
        self.tokenizer, self.bos_token, self.pad_token = tokenizer, bos_token, pad_token
        self.pad_id = tokenizer.token_to_id(pad_token)
        self.padding_side, self.truncation_side = padding_side, truncation_side
        self.system_message = system_message

    @classmethod
    def from_folder(cls, folder: str | Path) -> Flux2PromptTokenizer:
        """Load `folder/tokenizer.json` (the Hub `tokenizer/` folder: processor files or tokenizer files).

        bos / pad tokens and padding / truncation sides come from `tokenizer_config.json` (then
        `special_tokens_map.json`), defaulting to right as transformers 5.24 does here: a byte-level
        tokenizer.json declared `LlamaTokenizerFast` (Mistral's configs) loads as its generic tokenizer
        class, not the Llama class (left padding, Metaspace), and no other setting of the file is changed
        (no Mistral regex patch: the Hub `tokenizer/` folder has no config.json naming a Mistral model). A
        chat template, if the folder has one, must be the Mistral-Small form this class renders.
        """
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: dit_rt needs the fast-tokenizer file")
        template = find_chat_template(folder)
        if template is not None and not all(m in template for m in _TEMPLATE_MARKERS):
            missing = [m for m in _TEMPLATE_MARKERS if m not in template]
            raise ValueError(
                f"{folder}: the chat template lacks {missing}; dit_rt renders FLUX.2's Mistral-Small "
                "template only (<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST])"
            )
        config = _read_json(folder / "special_tokens_map.json") | _read_json(folder / "tokenizer_config.json")
        return cls(
            Tokenizer.from_file(str(path)),
            bos_token=_token_text(config.get("bos_token", "<s>")),
            pad_token=_token_text(config.get("pad_token", "<pad>")),
            padding_side=config.get("padding_side", "right"),
            truncation_side=config.get("truncation_side", "right"),
        )

    def render(self, prompt: str) -> str:
        """The chat template's text for one prompt (literal "[IMG]" removed first, as Flux2Pipeline does)."""
        prompt = prompt.replace("[IMG]", "")
        return f"{self.bos_token}[SYSTEM_PROMPT]{self.system_message}[/SYSTEM_PROMPT][INST]{prompt}[/INST]"

    def encode(self, prompts: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input_ids [B, max_length] int64, attention_mask [B, max_length] int64 (1 = token)."""
        max_length = max_length or self.default_max_length
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        encodings = self.tokenizer.encode_batch([self.render(p) for p in prompts], add_special_tokens=False)
        ids = torch.full((len(prompts), max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), max_length), dtype=torch.long)
        cut = []
        for row, e in enumerate(encodings):
            tokens = e.ids
            if len(tokens) > max_length:
                cut.append((row, len(tokens)))
                tokens = tokens[:max_length] if self.truncation_side == "right" else tokens[-max_length:]
            n = len(tokens)
            span = slice(0, n) if self.padding_side == "right" else slice(max_length - n, max_length)
            ids[row, span] = torch.tensor(tokens, dtype=torch.long)
            mask[row, span] = 1
        if cut:  # said once per call: a silently dropped end of a prompt misleads
            which = (lambda i: "the prompt") if len(prompts) == 1 else (lambda i: f"prompt {i}")
            log.warning(
                "%s (the text encoder reads max_sequence_length=%d tokens, system message included)",
                "; ".join(f"{which(i)} has {n} tokens, the last {n - max_length} dropped" for i, n in cut),
                max_length,
            )
        return ids, mask
