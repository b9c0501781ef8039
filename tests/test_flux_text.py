"""FLUX.1's text stack against transformers 5.24.0 on identical weights: the CLIP text tower (pooled
output and last hidden state), the T5 v1.1 encoder (block 0's relative bias shared by all blocks) built
from its `T5EncoderModel` folder, and the CLIP tokenizer (ids equal to transformers' CLIPTokenizer).

Models are saved with `save_pretrained` and loaded with the component builders and the real loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_checkpoints import CLIP_TEXT, _randomize, make_clip_tokenizer, make_t5

from dit_rt.components import build_component
from dit_rt.models.text import (
    CLIPTextConfig,
    CLIPTextEncoder,
    CLIPTokenizer,
    T5Encoder,
    T5Tokenizer,
)

CPU, F32 = torch.device("cpu"), torch.float32


def _build(folder: Path, class_name: str) -> torch.nn.Module:
    """Load `folder` (one component, saved by transformers) through the registered builder."""
    index = {folder.name: ["transformers", class_name]}
    return build_component(folder.parent, index, folder.name, device=CPU, dtype=F32)


def _clip_reference(vocab_size: int = 40, **overrides):
    from transformers import CLIPTextConfig as HFCLIPTextConfig
    from transformers import CLIPTextModel

    cfg = HFCLIPTextConfig(vocab_size=vocab_size, **{**CLIP_TEXT, **overrides})
    return _randomize(CLIPTextModel(cfg).eval(), seed=21)


def _clip_ids(eos: int) -> torch.Tensor:
    """Two 77-token prompts as FLUX's tokenizer lays them out: bos, words, eos, then eos as padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 30, (2, 77), generator=g)
    ids[:, 0] = 0
    for row, n in enumerate((5, 12)):
        ids[row, n] = eos
        ids[row, n + 1 :] = eos
    return ids


@pytest.mark.parametrize(
    "eos_token_id, hub_prefix",
    [(2, True), (2, False), (39, False)],
    ids=["legacy-eos-hub-keys", "legacy-eos-tf5-keys", "real-eos"],
)
def test_clip_text_matches_transformers(tmp_path, eos_token_id, hub_prefix):
    """Pooled output and last hidden state. Legacy eos id 2 (FLUX.1's config) pools at the argmax of the ids;
    a real eos id at its first occurrence (the padding repeats it). Keys as on the Hub (`text_model.` prefix
    and an old `position_ids` buffer) or as transformers 5 saves them (no prefix)."""
    ref = _clip_reference(eos_token_id=eos_token_id)
    folder = tmp_path / "text_encoder"
    ref.save_pretrained(str(folder))
    if hub_prefix:
        path = folder / "model.safetensors"
        sd = {f"text_model.{k}": v for k, v in load_file(str(path)).items()}
        sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        save_file(sd, str(path))
    ours = _build(folder, "CLIPTextModel")
    assert isinstance(ours, CLIPTextEncoder) and ours.cfg.eos_token_id == eos_token_id
    ids = _clip_ids(eos=39)  # the largest id, as <|endoftext|> in the real vocabulary
    with torch.no_grad():
        want = ref(input_ids=ids)
        got = ours(ids)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.pooled, want.pooler_output, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.eos_positions(ids), torch.tensor([5, 12]))
    # The causal mask matters: a later token must not change an earlier state.
    changed = ids.clone()
    changed[:, 3] = 7
    with torch.no_grad():
        after = ours(changed).last_hidden_state
    torch.testing.assert_close(after[:, :3], got.last_hidden_state[:, :3], rtol=0, atol=0)


def test_clip_text_config():
    cfg = CLIPTextConfig.from_config(
        {"model_type": "clip", "text_config": {"hidden_size": 48, "eos_token_id": 7}}
    )
    assert (cfg.hidden_size, cfg.eos_token_id, cfg.num_attention_heads) == (48, 7, 12)
    assert CLIPTextConfig() == CLIPTextConfig(hidden_size=768, num_hidden_layers=12, eos_token_id=2)
    with pytest.raises(ValueError, match="model_type"):
        CLIPTextConfig.from_config({"model_type": "clip_vision_model"})
    with pytest.raises(ValueError, match="divisible"):
        CLIPTextConfig(hidden_size=10, num_attention_heads=3)
    with torch.device("meta"):
        model = CLIPTextEncoder(
            CLIPTextConfig(hidden_size=8, num_attention_heads=2, max_position_embeddings=4)
        )
    with pytest.raises(ValueError, match="at most 4 tokens"):
        model.text_model.embeddings(torch.zeros(1, 5, dtype=torch.long, device="meta"))


@pytest.mark.parametrize("masked", [False, True], ids=["flux-no-mask", "masked"])
def test_t5_encoder_matches_transformers(tmp_path, masked):
    """T5 v1.1 as FLUX.1 runs it (no attention mask: padding is attended) and with a padding mask."""
    ref = make_t5()
    folder = tmp_path / "text_encoder_2"
    ref.save_pretrained(str(folder))
    ours = _build(folder, "T5EncoderModel")
    assert isinstance(ours, T5Encoder) and not ours.cfg.per_layer_position_bias
    blocks = ours.encoder.block
    assert blocks[0].layer[0].SelfAttention.relative_attention_bias is not None
    assert all(b.layer[0].SelfAttention.relative_attention_bias is None for b in blocks[1:])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 16), generator=g)
    ids[1, 6] = 1
    ids[1, 7:] = 0
    mask = (torch.arange(16)[None] < torch.tensor([[16], [7]])).long() if masked else None
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_t5_builder_takes_model_type_from_class(tmp_path):
    """A config without model_type: the class name decides (T5 shares block 0's bias, UMT5 does not)."""
    folder = tmp_path / "text_encoder_2"
    make_t5().save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    del config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    assert not _build(folder, "T5EncoderModel").cfg.per_layer_position_bias
    with pytest.raises(Exception, match="relative_attention_bias"):  # UMT5 wants a table in every block
        _build(folder, "UMT5EncoderModel")


PROMPTS = [
    "a cat",
    "A photo of a RED cat, baking a cake!",
    "",
    "the   dog\tand\nthe cat... on 42 cakes?!",
    "café naïve über 猫 🐱 — “quoted” it's we'll they're",
    "a <|endoftext|> cat <|startoftext|>",
    "a cat with a dog " * 30,  # truncated to bos + 75 + eos
    "cats dogs photos",  # words outside the merges: byte-level pieces
]


def _write_vocab_merges(tokenizer_json: Path, folder: Path) -> None:
    """FLUX.1-dev's `tokenizer/` layout, from a saved tokenizer.json: vocab.json, merges.txt with its
    version header, and a tokenizer_config.json listing the two special tokens as the Hub file does."""
    model = json.loads(tokenizer_json.read_text())["model"]
    vocab = model["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = dict(lstrip=False, normalized=True, rstrip=False, single_word=False, special=True)
    config = {
        "added_tokens_decoder": {
            str(vocab[t]): {"content": t, **special} for t in ("<|startoftext|>", "<|endoftext|>")
        },
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def clip_tokenizers(tmp_path_factory):
    """{layout: (transformers' CLIPTokenizer, folder)}: saved by transformers 5 (tokenizer.json), and in
    FLUX.1-dev's layout (vocab.json + merges.txt, no tokenizer.json); each reference loads its folder."""
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    fast = tmp_path_factory.mktemp("clip") / "tokenizer"
    make_clip_tokenizer().save_pretrained(str(fast))
    legacy = tmp_path_factory.mktemp("clip-legacy") / "tokenizer"
    _write_vocab_merges(fast / "tokenizer.json", legacy)
    return {
        name: (HFCLIPTokenizer.from_pretrained(str(folder)), folder)
        for name, folder in (("tokenizer.json", fast), ("vocab+merges", legacy))
    }


@pytest.mark.parametrize("layout", ["tokenizer.json", "vocab+merges"])
def test_clip_tokenizer_matches_transformers(clip_tokenizers, layout):
    hf, folder = clip_tokenizers[layout]
    assert (folder / "tokenizer.json").is_file() == (layout == "tokenizer.json")
    ours = CLIPTokenizer.from_folder(folder)
    want = hf(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids, mask = ours.encode(PROMPTS)
    assert ids.shape == (len(PROMPTS), 77)
    assert torch.equal(ids, want.input_ids)
    assert torch.equal(mask, want.attention_mask)
    eos = hf.eos_token_id
    assert ids[0, 0].item() == hf.bos_token_id and ids[6, -1].item() == eos  # truncation keeps the eos
    assert eos == ids.max().item() and ours.pad_id == eos  # padded with eos, the largest id
    # Shorter max_length (truncation reserves bos + eos) on random word soup with punctuation.
    words = ["a", "the", "cat", "dog", "and", "of", "in", "on", "with", "baking", "cake", "red", "photo"]
    g = torch.Generator().manual_seed(3)
    texts = [
        " ".join(words[i] for i in torch.randint(0, len(words), (int(n),), generator=g))
        + ",.!?'s 1234 ÀÉ ß"[: int(n)]
        for n in torch.randint(1, 30, (20,), generator=g)
    ]
    for max_length in (8, 77):
        want = hf(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        assert torch.equal(ours.encode(texts, max_length)[0], want.input_ids), max_length


def test_tokenizer_folders_must_exist(tmp_path, clip_tokenizers):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        T5Tokenizer.from_folder(tmp_path)
    _, legacy = clip_tokenizers["vocab+merges"]
    config = json.loads((legacy / "tokenizer_config.json").read_text()) | {"bos_token": "<|start|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((legacy / name).read_bytes())
    with pytest.raises(ValueError, match="not in the vocabulary"):
        CLIPTokenizer.from_folder(tmp_path)
