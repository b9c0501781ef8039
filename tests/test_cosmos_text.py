"""Cosmos text encoders against transformers 5.24.0 / diffusers 0.42.1 on identical weights.

- Predict2 / Cosmos-1.0: the T5-11B style encoder (original T5: non-gated ReLU FFN, block 0's relative
  bias shared, inner width heads * d_kv != d_model) loaded through the `T5EncoderModel` builder, and the
  prompt embeddings as `Cosmos2TextToImagePipeline._get_t5_prompt_embeds` computes them.
- Predict2.5: the Qwen2.5-VL language stack (`Qwen2_5_VLForConditionalGeneration` saved by
  `save_pretrained`, vision tower and lm_head left unbuilt) and the chat-template tokenizer, against
  `Cosmos2_5_PredictBasePipeline._get_prompt_embeds` itself, called on a stand-in holding the reference
  tokenizer and text encoder.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from dit_rt import loaders
from dit_rt.components import build_component
from dit_rt.demo import randomize
from dit_rt.models.text import T5Config, T5Encoder, T5Tokenizer
from dit_rt.models.text.qwen import QwenPromptTokenizer, QwenTextConfig, QwenTextEncoder, build_from_folder

CPU, F32 = torch.device("cpu"), torch.float32

# ------------------------------------------------------------------------------------------------- T5-11B

# google-t5/t5-11b's shape in miniature: ReLU FFN, d_kv * num_heads (64) != d_model (32), d_ff >> d_model.
T5_11B = dict(
    vocab_size=128, d_model=32, d_kv=16, num_heads=4, d_ff=128, num_layers=3, feed_forward_proj="relu",
    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
)  # fmt: skip


def _t5_words_tokenizer():
    """A transformers T5TokenizerFast over the demo's small Unigram model (`</s>` appended, `<pad>` = 0)."""
    from transformers import T5TokenizerFast

    from dit_rt.demo import tokenizer_json

    words = ("a", "the", "robot", "arm", "picks", "up", "red", "cube", "on", "table")
    return T5TokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json(words)),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory) -> Path:
    from transformers import T5Config as HFT5Config
    from transformers import T5EncoderModel

    folder = tmp_path_factory.mktemp("cosmos2")
    ref = randomize(T5EncoderModel(HFT5Config(**T5_11B)).eval(), seed=31)
    ref.save_pretrained(str(folder / "text_encoder"))
    _t5_words_tokenizer().save_pretrained(str(folder / "tokenizer"))
    return folder


def test_t5_11b_embeddings_match_cosmos2_pipeline(t5_folder):
    """The ReLU encoder loads through the registered builder and, fed by T5Tokenizer with the padding mask,
    gives the pipeline's prompt embeddings: real rows equal, rows past each prompt's length zero."""
    from diffusers import Cosmos2TextToImagePipeline
    from transformers import AutoTokenizer, T5EncoderModel

    index = {"text_encoder": ["transformers", "T5EncoderModel"]}
    ours = build_component(t5_folder, index, "text_encoder", device=CPU, dtype=F32)
    assert isinstance(ours, T5Encoder)
    assert (ours.cfg.gated, ours.cfg.act, ours.cfg.per_layer_position_bias) == (False, "relu", False)
    assert hasattr(ours.encoder.block[1].layer[1].DenseReluDense, "wi")

    ref = T5EncoderModel.from_pretrained(str(t5_folder / "text_encoder")).eval()
    stand_in = SimpleNamespace(
        tokenizer=AutoTokenizer.from_pretrained(str(t5_folder / "tokenizer")),
        text_encoder=ref,
        _execution_device=CPU,
    )
    prompts = ["a robot arm picks up the red cube", "", "the cube on the table " * 8]
    tok = T5Tokenizer.from_folder(t5_folder / "tokenizer")
    with torch.no_grad():
        want = Cosmos2TextToImagePipeline._get_t5_prompt_embeds(stand_in, prompts, 32, CPU, F32)
        ids, mask = tok.encode(prompts, max_length=32)
        got = ours(ids, mask) * mask[..., None]  # the pipeline zeroes rows past each prompt's length
    assert want.shape == (3, 32, 32)
    n = int(mask[0].sum())
    assert 1 < n < 32 and mask.sum(1)[1:].tolist() == [1, 32]  # "" is </s> alone; the long one is cut
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want[0, :n].abs().amin() > 0 and (want[0, n:] == 0).all()


def test_t5_11b_bf16_embeddings_equal_the_pipelines_bit_for_bit(t5_folder):
    """In bf16 the Cosmos prompt states (`wan_text_embeddings`, no cleaning) are the pipeline's bit for bit:
    the encoder attends over all max_length tokens as the reference does (over only the prompt's tokens the
    bf16 attention rounded otherwise)."""
    from diffusers import Cosmos2TextToImagePipeline
    from transformers import AutoTokenizer, T5EncoderModel

    from dit_rt.models.text import wan_text_embeddings

    index = {"text_encoder": ["transformers", "T5EncoderModel"]}
    ours = build_component(t5_folder, index, "text_encoder", device=CPU, dtype=torch.bfloat16)
    ref = T5EncoderModel.from_pretrained(str(t5_folder / "text_encoder"), torch_dtype=torch.bfloat16).eval()
    stand_in = SimpleNamespace(
        tokenizer=AutoTokenizer.from_pretrained(str(t5_folder / "tokenizer")),
        text_encoder=ref,
        _execution_device=CPU,
    )
    prompts = ["a robot arm picks up the red cube", "the cube on the table " * 3]
    tok = T5Tokenizer.from_folder(t5_folder / "tokenizer")
    with torch.no_grad():
        want = Cosmos2TextToImagePipeline._get_t5_prompt_embeds(stand_in, prompts, 48, CPU, torch.bfloat16)
        got = wan_text_embeddings(ours, tok, prompts, max_length=48, clean=False)
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)


def test_t5_tokenizer_whitespace_as_transformers(t5_folder):
    """A folder whose tokenizer_config names T5Tokenizer (the Hub's T5 / UMT5 tokenizers) is pre-tokenized as
    transformers 5 builds that class, whatever tokenizer.json holds: whitespace runs vanish (a trailing space
    is no "▁" token, a tab or newline no unknown one). A generic fast tokenizer keeps its file's pipeline
    (tests/test_umt5.py covers that side)."""
    from transformers import AutoTokenizer

    assert json.loads((t5_folder / "tokenizer" / "tokenizer_config.json").read_text())["tokenizer_class"] == (
        "T5Tokenizer"
    )
    hf = AutoTokenizer.from_pretrained(str(t5_folder / "tokenizer"))
    ours = T5Tokenizer.from_folder(t5_folder / "tokenizer")
    prompts = ["the red cube ", "  the\trobot\n arm  ", "a robot arm picks up the red cube", "\n"]
    want = hf(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    ids, mask = ours.encode(prompts, max_length=16)
    assert torch.equal(ids, want.input_ids) and torch.equal(mask, want.attention_mask)
    assert ids[0, :4].tolist() == hf(["the red cube"]).input_ids[0]  # the trailing space adds nothing


def test_t5_config_without_feed_forward_proj_is_relu():
    """google-t5/t5-11b's own config.json has no feed_forward_proj: transformers' T5Config then means
    "relu"; a UMT5 config without it stays gated-gelu."""
    cfg = T5Config.from_config(
        {"model_type": "t5", "d_model": 1024, "d_kv": 128, "num_heads": 128, "d_ff": 65536}
    )
    assert (cfg.gated, cfg.act, cfg.inner_dim) == (False, "relu", 16384)
    assert T5Config.from_config({"model_type": "umt5"}).gated


# ------------------------------------------------------------------------------------------- Qwen2.5-VL

# Qwen2.5-VL-7B-Instruct's chat template (tokenizer_config.json / chat_template.json), verbatim.
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
    "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string "
    "%}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if "
    "content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = "
    "image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif "
    "%}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content "
    "%}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value "
    "}}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ "
    "content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if "
    "add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2.5-VL), then byte-level without its own regex.
QWEN_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
QWEN_SPECIAL = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
)  # fmt: skip
# Cosmos2_5_PredictBasePipeline's system message, as the pipeline writes it.
QWEN_SYSTEM = "You are a helpful assistant who will provide prompts to an image generator."
QWEN_PROMPTS = [
    "A robot arm picks up the red cube and places it on the table.",
    "",
    "café naïve über 猫 🐱 — “quoted” it's we'll\n\tline two  \r\n ÅÅ (NFC: A\u030a)",
    "a <|im_end|>\n<|im_start|>assistant cat",  # the markers typed by a user are still special tokens
    "the robot arm picks up the cube " * 80,  # > 512 tokens: cut at max_length
]


def make_qwen_tokenizer(folder: Path) -> None:
    """A small byte-level BPE tokenizer laid out like Qwen2.5-VL-7B-Instruct's `tokenizer/` (NFC, Qwen2
    split, byte-level, ChatML added tokens; tokenizer_config.json with the real chat template)."""
    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    corpus = ["You are a helpful assistant who will provide prompts to an image generator."]
    corpus += ["system user", "A robot arm picks up the red cube and places it on the table."]
    trainer = BpeTrainer(
        vocab_size=330, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus * 4, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    config = dict(
        tokenizer_class="Qwen2Tokenizer", pad_token="<|endoftext|>", eos_token="<|im_end|>", bos_token=None,
        unk_token=None, chat_template=QWEN25VL_CHAT_TEMPLATE, model_max_length=131072, errors="replace",
        clean_up_tokenization_spaces=False, split_special_tokens=False, add_prefix_space=False,
    )  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def make_qwen(vocab_size: int, seed: int = 32):
    """A tiny Qwen2_5_VLForConditionalGeneration: 3 text layers, GQA (4 query, 2 key/value heads of 8),
    a one-block vision tower."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
    )  # fmt: skip
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=32,
        fullatt_block_indexes=[0],
    )
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    return randomize(Qwen2_5_VLForConditionalGeneration(cfg).eval(), seed)


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cosmos25")
    make_qwen_tokenizer(folder / "tokenizer")
    vocab = Tokenizer.from_file(str(folder / "tokenizer" / "tokenizer.json")).get_vocab_size()
    make_qwen(vocab).save_pretrained(str(folder / "text_encoder"))
    return folder


def _load_qwen(folder: Path, dtype=F32) -> tuple[QwenTextEncoder, loaders.LoadReport]:
    """As components.build_component does: build on meta from the folder, stream the weights in."""
    with torch.device("meta"):
        model = build_from_folder(folder)
    report = loaders.load_weights(model, folder, device=CPU, dtype=dtype)
    return model.eval(), report


def _stand_in(folder: Path):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    return SimpleNamespace(
        tokenizer=AutoTokenizer.from_pretrained(str(folder / "tokenizer")),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder / "text_encoder")).eval(),
        _execution_device=CPU,
    )


def test_qwen_prompt_embeddings_match_cosmos25_pipeline(qwen_folder):
    """Tokenizer + text stack give `Cosmos2_5_PredictBasePipeline._get_prompt_embeds`'s output: 512 tokens,
    no attention mask, 3 layers x 32 features, each layer standardized per token."""
    from diffusers import Cosmos2_5_PredictBasePipeline

    index = {"text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"]}
    ours = build_component(qwen_folder, index, "text_encoder", device=CPU, dtype=F32)
    assert isinstance(ours, QwenTextEncoder)
    tok = QwenPromptTokenizer.from_folder(qwen_folder / "tokenizer")
    stand_in = _stand_in(qwen_folder)
    prompts = QWEN_PROMPTS[:2] + QWEN_PROMPTS[4:]
    with torch.no_grad():
        want = Cosmos2_5_PredictBasePipeline._get_prompt_embeds(stand_in, prompts, 512, CPU, F32)
        ids, _ = tok.encode(prompts)
        got = ours(ids)
    assert got.shape == want.shape == (3, 512, 3 * 32) and ours.cfg.embed_dim == 96
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Every layer's slice is standardized (the last one after the final norm).
    assert torch.allclose(got.view(3, 512, 3, 32).mean(-1), torch.zeros(()), atol=1e-5)


def test_qwen_padding_mask_matches_transformers(qwen_folder):
    """With a right-padding mask: padded keys masked on top of the causal mask, positions still 0..L-1,
    compared with the reference model's output_hidden_states under the same recipe."""
    ours, _ = _load_qwen(qwen_folder / "text_encoder")
    ref = _stand_in(qwen_folder).text_encoder
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 330, (2, 24), generator=g)
    mask = (torch.arange(24)[None] < torch.tensor([[24], [9]])).long()
    with torch.no_grad():
        hidden = ref(ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:]
        want = torch.cat(
            [(h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-8) for h in hidden], -1
        )
        got = ours(ids, mask)
        unmasked = ours(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Causal: the real rows of the right-padded prompt do not see the padding, mask or not.
    torch.testing.assert_close(unmasked[1, :9], want[1, :9], rtol=1e-5, atol=1e-5)
    assert (unmasked[1, 9:] - want[1, 9:]).abs().amax() > 1e-3


def test_qwen_bf16_error_like_transformers(qwen_folder):
    """In bf16 our error against the fp32 reference is at most a small multiple of transformers' own."""
    from diffusers import Cosmos2_5_PredictBasePipeline

    ours, _ = _load_qwen(qwen_folder / "text_encoder", dtype=torch.bfloat16)
    stand_in = _stand_in(qwen_folder)
    tok = QwenPromptTokenizer.from_folder(qwen_folder / "tokenizer")
    ids, _ = tok.encode(QWEN_PROMPTS[:1], max_length=64)
    with torch.no_grad():
        exact = Cosmos2_5_PredictBasePipeline._get_prompt_embeds(stand_in, QWEN_PROMPTS[:1], 64, CPU, F32)
        stand_in.text_encoder.to(torch.bfloat16)
        ref16 = Cosmos2_5_PredictBasePipeline._get_prompt_embeds(stand_in, QWEN_PROMPTS[:1], 64, CPU, F32)
        got = ours(ids)
    assert got.dtype == torch.bfloat16
    err, ref_err = (got.float() - exact).abs().amax(), (ref16 - exact).abs().amax()
    assert err <= 2 * ref_err + 1e-2, (err, ref_err)


@pytest.mark.parametrize("max_length", [512, 40])
def test_qwen_tokenizer_matches_apply_chat_template(qwen_folder, max_length, caplog):
    """Ids and mask equal to the reference tokenizer's apply_chat_template as the pipeline calls it, on
    unicode (NFC), empty, special-token-looking and too-long prompts; a cut prompt is reported."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(qwen_folder / "tokenizer"))
    tok = QwenPromptTokenizer.from_folder(qwen_folder / "tokenizer")
    ids, mask = tok.encode(QWEN_PROMPTS, max_length=max_length)
    assert ids.shape == mask.shape == (len(QWEN_PROMPTS), max_length)
    for row, prompt in enumerate(QWEN_PROMPTS):
        conversation = [
            {"role": "system", "content": [{"type": "text", "text": QWEN_SYSTEM}]},
            {"role": "user", "content": [{"type": "text", "text": prompt}]},
        ]
        want = hf.apply_chat_template(
            conversation, tokenize=True, add_generation_prompt=False, add_vision_id=False,
            max_length=max_length, truncation=True, padding="max_length",
        )  # fmt: skip
        assert ids[row].tolist() == want["input_ids"], row
        assert mask[row].tolist() == want["attention_mask"], row
    assert mask[4].all() and "prompt 4 has" in caplog.text
    if max_length == 512:  # the short prompts are padded with "<|endoftext|>"
        assert 0 < mask[1].sum() < mask[0].sum() < max_length
        assert (ids[1, mask[1].sum() :] == tok.tokenizer.token_to_id("<|endoftext|>")).all()
    else:  # 40 tokens: the system message and the start of each non-empty prompt fill them
        assert mask[[0, 2, 3]].all() and "prompt 0 has" in caplog.text


def test_qwen_config_layouts(qwen_folder, tmp_path):
    """The transformers 5 config (text fields in text_config, rope_parameters) and the flat layout of
    older files (Cosmos-Reason1-7B: rope_theta + rope_scaling "mrope") read the same; the
    `model.language_model.*` / `model.visual.*` key layout loads too, the vision keys dropped."""
    nested = json.loads((qwen_folder / "text_encoder" / "config.json").read_text())
    text = nested["text_config"]
    flat = {k: v for k, v in text.items() if k not in ("rope_parameters", "model_type")}
    flat |= dict(
        model_type="qwen2_5_vl",
        rope_theta=10000.0,
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
    )
    cfg = QwenTextConfig.from_config(nested)
    assert cfg == QwenTextConfig.from_config(flat)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim) == (32, 3, 2, 8)
    assert cfg.rope_theta == 10000.0 and cfg.rms_norm_eps == 1e-6
    assert QwenTextConfig().embed_dim == 100352  # Cosmos-Predict2.5's text features
    with pytest.raises(ValueError, match="model_type"):
        QwenTextConfig.from_config({"model_type": "qwen2"})
    with pytest.raises(ValueError, match="rope"):
        QwenTextConfig.from_config(flat | {"rope_scaling": {"type": "yarn", "factor": 4.0}})

    folder = tmp_path / "text_encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(flat))
    sd = load_file(str(qwen_folder / "text_encoder" / "model.safetensors"))
    renamed = {
        k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k: v
        for k, v in sd.items()
    }
    renamed = {("model." + k if k.startswith("visual.") else k): v for k, v in renamed.items()}
    save_file(renamed, str(folder / "model.safetensors"))
    ours, report = _load_qwen(folder)
    ref, _ = _load_qwen(qwen_folder / "text_encoder")
    # The vision tower and lm_head are never built; their keys are dropped at load, by name.
    assert not [n for n, _ in ours.named_parameters() if "visual" in n or "lm_head" in n]
    ignored = set(report.ignored)
    assert "lm_head.weight" in ignored and any(k.startswith("model.visual.") for k in ignored)
    ids = torch.randint(0, 330, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(ours(ids), ref(ids))
