"""Flux2Transformer against diffusers' Flux2Transformer2DModel on identical tiny random weights (CPU,
float32), loaded from the Hub layout (save_pretrained): text-to-image token grids and reference-image tokens
with their own position ids, as Flux2Pipeline builds them."""

from __future__ import annotations

import copy

import pytest
import torch

from dit_rt.components import build_component
from dit_rt.models.flux import FLUX2_TRANSFORMER_PRESETS, Flux2Transformer, Flux2TransformerConfig
from dit_rt.ops import Linear
from dit_rt.ops.linear import quantize_
from tests.tiny_flux2 import make_flux2_transformer

INDEX = {"transformer": ["diffusers", "Flux2Transformer2DModel"]}


def load_from_hub_layout(ref, tmp_path) -> Flux2Transformer:
    ref.save_pretrained(str(tmp_path / "transformer"), safe_serialization=True)
    model = build_component(tmp_path, INDEX, "transformer", device=torch.device("cpu"), dtype=torch.float32)
    assert isinstance(model, Flux2Transformer)
    return model


def grid_ids(h: int, w: int, t: int = 0) -> torch.Tensor:
    """(t, row, col, 0) row-major: Flux2Pipeline's ids of a latent grid (t = 10, 20, ... for references)."""
    ids = torch.zeros(h, w, 4)
    ids[..., 0] = t
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(-1, 4)


def inputs(ref, B=2, text_len=5, grid=(3, 4), refs=(), seed=0, guidance=True):
    """Latent tokens of an h x w grid plus reference grids after them; text ids (0, 0, 0, l)."""
    cfg = ref.config
    g = torch.Generator().manual_seed(seed)
    ids = [grid_ids(*grid)] + [grid_ids(h, w, 10 * (i + 1)) for i, (h, w) in enumerate(refs)]
    img_ids = torch.cat(ids)
    txt_ids = torch.zeros(text_len, 4)
    txt_ids[:, 3] = torch.arange(text_len)
    kw = dict(
        hidden_states=torch.randn(B, len(img_ids), cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(B, text_len, cfg.joint_attention_dim, generator=g),
        timestep=torch.linspace(0.9, 0.2, B),  # sigma: the pipeline's timestep / 1000
        img_ids=img_ids,
        txt_ids=txt_ids,
    )
    if guidance:
        kw["guidance"] = torch.full((B,), 4.0)
    return kw


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    ref = make_flux2_transformer()
    return ref, load_from_hub_layout(ref, tmp_path_factory.mktemp("flux2"))


@torch.no_grad()
@pytest.mark.parametrize(
    "grid,text_len,refs",
    [((3, 4), 5, ()), ((1, 1), 1, ()), ((2, 3), 7, ((2, 2),)), ((2, 2), 4, ((3, 2), (1, 4)))],
)
def test_matches_diffusers(dev, grid, text_len, refs):
    ref, model = dev
    kw = inputs(ref, grid=grid, text_len=text_len, refs=refs)
    assert rel(model(**kw), ref(**kw, return_dict=False)[0]) < 1e-5


@torch.no_grad()
def test_without_guidance_embeds(tmp_path):
    ref = make_flux2_transformer(guidance_embeds=False)
    model = load_from_hub_layout(ref, tmp_path)
    assert model.time_guidance_embed.guidance_embedder is None
    kw = inputs(ref, guidance=False)
    assert rel(model(**kw), ref(**kw, return_dict=False)[0]) < 1e-5


@torch.no_grad()
def test_projections_and_shared_modulation(dev):
    _, model = dev
    fused = {n: m.sources for n, m in model.named_modules() if isinstance(m, Linear) and m.sources}
    assert fused == {
        f"transformer_blocks.{i}.attn.{name}": sources
        for i in range(2)
        for name, sources in (
            ("to_qkv", ("to_q", "to_k", "to_v")),
            ("add_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")),
        )
    }
    # every block projection is a dit_rt Linear without bias (formats apply to them all)
    linears = [n for n, m in model.named_modules() if isinstance(m, Linear)]
    assert len(linears) == 2 * 8 + 2 * 2  # double: qkv x 2, out x 2, SwiGLU x 2 x 2; single: 2
    assert all(m.bias is None for m in model.modules() if isinstance(m, (Linear, torch.nn.Linear)))
    # modulation Linears are global: no block holds one
    assert not any("linear" in n for n, _ in model.transformer_blocks.named_parameters() if "ff" not in n)


@torch.no_grad()
def test_batch_items_are_independent(dev):
    ref, model = dev
    kw = inputs(ref, refs=((2, 2),))
    out = model(**kw)
    batched = ("hidden_states", "encoder_hidden_states", "timestep", "guidance")
    for i in range(2):
        one = {k: (v[i : i + 1] if k in batched else v) for k, v in kw.items()}
        assert rel(model(**one), out[i : i + 1]) < 1e-5
    # 3-D ids (the pipeline's [B, L, 4], first row used) give the same output
    kw3 = dict(kw, img_ids=kw["img_ids"].expand(2, -1, -1), txt_ids=kw["txt_ids"].expand(2, -1, -1))
    assert torch.equal(model(**kw3), out)


def test_bad_inputs(dev):
    ref, model = dev
    kw = inputs(ref)
    with pytest.raises(ValueError, match="needs guidance"):
        model(**dict(kw, guidance=None))
    with pytest.raises(ValueError, match=r"img_ids must be \[L, 4\]"):
        model(**dict(kw, img_ids=kw["img_ids"][:, :3]))


def test_config():
    dev = FLUX2_TRANSFORMER_PRESETS["flux.2-dev"]
    assert (dev.dim, dev.mlp_dim, dev.out_channels, dev.axes_dims_rope) == (6144, 18432, 128, (32,) * 4)
    with pytest.raises(ValueError, match="unknown FLUX.2 transformer config keys"):
        Flux2TransformerConfig.from_config({"num_layers": 1, "bogus": 2})
    with pytest.raises(ValueError, match="axes_dims_rope"):
        Flux2TransformerConfig(attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 4, 4))


def test_flops_and_parameters_at_full_size():
    with torch.device("meta"):
        model = Flux2Transformer(FLUX2_TRANSFORMER_PRESETS["flux.2-dev"])
    # FLUX.2-dev is a 32B transformer (spec B.3's shapes)
    assert 32.0e9 < sum(p.numel() for p in model.parameters()) < 32.3e9
    # 4096 image + 512 text tokens: every one of the 56 blocks holds 13 D^2 weights per token (double: q, k,
    # v, out, SwiGLU in 6 and out 3; single: qkv + gate + up 9, out 4), 2 FLOPs each, plus its attention
    L, D = 4096 + 512, 6144
    blocks = 56 * (2 * 13 * D * D * L + 4 * L * L * D)
    assert blocks < model.flops(4096) < 1.01 * blocks


@torch.no_grad()
@pytest.mark.parametrize("fmt", ["fp8-per-tensor", "fp8-rowwise"])
def test_fp8_dataflow_with_fa3_fp8(dev, monkeypatch, fmt):
    """The fp8 hand-offs forced as on an fp8 GPU (tests/test_flux_fp8.py's probes): fp8-per-tensor block
    projections take the modulated LayerNorms' codes, the single blocks' q / k reach fa3-fp8 as RMSNorm +
    RoPE codes, the double blocks' joint sequence as tensors; the error stays within a small multiple of
    plain torch's in the same precision."""
    from tests.test_flux_fp8 import RATIO, Probe, plain_model, record_linear_inputs
    from tests.test_flux_fp8 import rel as fp8_rel

    ref, model = dev
    kw = inputs(ref, text_len=7, refs=((2, 2),))
    exact = model(**kw)
    plain = fp8_rel(plain_model(model, fmt)(**kw), exact)
    m = quantize_(copy.deepcopy(model), fmt)
    seen = record_linear_inputs(m)
    probe = Probe(m, monkeypatch)
    err = fp8_rel(m(**kw), exact)
    L = kw["hidden_states"].shape[1] + 7
    assert [(n.split(".")[0], codes, lq) for n, codes, lq in probe.calls] == [
        ("transformer_blocks", (False, False, False), L)
    ] * 2 + [("single_transformer_blocks", (True, True, False), L)] * 2
    takes = {"attn.to_qkv", "attn.add_qkv", "attn.to_qkv_mlp_proj", "ff.linear_in", "ff_context.linear_in"}
    for name, calls in seen.items():
        assert calls == [fmt == "fp8-per-tensor" and name.split(".", 2)[2] in takes], (name, calls)
    assert 0 < err <= RATIO * plain, f"{fmt} + fa3-fp8: {err:.3g} vs plain torch {plain:.3g}"
