"""UMT5/T5 encoder, tokenizer and Wan prompt embeddings against transformers 5.24.0 / diffusers 0.42.1.

Both sides run identical weights: the reference module is saved as on the Hub and its tensors are loaded
into dit_rt (q, k, v fused into `qkv` by a local helper standing in for the loader).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_checkpoints import make_tokenizer, make_umt5

from dit_rt.models.text import T5Tokenizer, UMT5Config, UMT5Encoder, prompt_clean, wan_text_embeddings
from dit_rt.models.text.umt5 import relative_position_buckets

PROMPTS = ["a cat and a dog baking a cake", "the dog!"]


def load_encoder(folder) -> UMT5Encoder:
    """Build on meta and fill with assign=True from the saved safetensors, as the loader will."""
    cfg = UMT5Config.from_config(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    sd = load_file(str(folder / "model.safetensors"))
    sd.pop("encoder.embed_tokens.weight", None)  # the tied alias, ignored via ckpt_key_map
    for name, module in model.named_modules():
        if getattr(module, "sources", None):
            parts = [sd.pop(f"{name.rsplit('.', 1)[0]}.{s}.weight") for s in module.sources]
            sd[f"{name}.weight"] = torch.cat(parts, 0)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5")
    ref = make_umt5()
    ref.save_pretrained(str(folder / "text_encoder"))
    hf_tok = make_tokenizer()
    hf_tok.save_pretrained(str(folder / "tokenizer"))
    return folder, ref, hf_tok


def test_buckets_match_spec_examples():
    b = relative_position_buckets(600, 32, 128)  # b[q, k] is the bucket of r = k - q
    q = 550
    cases = {0: 0, -1: 1, 1: 17, -8: 8, -12: 9, -127: 15, -500: 15, 30: 16 + 11}
    for r, want in cases.items():
        assert b[q, q + r].item() == want, r
    assert b[0, 200].item() == 31
    # Every offset in [-599, 599] against transformers' own bucket function.
    attn = make_umt5().encoder.block[0].layer[0].SelfAttention
    pos = torch.arange(600)
    assert torch.equal(b, attn._relative_position_bucket(pos[None, :] - pos[:, None]))


@pytest.mark.parametrize("per_layer", [True, False])
def test_encoder_matches_transformers(tmp_path, per_layer):
    """Batch of two prompts of different lengths with padding; UMT5 (per-layer bias) and T5 (shared bias)."""
    if per_layer:
        ref = make_umt5()
    else:
        from tiny_checkpoints import UMT5, _randomize
        from transformers import T5Config as HFT5Config
        from transformers import T5EncoderModel

        ref = _randomize(T5EncoderModel(HFT5Config(vocab_size=128, **UMT5)).eval(), seed=5)
    ref.save_pretrained(str(tmp_path))
    ours = load_encoder(tmp_path)
    assert ours.cfg.per_layer_position_bias == per_layer
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = 0
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    assert got.shape == (2, 12, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The mask matters: without it the padded prompt's real rows change.
    with torch.no_grad():
        unmasked = ours(ids)
    assert (unmasked[1, :5] - want[1, :5]).abs().max() > 1e-3


def test_encoder_bf16_follows_transformers(saved):
    """In bf16 both sides round at the same places, bit for bit: the norm output cast to the weight dtype,
    bf16 GEMMs, and the gated GELU written out op by op as transformers' NewGELUActivation (F.gelu's fused
    tanh form rounds once, and over the layers left the states ~1e-2 off the reference's)."""
    folder, ref, _ = saved
    ours = load_encoder(folder / "text_encoder").to(torch.bfloat16)
    ref16 = make_umt5().to(torch.bfloat16)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        got = ours(ids, mask)
        want = ref16(input_ids=ids, attention_mask=mask).last_hidden_state
        exact = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)
    rel = ((got.float() - exact).norm() / exact.norm()).item()
    assert 0 < rel < 0.05  # bf16 rounding, not float32's


def test_relu_config_and_presets():
    cfg = UMT5Config.from_config({"model_type": "t5", "feed_forward_proj": "relu", "d_model": 16, "d_ff": 8})
    assert (cfg.gated, cfg.act, cfg.per_layer_position_bias) == (False, "relu", False)
    assert UMT5Config().act == "gelu_new" and UMT5Config().gated
    with pytest.raises(ValueError, match="model_type"):
        UMT5Config.from_config({"model_type": "bert"})
    with pytest.raises(ValueError, match="feed_forward_proj"):
        UMT5Config(feed_forward_proj="gated-foo")


def test_tokenizer_matches_transformers(saved):
    folder, _, hf_tok = saved
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    ours = T5Tokenizer.from_folder(folder / "tokenizer")
    prompts = PROMPTS + ["", "A Cat, 42 dogs & cakes?", "the cat " * 20, "zz  z\tq"]
    for max_length in (4, 16, 64):
        want = hf_tok(
            prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        ids, mask = ours.encode(prompts, max_length=max_length)
        assert torch.equal(ids, want.input_ids), max_length
        assert torch.equal(mask, want.attention_mask), max_length
    # Truncation keeps the end-of-sequence token.
    ids, mask = ours.encode(["the cat " * 20], max_length=8)
    assert ids[0, -1].item() == 1 and mask.sum().item() == 8


def test_wan_text_embeddings_match_pipeline(saved):
    folder, ref, hf_tok = saved
    from diffusers import WanPipeline

    pipe = WanPipeline(tokenizer=hf_tok, text_encoder=ref, vae=None, scheduler=None, transformer=None)
    prompts = PROMPTS + ["  &amp;lt;b&amp;gt; cake\n\n with   the dog "]
    encoder = load_encoder(folder / "text_encoder")
    tokenizer = T5Tokenizer.from_folder(folder / "tokenizer")
    with torch.no_grad():  # as both pipelines run it
        want = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=24, device="cpu", dtype=torch.float32)
        got = wan_text_embeddings(
            encoder, tokenizer, prompts, max_length=24, device="cpu", dtype=torch.float32
        )
        # bf16 too: the encoder sees all max_length tokens, as the reference's, so the bf16 states are the
        # reference's bit for bit (over only the prompt's tokens the attention rounded otherwise)
        pipe.text_encoder = make_umt5().to(torch.bfloat16)
        want16 = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=24, device="cpu")
        got16 = wan_text_embeddings(encoder.to(torch.bfloat16), tokenizer, prompts, max_length=24)
    assert got.shape == want.shape == (3, 24, 32)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert got16.dtype == torch.bfloat16 and torch.equal(got16, want16)
    _, mask = tokenizer.encode([prompt_clean(p) for p in prompts], 24)
    assert (got[mask == 0] == 0).all() and (got[mask == 1].abs().sum(-1) > 0).all()
    assert wan_text_embeddings(encoder, tokenizer, "the dog!", 24).shape == (1, 24, 32)


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("  a   cat\n\tand a dog  ", "a cat and a dog"),
        ("Tom &amp; Jerry", "Tom & Jerry"),
        ("&amp;lt;b&amp;gt;bold", "<b>bold"),  # unescaped twice
        ("&amp;amp;amp;", "&"),  # ftfy decodes entities until none is left
        ("a&lt;b &amp;amp; c<d", "a<b & c<d"),  # ... but not on a line holding a "<"
        ("caf\u00e9\u3000latte", "caf\u00e9 latte"),  # Unicode whitespace collapses too
        ("", ""),
        # ftfy's repairs of well-formed text, which the reference runs first (diffusers, Wan's own T5):
        ("静态，细节模糊不清，字幕", "静态,细节模糊不清,字幕"),  # full-width commas (Wan's negative prompt)
        ("ＡＢＣ１２３ ｶﾀｶﾅ", "ABC123 カタカナ"),  # full-width ASCII, half-width katakana
        ("he said \u201chi\u201d, it\u2019s \ufb01ne", 'he said "hi", it\'s fine'),  # quotes, ligature
        ("e\u0301 \x1b[31mred\x1b[0m\ufeff\x00!", "\u00e9 red!"),  # NFC, terminal escapes, controls
    ],
)
def test_prompt_clean(raw, clean):
    from diffusers.pipelines.wan import pipeline_wan

    assert pipeline_wan.is_ftfy_available()  # the reference path as diffusers runs it (the test extra)
    assert pipeline_wan.prompt_clean(raw) == clean
    assert prompt_clean(raw) == clean


def test_prompt_clean_matches_ftfy_on_wan_negative_prompt():
    import ftfy

    from dit_rt.catalog import WAN_NEGATIVE
    from dit_rt.models.text.tokenizer import fix_text

    assert fix_text(WAN_NEGATIVE) == ftfy.fix_text(WAN_NEGATIVE) != WAN_NEGATIVE
