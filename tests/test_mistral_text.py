"""FLUX.2's text stack against transformers 5.24.0 / diffusers 0.42.1 on identical weights: the Mistral
language model's stacked hidden states (Flux2Pipeline's prompt embeddings) from a tiny
Mistral3ForConditionalGeneration saved with `save_pretrained` and loaded by the real loader, and the prompt
tokenizer's ids against `apply_chat_template` of a reference tokenizer carrying Mistral-Small-3.1's template.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_mistral import (
    CHAT_TEMPLATE,
    TEXT_CONFIG,
    VOCAB_SIZE,
    make_mistral3,
    make_reference_tokenizer,
    save_tokenizer,
)

from dit_rt import loaders
from dit_rt.models.text.mistral import (
    SYSTEM_MESSAGE,
    Flux2PromptTokenizer,
    MistralTextConfig,
    MistralTextEncoder,
    build_from_folder,
)

CPU, F32 = torch.device("cpu"), torch.float32
L = 24  # sequence length of the encoder tests


def _load(folder: Path, output_layers=None, **kw) -> tuple[MistralTextEncoder, loaders.LoadReport]:
    """Build on meta (as the component loader does) and stream the folder's weights in."""
    with torch.device("meta"):
        if output_layers is None:
            model = build_from_folder(folder)
        else:
            cfg = MistralTextConfig.from_config(loaders.read_config(folder), output_layers=output_layers)
            model = MistralTextEncoder(cfg)
    report = loaders.load_weights(model, folder, device=CPU, dtype=F32, **kw)
    return model.eval().requires_grad_(False), report


def _reference_embeds(ref, ids, mask, layers=(10, 20, 30)) -> torch.Tensor:
    """The hidden states `layers` of the reference, stacked as Flux2Pipeline stacks them."""
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    h = torch.stack([out.hidden_states[k] for k in layers], dim=1)  # [B, k, L, D]
    B, k, n, D = h.shape
    return h.permute(0, 2, 1, 3).reshape(B, n, k * D)


def _inputs(padding_side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows: one full, one with 9 padding positions on `padding_side` (their ids are real tokens, so a
    mask that leaks would show)."""
    ids = torch.randint(0, VOCAB_SIZE, (2, L), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, L - 9 :] = 0 if padding_side == "right" else 1
    mask[1, :9] = 0 if padding_side == "left" else 1
    return ids, mask


@pytest.fixture(scope="module")
def mistral3(tmp_path_factory):
    """(reference model, its saved `text_encoder/` folder)."""
    ref = make_mistral3()
    folder = tmp_path_factory.mktemp("flux2") / "text_encoder"
    ref.save_pretrained(str(folder))
    return ref, folder


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_encoder_matches_transformers(mistral3, padding_side):
    """Hidden states 10, 20, 30 of a 32-layer model, stacked per token; with right padding and with left
    padding (whose padded queries see no key at all)."""
    ref, folder = mistral3
    ours, _ = _load(folder)
    ids, mask = _inputs(padding_side)
    want = _reference_embeds(ref, ids, mask)
    with torch.no_grad():
        got = ours(ids, mask)
    assert got.shape == (2, L, 3 * TEXT_CONFIG["hidden_size"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unused_parts_are_neither_built_nor_loaded(mistral3):
    """Only layers 0-29 and the embedding exist; layers 30-31, the final norm and the vision tower and
    projector are skipped at load by name, without error. Keys are transformers 5.24's layout."""
    _, folder = mistral3
    keys = set(load_file(str(folder / "model.safetensors")))
    assert "language_model.model.layers.31.mlp.up_proj.weight" in keys
    ours, report = _load(folder)
    assert len(ours.language_model.model.layers) == 30 and ours.language_model.model.norm is None
    ignored = set(report.ignored)
    assert {
        "language_model.model.norm.weight",
        "language_model.model.layers.30.self_attn.q_proj.weight",
    } <= ignored
    assert any(k.startswith("vision_tower.") for k in ignored)
    assert any(k.startswith("multi_modal_projector.") for k in ignored)
    assert not any(".layers.29." in k or "embed_tokens" in k for k in ignored)
    names = {n for n, _ in ours.named_parameters()}
    assert "language_model.model.layers.0.self_attn.qkv_proj.weight" in names
    assert "language_model.model.embed_tokens.weight" in names


@pytest.mark.parametrize(
    "layout", ["model.language_model.", "model.", ""], ids=["tf4-mistral3", "causal-lm", "bare"]
)
def test_other_key_layouts_load(mistral3, tmp_path, layout):
    """The same weights under transformers 4.5x's Mistral3 prefix (with an untied `lm_head`), a
    MistralForCausalLM's and a bare MistralModel's: all map onto the same modules."""
    ref, folder = mistral3
    sd = load_file(str(folder / "model.safetensors"))
    out = {}
    for k, v in sd.items():
        if k.startswith("language_model.model."):
            out[layout + k.removeprefix("language_model.model.")] = v
        elif layout == "model.language_model.":
            out[k] = v
    if layout != "":
        out["lm_head.weight"] = torch.zeros(VOCAB_SIZE, TEXT_CONFIG["hidden_size"])
    moved = tmp_path / "text_encoder"
    moved.mkdir()
    save_file(out, str(moved / "model.safetensors"))
    (moved / "config.json").write_text((folder / "config.json").read_text())
    ours, _ = _load(moved)
    ids, mask = _inputs("right")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask), _reference_embeds(ref, ids, mask), rtol=1e-5, atol=1e-5)


def test_embeddings_and_final_norm_layers(mistral3):
    """Index 0 (the token embedding) and the last index (transformers' final-norm output) as outputs: the
    final norm is then built and loaded, and every layer runs."""
    ref, folder = mistral3
    layers = (0, 7, TEXT_CONFIG["num_hidden_layers"])
    ours, _ = _load(folder, output_layers=layers)
    assert ours.language_model.model.norm is not None and len(ours.language_model.model.layers) == 32
    ids, mask = _inputs("right")
    with torch.no_grad():
        got = ours(ids, mask)
    torch.testing.assert_close(got, _reference_embeds(ref, ids, mask, layers), rtol=1e-5, atol=1e-5)


def test_sliding_window_plain_mistral(tmp_path):
    """A MistralForCausalLM folder (plain MistralConfig, `model.` keys) with a sliding window shorter than
    the sequence."""
    from transformers import MistralConfig, MistralForCausalLM

    from dit_rt.demo import randomize

    text = {**TEXT_CONFIG, "num_hidden_layers": 3, "sliding_window": 5, "vocab_size": VOCAB_SIZE}
    text.pop("model_type")
    ref = randomize(MistralForCausalLM(MistralConfig(**text)).eval(), seed=5, std=0.1)
    ref.save_pretrained(str(tmp_path / "text_encoder"))
    ours, _ = _load(tmp_path / "text_encoder", output_layers=(1, 2))
    assert ours.cfg.sliding_window == 5
    ids, mask = _inputs("right")
    with torch.no_grad():
        got = ours(ids, mask)
    torch.testing.assert_close(got, _reference_embeds(ref, ids, mask, (1, 2)), rtol=1e-5, atol=1e-5)


def test_fp8_per_tensor_quantizes_at_load(mistral3):
    """`linear_format="fp8-per-tensor"` converts every projection as it loads (emulated on the CPU), and the
    output stays within fp8's error of the reference. Checked after two layers: 30 layers of random tiny
    weights amplify any perturbation, fp8's included, so a deep comparison would say little."""
    from dit_rt.ops import Linear

    ref, folder = mistral3
    for layers, count in (((10, 20, 30), 30), ((1, 2), 2)):
        ours, _ = _load(folder, output_layers=layers, linear_format="fp8-per-tensor")
        linears = [m for m in ours.modules() if isinstance(m, Linear)]
        assert len(linears) == 4 * count
        assert all(m.fmt == "fp8-per-tensor" and m.weight is None for m in linears)
    ids, mask = _inputs("right")
    want = _reference_embeds(ref, ids, mask, layers)
    with torch.no_grad():
        got = ours(ids, mask)
    rel = (got - want).norm() / want.norm()
    # e4m3 keeps 3 mantissa bits (~3% per rounding), weights and activations both: ~7% here, as for FLUX.1.
    assert 1e-3 < rel < 0.15, rel  # quantized (not a silent full-precision fallback), yet close


def test_config_from_hub_dicts():
    """Mistral-Small-3.2's text_config as older transformers wrote it (top-level rope_theta, null
    head_dim-free fields); transformers 5's rope_parameters; scaled RoPE is refused by name."""
    hub = {
        "model_type": "mistral3",
        "text_config": {
            "model_type": "mistral",
            "hidden_size": 5120,
            "intermediate_size": 32768,
            "num_hidden_layers": 40,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1000000000.0,
            "sliding_window": None,
            "vocab_size": 131072,
        },
    }
    cfg = MistralTextConfig.from_config(hub)
    assert cfg == MistralTextConfig() and cfg.layers_built == 30 and not cfg.uses_final_norm
    tf5 = {**hub["text_config"], "rope_parameters": {"rope_type": "default", "rope_theta": 5.0}}
    del tf5["rope_theta"]
    assert MistralTextConfig.from_config(tf5).rope_theta == 5.0
    yarn = {**tf5, "rope_parameters": {"rope_type": "yarn", "rope_theta": 5.0, "factor": 4.0}}
    with pytest.raises(NotImplementedError, match="yarn"):
        MistralTextConfig.from_config(yarn)
    with pytest.raises(ValueError, match="output_layers"):
        MistralTextConfig.from_config(hub, output_layers=(10, 41))


# ------------------------------------------------------------------------------------------------ tokenizer

PROMPTS = [
    "a cat and a dog baking a cake in the kitchen, photo, 35mm",
    "",
    "Un chat et un chien préparent un gâteau. 猫と犬がケーキを焼いている。Кошка 🐱🎂 naïve",
    "  leading spaces,\ttabs\nand\r\nnew lines  ",
    "literal special tokens: [IMG] removed, [INST] and </s> and <pad> kept as the reference tokenizes them",
    "golden hour light " * 200,  # truncated at 512
]


@pytest.fixture(scope="module", params=["right", "left"])
def reference_tokenizer(request):
    return make_reference_tokenizer(padding_side=request.param)


def _reference_ids(tokenizer, prompts, max_length):
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    out = tokenizer.apply_chat_template(
        format_input(prompts=prompts),  # diffusers' own SYSTEM_MESSAGE
        add_generation_prompt=False,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=max_length,
    )
    return out["input_ids"], out["attention_mask"]


@pytest.mark.parametrize("layout", ["tokenizer", "processor"])
@pytest.mark.parametrize("max_length", [512, 40], ids=["512", "system-message-cut"])
def test_token_ids_match_apply_chat_template(reference_tokenizer, tmp_path, layout, max_length):
    """Ids and mask identical to the reference's on unicode, whitespace, special-token text, empty and
    over-long prompts, both padding sides, from a tokenizer folder and from a processor folder."""
    folder = save_tokenizer(reference_tokenizer, tmp_path / "tokenizer", layout)
    ours = Flux2PromptTokenizer.from_folder(folder)
    assert ours.padding_side == reference_tokenizer.padding_side
    want_ids, want_mask = _reference_ids(reference_tokenizer, PROMPTS, max_length)
    got_ids, got_mask = ours.encode(PROMPTS, max_length)
    assert got_ids.dtype == got_mask.dtype == torch.long
    assert torch.equal(got_ids, want_ids)
    assert torch.equal(got_mask, want_mask)
    assert int(got_mask[-1].sum()) == max_length  # the long prompt is cut


def test_llama_declared_tokenizer_matches_autotokenizer(tmp_path):
    """Mistral's configs declare `LlamaTokenizerFast` and no padding side: transformers 5.24's AutoTokenizer
    then loads the byte-level tokenizer.json unchanged with right padding, and so does dit_rt."""
    from transformers import AutoTokenizer

    folder = save_tokenizer(make_reference_tokenizer(), tmp_path / "tokenizer")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("padding_side")
    config["tokenizer_class"] = "LlamaTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    reference = AutoTokenizer.from_pretrained(str(folder))
    assert reference.padding_side == "right"
    want_ids, want_mask = _reference_ids(reference, PROMPTS, 512)
    got_ids, got_mask = Flux2PromptTokenizer.from_folder(folder).encode(PROMPTS)
    assert torch.equal(got_ids, want_ids) and torch.equal(got_mask, want_mask)


def test_rendering_matches_the_template():
    """The Python rendering equals the Jinja template's text for a prompt holding "[IMG]", and the system
    message is diffusers' byte for byte."""
    from diffusers.pipelines.flux2 import system_messages
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    assert SYSTEM_MESSAGE == system_messages.SYSTEM_MESSAGE
    ref = make_reference_tokenizer()

    prompt = "a [IMG] cat"
    want = ref.apply_chat_template(format_input([prompt]), add_generation_prompt=False, tokenize=False)[0]
    assert Flux2PromptTokenizer(ref.backend_tokenizer).render(prompt) == want


def test_foreign_chat_template_is_refused(tmp_path):
    """A folder whose template is not the Mistral-Small form is an error, not silently different ids."""
    folder = save_tokenizer(make_reference_tokenizer(), tmp_path / "tokenizer")
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    with pytest.raises(ValueError, match="SYSTEM_PROMPT"):
        Flux2PromptTokenizer.from_folder(folder)
    assert "[SYSTEM_PROMPT]" in CHAT_TEMPLATE


def test_prompt_embeds_match_flux2_pipeline(mistral3, tmp_path):
    """End to end at max_sequence_length 512: Flux2Pipeline._get_mistral_3_small_prompt_embeds with the
    reference model and tokenizer vs dit_rt's tokenizer + encoder from the saved folders."""
    from diffusers import Flux2Pipeline

    ref, folder = mistral3
    ref_tok = make_reference_tokenizer()
    prompts = ["a cat and a dog baking a cake", ""]
    with torch.no_grad():
        want = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
            text_encoder=ref, tokenizer=ref_tok, prompt=prompts, dtype=F32, device=CPU
        )
    tok = Flux2PromptTokenizer.from_folder(save_tokenizer(ref_tok, tmp_path / "tokenizer", "processor"))
    encoder, _ = _load(folder)
    ids, mask = tok.encode(prompts)
    with torch.no_grad():
        got = encoder(ids, mask)
    assert got.shape == want.shape == (2, 512, 3 * TEXT_CONFIG["hidden_size"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_config_json_roundtrip(mistral3):
    """The saved config.json (transformers 5.24: rope_parameters) reads back as the tiny configuration."""
    _, folder = mistral3
    cfg = MistralTextConfig.from_config(json.loads((folder / "config.json").read_text()))
    assert (cfg.hidden_size, cfg.head_dim, cfg.num_key_value_heads, cfg.rope_theta) == (32, 16, 2, 1e9)
    assert cfg.num_hidden_layers == 32 and cfg.sliding_window is None
