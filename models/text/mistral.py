"""FLUX.2's text stack: the Mistral-Small-3.x language model as Flux2Pipeline runs it, and its tokenizer.

Encoder. Flux2Pipeline conditions on the hidden states of decoder layers 10, 20 and 30 (1-based: index 0 of
transformers' `hidden_states` is the token embedding, index k the output of layer k, and the last index the
final-norm output), concatenated per token into 3 x hidden features (15,360 for the 24B model). Only the
layers up to the deepest requested one are built, loaded and run: 30 of Mistral-Small's 40, and neither the
final norm (unless the last index is requested), `lm_head` nor the Pixtral vision tower and projector. Their
checkpoint keys are dropped by `ckpt_key_map`, which also maps the other key layouts (`model.language_model.`
of transformers 4.5x, a bare `MistralForCausalLM` / `MistralModel`) onto the module names, which equal the
keys transformers 5.24 writes for `Mistral3ForConditionalGeneration` (`language_model.model.layers.N...`).

The decoder layers are models/text/decoder.py's (shared with Qwen2.5-VL): `dit_rt.ops` Linears, so
`linear="fp8-per-tensor"` etc. quantize the encoder at load like the transformer, and SDPA with a boolean
causal + padding mask. The layers form one block stack (`stacks`), so block offload streams them like a
transformer's blocks.

Tokenizer. The processor's Jinja chat template, for Flux2Pipeline's two-message chat (the system message,
then the prompt as a user message) and `add_generation_prompt=False`, renders
`<s>[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT][INST]{prompt}[/INST]`; `Flux2PromptTokenizer` writes that string
in Python and encodes it with `tokenizer.json` as transformers does for a chat (special tokens come from the
text, none are added), then truncates and pads to 512 as `padding="max_length", truncation=True` does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from dit_rt.contract import BlockStack
from dit_rt.models.text.decoder import DecoderLayer, RMSNorm, rope_tables, unbuilt_parts
from dit_rt.models.text.tokenizer import _PaddedTokenizer, _read_json, _token_text
from dit_rt.runner import BlockRunner

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
    rules: list[tuple[str, str | None]] = [*unbuilt_parts("vision_tower", "multi_modal_projector")]
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

    stacks = (BlockStack("language_model.model.layers", carry=("x",), args=("cos", "sin", "mask")),)

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
            x = self.runner.run(lm.layers, x, (cos, sin, mask), start=done, stop=k)
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


class Flux2PromptTokenizer(_PaddedTokenizer):
    """Encodes prompts as Flux2Pipeline does: `apply_chat_template` on [system, user] messages with
    `add_generation_prompt=False, padding="max_length", truncation=True, max_length=512`."""

    default_max_length = 512
    special_tokens = False  # the template writes `<s>`
    counted = ", system message included"

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
        if tokenizer.token_to_id(bos_token) is None:
            raise ValueError(f"tokenizer has no token {bos_token!r}")
        super().__init__(tokenizer, pad_token, padding_side, truncation_side)
        self.bos_token, self.system_message = bos_token, system_message

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

    def texts(self, prompts: list[str]) -> list[str]:
        return [self.render(p) for p in prompts]
