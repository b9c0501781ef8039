"""WanTransformer against diffusers' WanTransformer3DModel on identical tiny random weights (CPU, float32)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from dit_rt.models.wan import WAN_TRANSFORMER_PRESETS, WanTransformer, WanTransformerConfig
from dit_rt.ops import Linear
from tests.tiny_checkpoints import TEXT_DIM, WAN_TRANSFORMER, make_wan_transformer

D = WAN_TRANSFORMER["num_attention_heads"] * WAN_TRANSFORMER["attention_head_dim"]
I2V = dict(in_channels=36, image_dim=24, added_kv_proj_dim=D)


def from_reference(ref: torch.nn.Module) -> WanTransformer:
    """Our model built on meta and filled from the diffusers state dict, fusing as the loader does."""
    cfg = WanTransformerConfig.from_config(dict(ref.config))
    with torch.device("meta"):
        model = WanTransformer(cfg)
    sd = dict(ref.state_dict())
    state = {}
    for name, m in model.named_modules():
        if isinstance(m, Linear) and m.sources:
            parent = name.rpartition(".")[0]
            for p in ("weight", "bias"):
                state[f"{name}.{p}"] = torch.cat([sd.pop(f"{parent}.{src}.{p}") for src in m.sources])
    state.update(sd)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def inputs(B=1, cin=16, grid=(2, 4, 6), text_len=7, seed=0, timesteps=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cin, *grid, generator=g)
    t = torch.tensor(timesteps if timesteps is not None else [999.0 * (i + 1) / (B + 1) for i in range(B)])
    ctx = torch.randn(B, text_len, TEXT_DIM, generator=g)
    return x, t, ctx


def assert_close(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    scale = ref.abs().max().item()
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel} x output scale {scale:.3g}"


@pytest.fixture(scope="module")
def t2v():
    ref = make_wan_transformer()
    return ref, from_reference(ref)


@torch.no_grad()
@pytest.mark.parametrize("grid", [(1, 2, 2), (2, 4, 6), (3, 6, 4), (5, 2, 8)])
def test_t2v_matches_diffusers(t2v, grid):
    ref, model = t2v
    x, t, ctx = inputs(grid=grid)
    expected = ref(x, t, ctx, return_dict=False)[0]
    assert_close(model(x, t, ctx), expected)


@torch.no_grad()
def test_batch_with_different_timesteps(t2v):
    ref, model = t2v
    x, t, ctx = inputs(B=2, grid=(3, 4, 6), timesteps=[999, 17])  # integer timesteps, as the pipelines pass
    out = model(x, t, ctx)
    assert_close(out, ref(x, t, ctx, return_dict=False)[0])
    # Each item only sees its own timestep: the batch equals two batch-1 calls.
    for i in range(2):
        assert_close(out[i : i + 1], model(x[i : i + 1], t[i : i + 1], ctx[i : i + 1]), rel=1e-5)
    assert (out[0] - out[1]).abs().max() > 1e-2


@torch.no_grad()
def test_i2v_matches_diffusers():
    ref = make_wan_transformer(**I2V)
    model = from_reference(ref)
    assert model.blocks[0].attn2.add_kv.sources == ("add_k_proj", "add_v_proj")
    x, t, ctx = inputs(B=2, cin=36, grid=(2, 4, 2), text_len=512)  # diffusers splits off the last 512 tokens
    img = torch.randn(2, 257, I2V["image_dim"], generator=torch.Generator().manual_seed(5))
    expected = ref(x, t, ctx, encoder_hidden_states_image=img, return_dict=False)[0]
    out = model(x, t, ctx, img)
    assert_close(out, expected)
    # The image branch matters: a different image changes the output.
    assert (model(x, t, ctx, torch.randn_like(img)) - out).abs().max() > 1e-3


@torch.no_grad()
def test_flf2v_pos_embed_matches_diffusers():
    n = 9  # CLIP tokens per image (257 in the real model)
    ref = make_wan_transformer(**I2V, pos_embed_seq_len=2 * n)
    model = from_reference(ref)
    x, t, ctx = inputs(B=1, cin=36, grid=(2, 2, 4), text_len=512)
    img = torch.randn(
        2, n, I2V["image_dim"], generator=torch.Generator().manual_seed(6)
    )  # first + last frame
    expected = ref(x, t, ctx, encoder_hidden_states_image=img, return_dict=False)[0]
    assert_close(model(x, t, ctx, img), expected)


@torch.no_grad()
def test_bf16_dtype_contract():
    """bf16 load: fp32 where diffusers keeps fp32, bf16 output close to diffusers' own bf16 output."""
    ref16 = make_wan_transformer().to(torch.bfloat16)
    # What diffusers' from_pretrained(torch_dtype=bfloat16) does (it needs accelerate for this path).
    for k, p in ref16.named_parameters():
        if any(m in k for m in ref16._keep_in_fp32_modules):
            p.data = p.data.float()
    model = from_reference(ref16)
    dtypes = {k: p.dtype for k, p in model.named_parameters()}
    for k, p in ref16.named_parameters():
        if k in dtypes:
            assert dtypes[k] == p.dtype, k
    assert dtypes["blocks.0.attn1.to_qkv.weight"] == torch.bfloat16
    assert dtypes["blocks.0.scale_shift_table"] == torch.float32
    assert dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    x, t, ctx = inputs(grid=(2, 4, 4))
    x, ctx = x.bfloat16(), ctx.bfloat16()
    out = model(x, t, ctx)
    assert out.dtype == torch.bfloat16
    assert_close(out, ref16(x, t, ctx, return_dict=False)[0], rel=3e-2)


def test_keep_fp32_and_key_map_follow_diffusers():
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        ref = WanTransformer3DModel(**{**WAN_TRANSFORMER, **I2V})
        model = WanTransformer(WanTransformerConfig.from_config(dict(ref.config)))
    ref_keep = {k for k, _ in ref.named_parameters() if any(m in k for m in ref._keep_in_fp32_modules)}
    ours = {k for k, _ in model.named_parameters() if any(m in k for m in model.keep_fp32)}
    assert ours == ref_keep and ours  # no fused projection is in the fp32 set, so names coincide
    drop = [re.compile(p) for p, repl in model.ckpt_key_map if repl is None]
    assert any(p.search("blocks.3.attn2.norm_added_q.weight") for p in drop)
    assert not any(p.search(k) for p in drop for k in ref.state_dict())


def test_config_from_hub_json_and_presets():
    hub = {  # Wan-AI/Wan2.1-I2V-14B-480P-Diffusers transformer/config.json, as written by the converter
        "_class_name": "WanTransformer3DModel",
        "_diffusers_version": "0.33.0.dev0",
        "added_kv_proj_dim": 5120,
        "attention_head_dim": 128,
        "cross_attn_norm": True,
        "eps": 1e-06,
        "ffn_dim": 13824,
        "freq_dim": 256,
        "image_dim": 1280,
        "in_channels": 36,
        "num_attention_heads": 40,
        "num_layers": 40,
        "out_channels": 16,
        "patch_size": [1, 2, 2],
        "pos_embed_seq_len": None,
        "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": 1024,
        "text_dim": 4096,
    }
    cfg = WanTransformerConfig.from_config(hub)
    assert (
        cfg == WanTransformerConfig.preset("wan2.1-i2v-14b")
        and cfg.dim == 5120
        and cfg.patch_size == (1, 2, 2)
    )
    with pytest.raises(ValueError, match="unknown Wan transformer config keys"):
        WanTransformerConfig.from_config({**hub, "num_heads": 40})
    with pytest.raises(KeyError):
        WanTransformerConfig.preset("wan9")
    # Parameter counts of the real checkpoints (spec A.1), built on meta.
    counts = {
        "wan2.1-t2v-1.3b": 1_418_996_800,
        "wan2.1-t2v-14b": 14_288_491_584,
        "wan2.1-i2v-14b": 16_394_878_784,
        "wan2.2-t2v-a14b": 14_288_491_584,
        "wan2.2-i2v-a14b": 14_288_901_184,
    }
    for name, n in counts.items():
        with torch.device("meta"):
            model = WanTransformer(WAN_TRANSFORMER_PRESETS[name])
        assert sum(p.numel() for p in model.parameters()) == n, name


def test_bad_inputs_raise(t2v):
    _, model = t2v
    x, t, ctx = inputs(grid=(2, 4, 4))
    with pytest.raises(ValueError, match="multiples of patch"):
        model(x[..., :3], t, ctx)
    with pytest.raises(ValueError, match=r"\[B, 16, T, H, W\]"):
        model(x[:, :8], t, ctx)
    with pytest.raises(ValueError, match="takes no image_context"):
        model(x, t, ctx, torch.zeros(1, 257, 24))
    with pytest.raises(ValueError, match="timestep"):
        model(x, t.repeat(2), ctx)


def test_flops_match_counter_and_scale(t2v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    _, model = t2v
    x, t, ctx = inputs(grid=(2, 4, 6), text_len=7)
    # The math SDPA path runs attention as two bmm the counter sees (the fused CPU kernel is not counted).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, ctx)
    assert model.flops(2, 4, 6, text_len=7) == counter.get_total_flops()
    # Quadratic in tokens: the second difference over L = n, 2n, 3n is 2 * layers * 4 * D * n^2.
    f = [model.flops(k, 4, 6, text_len=7) for k in (1, 2, 3)]
    n = 2 * 3  # tokens per latent frame
    assert f[0] > 0 and f[2] - 2 * f[1] + f[0] == 2 * WAN_TRANSFORMER["num_layers"] * 4 * D * n * n
    with pytest.raises(ValueError, match="no image branch"):
        model.flops(1, 4, 4, image_tokens=257)


@torch.no_grad()
def test_load_weights_from_save_pretrained_folder(tmp_path):
    """The real loader on a `save_pretrained` folder holding a stray `norm_added_q` key, which it drops."""
    from safetensors.torch import load_file, save_file

    from dit_rt.loaders import load_weights

    ref = make_wan_transformer(**I2V)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({**load_file(path), "blocks.1.attn2.norm_added_q.weight": torch.ones(D)}, path)
    cfg = WanTransformerConfig.from_config(json.loads((tmp_path / "config.json").read_text()))

    def load(dtype):
        with torch.device("meta"):
            model = WanTransformer(cfg)
        load_weights(model, tmp_path, device="cpu", dtype=dtype)
        return model.eval()

    model = load(torch.bfloat16)
    fp32 = {k for k, p in model.named_parameters() if p.dtype == torch.float32}
    assert fp32 == {k for k, _ in model.named_parameters() if any(m in k for m in model.keep_fp32)}

    model = load(torch.float32)
    x, t, ctx = inputs(cin=36, grid=(2, 2, 4), text_len=512)
    img = torch.randn(1, 257, I2V["image_dim"], generator=torch.Generator().manual_seed(7))
    assert_close(model(x, t, ctx, img), ref(x, t, ctx, encoder_hidden_states_image=img, return_dict=False)[0])
