"""CosmosTransformer against diffusers' CosmosTransformer3DModel on identical tiny random weights (CPU,
float32), each loaded from the reference's `save_pretrained` folder through dit_rt's loader.

diffusers' Cosmos DiT imports torchvision for one nearest-neighbour resize of the padding mask and no CPU
torchvision installs here: the `reference` fixture stands in for that one call with torch's own nearest
interpolation (tests/tiny_cosmos.py, `torchvision_stand_in`), which is what torchvision runs for tensors.
"""

from __future__ import annotations

import pytest
import torch

from dit_rt.loaders import load_weights
from dit_rt.models.cosmos import (
    COSMOS_TRANSFORMER_PRESETS,
    CosmosTransformer,
    CosmosTransformerConfig,
    build_from_folder,
)
from tests.tiny_cosmos import (
    COSMOS_1,
    COSMOS_PREDICT2,
    COSMOS_PREDICT2_V2W,
    COSMOS_PREDICT25,
    COSMOS_TEXT_DIM,
    make_cosmos_transformer,
    torchvision_stand_in,
)

CONFIGS = {
    "predict2": COSMOS_PREDICT2,
    "v2w": COSMOS_PREDICT2_V2W,
    "predict2.5": COSMOS_PREDICT25,
    "cosmos1": COSMOS_1,
}


@pytest.fixture(scope="module", autouse=True)
def reference_resize():
    with torchvision_stand_in():
        yield


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """name -> (diffusers model, ours loaded from its save_pretrained folder), built once per config."""
    cache = {}

    def get(name: str):
        if name not in cache:
            ref = make_cosmos_transformer(CONFIGS[name])
            folder = tmp_path_factory.mktemp(name.replace(".", "_"))
            ref.save_pretrained(folder, safe_serialization=True)
            with torch.device("meta"):
                model = build_from_folder(folder)
            load_weights(model, folder, device="cpu", dtype=torch.float32)
            cache[name] = (ref, model.eval())
        return cache[name]

    return get


def inputs(B=2, cin=16, grid=(1, 4, 6), text_len=7, ctx_dim=COSMOS_TEXT_DIM, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cin, *grid, generator=g)
    t = torch.tensor([0.3 + 0.5 * i for i in range(B)])  # preconditioned noise levels, as the pipelines pass
    ctx = torch.randn(B, text_len, ctx_dim, generator=g)
    return x, t, ctx


def zeros_mask(grid) -> torch.Tensor:
    return torch.zeros(1, 1, 8 * grid[1], 8 * grid[2])  # pixel-sized, as the pipelines pass


def assert_close(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = ((out - ref).norm() / ref.norm()).item()
    assert err <= rel, f"relative L2 error {err:.3g} > {rel}"


@torch.no_grad()
@pytest.mark.parametrize("grid", [(1, 4, 6), (1, 6, 2), (3, 4, 4)])
def test_predict2_matches_diffusers(pair, grid):
    """Text2Image (one latent frame) and a short video, one timestep per item, zero padding mask."""
    ref, model = pair("predict2")
    x, t, ctx = inputs(grid=grid)
    mask = zeros_mask(grid)
    expected = ref(x, t, ctx, padding_mask=mask, return_dict=False)[0]
    out = model(x, t, ctx, padding_mask=mask)
    assert_close(out, expected)
    assert torch.equal(model(x, t, ctx), out)  # padding_mask=None is the pipelines' all-zero mask


@torch.no_grad()
def test_nonzero_padding_mask_is_resized_nearest(pair):
    ref, model = pair("predict2")
    x, t, ctx = inputs(grid=(2, 4, 6))
    mask = (torch.rand(1, 1, 32, 48, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    out = model(x, t, ctx, padding_mask=mask)
    assert_close(out, ref(x, t, ctx, padding_mask=mask, return_dict=False)[0])
    assert (out - model(x, t, ctx)).abs().max() > 1e-3  # the mask channel reaches the output


@torch.no_grad()
def test_video2world_per_frame_timestep_and_condition_mask(pair):
    """Video2World: conditioning frames carry their own timestep ([B, 1, T, 1, 1]) and the mask channel."""
    ref, model = pair("v2w")
    grid = (3, 4, 6)
    x, _, ctx = inputs(grid=grid)
    cond = torch.zeros(2, 1, *grid)
    cond[:, :, :1] = 1.0  # the first latent frame conditions
    t = torch.tensor([0.7, 0.4])[:, None, None, None, None].repeat(1, 1, 3, 1, 1)
    t[:, :, :1] = 1e-4 / (1 + 1e-4)
    mask = zeros_mask(grid)
    kw = dict(fps=16, condition_mask=cond, padding_mask=mask)
    out = model(x, t, ctx, **kw)
    assert_close(out, ref(x, t, ctx, **kw, return_dict=False)[0])
    # The per-frame path: equal timesteps on every frame give the [B] timestep's output.
    flat = torch.tensor([0.7, 0.4])
    same = model(x, flat[:, None, None, None, None].repeat(1, 1, 3, 1, 1), ctx, **kw)
    assert_close(same, model(x, flat, ctx, **kw))
    assert (same - out).abs().max() > 1e-3
    # fps scales RoPE's time positions.
    assert (model(x, t, ctx, **{**kw, "fps": 30}) - out).abs().max() > 1e-4


@torch.no_grad()
def test_predict25_text_projection(pair):
    ref, model = pair("predict2.5")
    assert model.crossattn_proj[0].weight.shape == (
        COSMOS_TEXT_DIM,
        COSMOS_PREDICT25["crossattn_proj_in_channels"],
    )
    grid = (2, 4, 4)
    x, _, ctx = inputs(grid=grid, ctx_dim=COSMOS_PREDICT25["crossattn_proj_in_channels"])
    cond = torch.zeros(2, 1, *grid)
    cond[:, :, :1] = 1.0
    t = torch.tensor([[0.9, 0.2]]).T[:, None, :, None, None].expand(2, 1, 2, 1, 1).clone()
    kw = dict(condition_mask=cond, padding_mask=zeros_mask(grid))
    assert_close(model(x, t, ctx, **kw), ref(x, t, ctx, **kw, return_dict=False)[0])


@torch.no_grad()
@pytest.mark.parametrize("fps", [None, 30])
def test_cosmos1_learnable_position_embedding(pair, fps):
    ref, model = pair("cosmos1")
    assert model.learnable_pos_embed is not None
    grid = (3, 6, 4)
    x, t, ctx = inputs(grid=grid)
    mask = zeros_mask(grid)
    out = model(x, t, ctx, fps=fps, padding_mask=mask)
    assert_close(out, ref(x, t, ctx, fps=fps, padding_mask=mask, return_dict=False)[0])


@torch.no_grad()
def test_batch_items_are_independent(pair):
    _, model = pair("predict2")
    x, t, ctx = inputs(grid=(2, 4, 4))
    out = model(x, t, ctx)
    for i in range(2):
        assert_close(out[i : i + 1], model(x[i : i + 1], t[i : i + 1], ctx[i : i + 1]))


def test_bf16_load_keeps_fp32_where_diffusers_does(pair, tmp_path):
    ref, _ = pair("cosmos1")
    ref.save_pretrained(tmp_path, safe_serialization=True)
    with torch.device("meta"):
        model = build_from_folder(tmp_path)
    load_weights(model, tmp_path, device="cpu", dtype=torch.bfloat16)
    fp32 = {k for k, p in model.named_parameters() if p.dtype == torch.float32}
    assert fp32 == {f"learnable_pos_embed.pos_emb_{a}" for a in "thw"}
    x, t, ctx = inputs(grid=(2, 4, 4))
    with torch.no_grad():
        out = model(x.bfloat16(), t, ctx.bfloat16())
        expected = ref(x, t, ctx, padding_mask=zeros_mask((2, 4, 4)), return_dict=False)[0]
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), expected, rel=3e-2)


def test_config_from_hub_json_presets_and_parameter_counts():
    hub = {  # nvidia/Cosmos-Predict2-2B-Video2World transformer/config.json
        "_class_name": "CosmosTransformer3DModel",
        "_diffusers_version": "0.34.0.dev0",
        "adaln_lora_dim": 256,
        "attention_head_dim": 128,
        "concat_padding_mask": True,
        "extra_pos_embed_type": None,
        "in_channels": 17,
        "max_size": [128, 240, 240],
        "mlp_ratio": 4.0,
        "num_attention_heads": 16,
        "num_layers": 28,
        "out_channels": 16,
        "patch_size": [1, 2, 2],
        "rope_scale": [1.0, 3.0, 3.0],
        "text_embed_dim": 1024,
    }
    cfg = CosmosTransformerConfig.from_config(hub)
    assert cfg == COSMOS_TRANSFORMER_PRESETS["cosmos-predict2-2b-video2world"] and cfg.dim == 2048
    with pytest.raises(ValueError, match="unknown Cosmos transformer config keys"):
        CosmosTransformerConfig.from_config({**hub, "num_heads": 16})
    with pytest.raises(NotImplementedError, match="Transfer2.5"):
        CosmosTransformerConfig.from_config({**hub, "controlnet_block_every_n": 7})
    counts = {  # spec C.1: the real checkpoints' parameter counts
        "cosmos-1.0-diffusion-7b-text2world": 7_236_192_256,
        "cosmos-predict2-2b-text2image": 1_956_405_248,
        "cosmos-predict2-14b-text2image": 14_265_265_152,
        "cosmos-predict2-2b-video2world": 1_956_413_440,
        "cosmos-predict2.5-2b": 2_059_174_912,
    }
    for name, n in counts.items():
        with torch.device("meta"):
            model = CosmosTransformer(COSMOS_TRANSFORMER_PRESETS[name])
        assert sum(p.numel() for p in model.parameters()) == n, name


def test_module_names_are_the_diffusers_keys():
    """Every diffusers key is a module key or a source of a fused projection, and nothing else exists."""
    from diffusers import CosmosTransformer3DModel

    for config in CONFIGS.values():
        with torch.device("meta"):
            ref = CosmosTransformer3DModel(**config)
            model = CosmosTransformer(CosmosTransformerConfig.from_config(dict(ref.config)))
        ours = set()
        for name, _ in model.named_parameters():
            owner, _, leaf = name.rpartition(".")
            sources = getattr(model.get_submodule(owner), "sources", None)
            parent = owner.rpartition(".")[0]
            ours |= {f"{parent}.{s}.{leaf}" for s in sources} if sources else {name}
        assert ours == set(ref.state_dict())


def test_bad_inputs_raise(pair):
    _, model = pair("v2w")
    x, t, ctx = inputs(grid=(2, 4, 4))
    cond = torch.zeros(2, 1, 2, 4, 4)
    with pytest.raises(ValueError, match="condition_mask channel"):
        model(x[:, :15], t, ctx, condition_mask=cond)  # 17 input channels = 16 latent + the mask
    with pytest.raises(ValueError, match="multiples of patch"):
        model(x[..., :3], t, ctx, condition_mask=cond[..., :3])
    with pytest.raises(ValueError, match="timestep"):
        model(x, t[:, None], ctx, condition_mask=cond)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(x, t, ctx[..., :8], condition_mask=cond)
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.zeros(1, 16, 1, 4, 40), t[:1], ctx[:1], condition_mask=torch.zeros(1, 1, 1, 4, 40))


def test_flops_match_counter_and_scale(pair):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    _, model = pair("predict2.5")
    x, t, ctx = inputs(B=1, grid=(2, 4, 6), ctx_dim=COSMOS_PREDICT25["crossattn_proj_in_channels"])
    cond = torch.zeros(1, 1, 2, 4, 6)
    # The math SDPA path runs attention as two bmm the counter sees (the fused CPU kernel is not counted).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x[:, :16], t, ctx, condition_mask=cond)
    assert model.flops(2, 4, 6, text_len=7) == counter.get_total_flops()
    f = [model.flops(k, 4, 6, text_len=7) for k in (1, 2, 3)]
    n, D = 2 * 3, model.cfg.dim  # tokens per latent frame
    assert f[0] > 0 and f[2] - 2 * f[1] + f[0] == 2 * model.cfg.num_layers * 4 * D * n * n
