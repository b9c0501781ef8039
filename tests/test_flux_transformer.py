"""FluxTransformer against diffusers' FluxTransformer2DModel on identical tiny random weights (CPU,
float32), loaded from the Hub layout (save_pretrained) and from a BFL single file of the same weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dit_rt.components import build_component
from dit_rt.loaders import detect_format, load_weights, scan
from dit_rt.models.flux import FLUX_TRANSFORMER_PRESETS, FluxTransformer, FluxTransformerConfig
from dit_rt.ops import Linear
from tests.tiny_checkpoints import FLUX_TRANSFORMER, make_flux_transformer

INDEX = {"transformer": ["diffusers", "FluxTransformer2DModel"]}


def load_from_hub_layout(ref, tmp_path) -> FluxTransformer:
    ref.save_pretrained(str(tmp_path / "transformer"), safe_serialization=True)
    model = build_component(tmp_path, INDEX, "transformer", device=torch.device("cpu"), dtype=torch.float32)
    assert isinstance(model, FluxTransformer)
    return model


def inputs(ref, B=2, text_len=5, grid=(3, 4), seed=0, guidance=True):
    """Packed latents on an h x w token grid with FluxPipeline's ids (img (0, row, col), text zeros)."""
    cfg = ref.config
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    x = torch.randn(B, h * w, cfg.in_channels, generator=g)
    ctx = torch.randn(B, text_len, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(B, cfg.pooled_projection_dim, generator=g)
    t = torch.linspace(0.9, 0.2, B)  # sigma: the pipeline's timestep / 1000
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    kw = dict(
        hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
        img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(text_len, 3),
    )  # fmt: skip
    if guidance:
        kw["guidance"] = torch.tensor([3.5, 1.0][:B] + [2.0] * (B - 2))
    return kw


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    ref = make_flux_transformer()
    return ref, load_from_hub_layout(ref, tmp_path_factory.mktemp("flux_dev"))


@torch.no_grad()
@pytest.mark.parametrize("grid,text_len", [((3, 4), 5), ((1, 1), 1), ((4, 2), 7)])
def test_matches_diffusers(dev, grid, text_len):
    ref, model = dev
    kw = inputs(ref, grid=grid, text_len=text_len)
    assert rel(model(**kw), ref(**kw, return_dict=False)[0]) < 1e-5


@torch.no_grad()
def test_without_guidance_embeds(tmp_path):
    ref = make_flux_transformer(guidance_embeds=False)  # FLUX.1-schnell's layout
    model = load_from_hub_layout(ref, tmp_path)
    assert model.time_text_embed.guidance_embedder is None
    kw = inputs(ref, guidance=False)
    assert rel(model(**kw), ref(**kw, return_dict=False)[0]) < 1e-5
    with pytest.raises(ValueError, match="takes no guidance"):
        model(**kw, guidance=torch.ones(2))


@torch.no_grad()
def test_projections_are_fused(dev):
    _, model = dev
    fused = {n: m.sources for n, m in model.named_modules() if isinstance(m, Linear) and m.sources}
    assert fused["transformer_blocks.0.attn.to_qkv"] == ("to_q", "to_k", "to_v")
    assert fused["transformer_blocks.0.attn.add_qkv"] == ("add_q_proj", "add_k_proj", "add_v_proj")
    assert fused["single_transformer_blocks.1.qkv_mlp"] == ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")


@torch.no_grad()
def test_batch_items_are_independent(dev):
    ref, model = dev
    kw = inputs(ref)
    out = model(**kw)
    for i in range(2):
        one = {k: (v[i : i + 1] if k in ("hidden_states", "encoder_hidden_states", "pooled_projections",
                                         "timestep", "guidance") else v) for k, v in kw.items()}  # fmt: skip
        assert rel(model(**one), out[i : i + 1]) < 1e-5
    # 3-D ids (deprecated in the reference, first row used) give the same output
    kw3 = dict(
        kw, img_ids=kw["img_ids"][None].expand(2, -1, -1), txt_ids=kw["txt_ids"][None].expand(2, -1, -1)
    )
    assert torch.equal(model(**kw3), out)


def to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FLUX.1 state dict under Black Forest Labs' key names (spec A.4), written independently of
    the loader's table: fused qkv / linear1, final modulation as (shift, scale)."""
    sd, out = dict(sd), {}

    def take(src: str, dst: str) -> None:
        for p in ("weight", "bias"):
            if f"{src}.{p}" in sd:
                out[f"{dst}.{p}"] = sd.pop(f"{src}.{p}")

    def cat(srcs, dst: str) -> None:
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = torch.cat([sd.pop(f"{s}.{p}") for s in srcs])

    take("x_embedder", "img_in")
    take("context_embedder", "txt_in")
    for ours, theirs in (("timestep", "time_in"), ("guidance", "guidance_in"), ("text", "vector_in")):
        take(f"time_text_embed.{ours}_embedder.linear_1", f"{theirs}.in_layer")
        take(f"time_text_embed.{ours}_embedder.linear_2", f"{theirs}.out_layer")
    for i in range(FLUX_TRANSFORMER["num_layers"]):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        take(d + "norm1.linear", b + "img_mod.lin")
        take(d + "norm1_context.linear", b + "txt_mod.lin")
        cat([d + f"attn.to_{c}" for c in "qkv"], b + "img_attn.qkv")
        cat([d + f"attn.add_{c}_proj" for c in "qkv"], b + "txt_attn.qkv")
        for ours, theirs in (("q", "query"), ("k", "key")):
            out[b + f"img_attn.norm.{theirs}_norm.scale"] = sd.pop(d + f"attn.norm_{ours}.weight")
            out[b + f"txt_attn.norm.{theirs}_norm.scale"] = sd.pop(d + f"attn.norm_added_{ours}.weight")
        take(d + "attn.to_out.0", b + "img_attn.proj")
        take(d + "attn.to_add_out", b + "txt_attn.proj")
        for s, t in (("ff", "img_mlp"), ("ff_context", "txt_mlp")):
            take(d + f"{s}.net.0.proj", b + f"{t}.0")
            take(d + f"{s}.net.2", b + f"{t}.2")
    for i in range(FLUX_TRANSFORMER["num_single_layers"]):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        take(d + "norm.linear", b + "modulation.lin")
        cat([d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"], b + "linear1")
        out[b + "norm.query_norm.scale"] = sd.pop(d + "attn.norm_q.weight")
        out[b + "norm.key_norm.scale"] = sd.pop(d + "attn.norm_k.weight")
        take(d + "proj_out", b + "linear2")
    take("proj_out", "final_layer.linear")
    for p in ("weight", "bias"):
        scale, shift = sd.pop(f"norm_out.linear.{p}").chunk(2)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    assert not sd, sorted(sd)
    return {k: v.contiguous() for k, v in out.items()}


@torch.no_grad()
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_single_file(dev, tmp_path, prefix):
    ref, model = dev
    path = tmp_path / "flux1-dev.safetensors"
    save_file({prefix + k: v for k, v in to_bfl(ref.state_dict()).items()}, str(path))
    assert detect_format(scan([path], None)) == "flux-original"
    cfg = FluxTransformerConfig.from_config(dict(ref.config))
    with torch.device("meta"):
        bfl = FluxTransformer(cfg)
    load_weights(bfl, path, device="cpu", dtype=torch.float32, key_map="auto")
    for name, p in model.state_dict().items():
        assert torch.equal(bfl.state_dict()[name], p), name
    kw = inputs(ref)
    assert torch.equal(bfl.eval()(**kw), model(**kw))


def test_config():
    dev = FLUX_TRANSFORMER_PRESETS["flux.1-dev"]
    assert (dev.dim, dev.mlp_dim, dev.out_channels, dev.axes_dims_rope) == (3072, 12288, 64, (16, 56, 56))
    assert not FLUX_TRANSFORMER_PRESETS["flux.1-schnell"].guidance_embeds
    with pytest.raises(ValueError, match="unknown FLUX transformer config keys"):
        FluxTransformerConfig.from_config({"num_layers": 1, "bogus": 2})
    with pytest.raises(ValueError, match="axes_dims_rope"):
        FluxTransformerConfig(attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 4, 4))


def test_flops_at_1024():
    with torch.device("meta"):
        model = FluxTransformer(FLUX_TRANSFORMER_PRESETS["flux.1-dev"])
    # 4096 image + 512 text tokens: every one of the 57 blocks holds 12 D^2 weights per token
    # (2 FLOPs each) plus its attention; embedders and modulation add under 1%
    L, D = 4096 + 512, 3072
    blocks = 57 * (2 * 12 * D * D * L + 4 * L * L * D)
    assert blocks < model.flops(4096) < 1.01 * blocks
