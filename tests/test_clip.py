"""CLIP vision encoder (Wan 2.1 I2V `image_encoder`) against transformers 5.24.0 on identical weights.

The reference is saved as on the Hub (CLIPVisionModelWithProjection: `vision_model.` prefix plus an unused
`visual_projection`) or as transformers 5 saves a bare CLIPVisionModel (no prefix); a local helper applies the
model's `ckpt_key_map` and fuses q/k/v, standing in for the loader; one test runs the real loader.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_checkpoints import _randomize
from transformers import CLIPVisionConfig as HFCLIPVisionConfig
from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

from dit_rt.loaders import build_and_load, map_key
from dit_rt.loaders.mapping import compile_map
from dit_rt.models.text.clip import PRESETS, CLIPVisionConfig, CLIPVisionEncoder

TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3)


def make_reference(with_projection: bool, **kw) -> torch.nn.Module:
    cls = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
    cfg = HFCLIPVisionConfig(**{**TINY, "projection_dim": 16, **kw})
    return _randomize(cls(cfg).eval(), seed=3)


def load_encoder(folder) -> CLIPVisionEncoder:
    """Build on meta, map keys with the model's own table, fuse q/k/v, fill with assign=True."""
    cfg = CLIPVisionConfig.from_config(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        model = CLIPVisionEncoder(cfg)
    rules = compile_map(model.ckpt_key_map)
    sd = {}
    for key, t in load_file(str(folder / "model.safetensors")).items():
        name = map_key(rules, key)
        if name is not None:
            sd[name] = t
    for name, module in model.named_modules():
        if getattr(module, "sources", None):
            parent = name.rsplit(".", 1)[0]
            for attr in ("weight", "bias"):
                sd[f"{name}.{attr}"] = torch.cat([sd.pop(f"{parent}.{s}.{attr}") for s in module.sources], 0)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


@pytest.mark.parametrize(
    "with_projection,kw",
    [
        (True, dict(image_size=28, patch_size=7, hidden_act="gelu")),  # ViT-H/14's activation, Hub key layout
        (
            False,
            dict(image_size=32, patch_size=4, hidden_act="quick_gelu"),
        ),  # OpenAI CLIP, transformers-5 keys
    ],
)
def test_encoder_matches_transformers(tmp_path, with_projection, kw):
    ref = make_reference(with_projection, **kw)
    ref.save_pretrained(str(tmp_path))
    keys = load_file(str(tmp_path / "model.safetensors"))
    assert any(k.startswith("vision_model.") for k in keys) == with_projection  # both layouts really covered
    ours = load_encoder(tmp_path)
    assert ours.cfg.hidden_act == kw["hidden_act"]
    px = torch.randn(2, 3, kw["image_size"], kw["image_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(pixel_values=px, output_hidden_states=True).hidden_states
        got = ours(px)
        every = ours.hidden_states(px)
    tokens = 1 + (kw["image_size"] // kw["patch_size"]) ** 2
    assert got.shape == (2, tokens, TINY["hidden_size"])
    assert len(want) == len(every) == TINY["num_hidden_layers"] + 1
    torch.testing.assert_close(got, want[-2], atol=1e-5, rtol=1e-5)
    for w, g in zip(want, every):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    # The penultimate state really differs from the last one: forward must stop one layer early.
    assert (want[-1] - want[-2]).abs().max() > 1e-2


def test_single_layer_penultimate_is_embeddings(tmp_path):
    """With one layer, hidden_states[-2] is the pre-LN'd embeddings: forward runs no layer at all."""
    ref = make_reference(True, image_size=28, patch_size=7, num_hidden_layers=1, hidden_act="gelu")
    ref.save_pretrained(str(tmp_path))
    ours = load_encoder(tmp_path)
    px = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        want = ref(pixel_values=px, output_hidden_states=True).hidden_states
        torch.testing.assert_close(ours(px), want[0], atol=1e-5, rtol=1e-5)


def test_real_loader_keeps_fp32_and_matches(tmp_path):
    """`build_and_load` with a bf16 target: the encoder stays fp32 (keep_fp32), so results still match."""
    ref = make_reference(True, image_size=28, patch_size=7, hidden_act="gelu")
    ref.save_pretrained(str(tmp_path))
    cfg = CLIPVisionConfig.from_config(json.loads((tmp_path / "config.json").read_text()))
    ours = build_and_load(CLIPVisionEncoder, cfg, tmp_path, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    px = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(pixel_values=px, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(ours(px.to(torch.bfloat16)), want, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(ours(px), want, atol=1e-5, rtol=1e-5)


def test_vit_h_preset_names_and_shapes_match_the_hub_layout():
    """At full ViT-H/14 size (on meta): the Hub config reads into the preset, and every checkpoint key of
    CLIPVisionModelWithProjection except `visual_projection` has a same-shaped home in our model."""
    hub = {
        "architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
        "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16, "num_hidden_layers": 32,
        "image_size": 224, "patch_size": 14, "hidden_act": "gelu", "layer_norm_eps": 1e-05,
        "projection_dim": 1024, "num_channels": 3, "dropout": 0.0, "initializer_range": 0.02,
    }  # fmt: skip
    cfg = CLIPVisionConfig.from_config(hub)
    assert cfg == PRESETS["clip-vit-h-14"]
    assert cfg.num_positions == 257 and cfg.head_dim == 80
    with torch.device("meta"):
        ref = CLIPVisionModelWithProjection(HFCLIPVisionConfig(**hub))
        ours = CLIPVisionEncoder(cfg)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.startswith("visual_projection")}
    got = {}
    for name, p in ours.state_dict().items():
        if ".qkv_proj." in name:
            for src in ("q_proj", "k_proj", "v_proj"):
                got[name.replace("qkv_proj", src)] = (p.shape[0] // 3, *p.shape[1:])
        else:
            got[name] = tuple(p.shape)
    assert got == want
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.vision_model.parameters())
    assert round(n / 1e6, 1) == 630.8  # the ViT-H/14 tower, without the 1.3M-parameter projection


def test_from_config_variants_and_errors():
    full = {"model_type": "clip", "vision_config": {**TINY, "image_size": [28, 28], "patch_size": 7}}
    cfg = CLIPVisionConfig.from_config(full)
    assert (cfg.hidden_size, cfg.image_size, cfg.patch_size, cfg.hidden_act) == (32, 28, 7, "gelu")
    with pytest.raises(ValueError, match="model_type"):
        CLIPVisionConfig.from_config({"model_type": "siglip_vision_model"})
    with pytest.raises(ValueError, match="square"):
        CLIPVisionConfig.from_config({**TINY, "image_size": [28, 32], "patch_size": 7})
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPVisionConfig(hidden_act="swish")
    with pytest.raises(ValueError, match="patch_size"):
        CLIPVisionConfig(image_size=30, patch_size=7)
    with pytest.raises(ValueError, match="num_attention_heads"):
        CLIPVisionConfig(hidden_size=30, num_attention_heads=4)


def test_wrong_pixel_size_is_a_clear_error(tmp_path):
    ref = make_reference(True, image_size=28, patch_size=7, hidden_act="gelu")
    ref.save_pretrained(str(tmp_path))
    ours = load_encoder(tmp_path)
    with pytest.raises(ValueError, match="28x28 pixel_values, got 32x32.*clip_preprocess"):
        ours(torch.randn(1, 3, 32, 32))
