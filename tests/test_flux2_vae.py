"""Flux2VAE against diffusers' AutoencoderKLFlux2 on identical tiny random weights (CPU, float32): the encode
posterior, decode, and the transformer-side latent form (2x2 patchify + batch-norm statistics) as
Flux2Pipeline computes it."""

from __future__ import annotations

import pytest
import torch

from dit_rt.components import build_component
from dit_rt.models.flux.vae2 import Flux2VAE, Flux2VAEConfig
from tests.tiny_flux2 import FLUX2_VAE, LATENT_CHANNELS, make_flux2_vae

INDEX = {"vae": ["diffusers", "AutoencoderKLFlux2"]}


def err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error relative to the reference's largest magnitude."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = make_flux2_vae()
    folder = tmp_path_factory.mktemp("flux2_vae")
    ref.save_pretrained(str(folder / "vae"), safe_serialization=True)
    ours = build_component(folder, INDEX, "vae", device=torch.device("cpu"), dtype=torch.float32)
    assert isinstance(ours, Flux2VAE)
    return ref, ours


@torch.no_grad()
def test_encode_matches_diffusers(pair):
    ref, ours = pair
    x = torch.rand(2, 3, 48, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = ref.encode(x).latent_dist
    got = ours.encode(x)
    assert got.mean.shape == (2, LATENT_CHANNELS, 6, 4)
    assert err(got.mode(), expected.mode()) < 1e-5
    assert err(got.logvar, expected.logvar) < 1e-5


@torch.no_grad()
def test_decode_matches_diffusers(pair):
    ref, ours = pair
    z = torch.randn(1, LATENT_CHANNELS, 4, 6, generator=torch.Generator().manual_seed(1))
    expected = ref.decode(z, return_dict=False)[0]
    assert expected.shape == (1, 3, 32, 48)
    assert err(ours.decode(z), expected) < 1e-5


@torch.no_grad()
def test_transformer_latents_match_flux2_pipeline(pair):
    """to_transformer = Flux2Pipeline._encode_vae_image's patchify + normalize; from_transformer its
    decode-side inverse; the statistics are the checkpoint's (random here, so a wrong order shows)."""
    from diffusers import Flux2Pipeline

    ref, ours = pair
    assert torch.equal(ours.bn.running_var, ref.bn.running_var)
    z = torch.randn(2, LATENT_CHANNELS, 6, 8, generator=torch.Generator().manual_seed(2))
    mean = ref.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    expected = (Flux2Pipeline._patchify_latents(z) - mean) / std
    got = ours.to_transformer(z)
    assert got.shape == (2, 4 * LATENT_CHANNELS, 3, 4)
    assert torch.equal(got, expected)
    back = Flux2Pipeline._unpatchify_latents(got * std + mean)
    assert torch.equal(ours.from_transformer(got), back)
    assert torch.allclose(back, z, atol=1e-6)


def test_config():
    dev = Flux2VAEConfig()
    assert (dev.latent_channels, dev.patch_channels, dev.spatial_scale) == (32, 128, 8)
    assert dev.use_quant_conv and dev.use_post_quant_conv
    cfg = Flux2VAEConfig.from_config(dict(FLUX2_VAE, patch_size=[2, 2], _class_name="AutoencoderKLFlux2"))
    assert cfg.patch_channels == 4 * LATENT_CHANNELS
    with pytest.raises(ValueError, match="patchified 2x2"):
        Flux2VAEConfig(patch_size=(1, 1))
    with pytest.raises(ValueError, match="decoder_block_out_channels"):
        Flux2VAEConfig(decoder_block_out_channels=(64, 64, 64, 64))
