"""WanVAE against diffusers' AutoencoderKLWan on identical tiny random weights (CPU, float32)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_checkpoints import make_wan_vae

from dit_rt.models.wan.vae import VAETiling, WanVAE, WanVAEConfig

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The CI box has 2 cores shared between test processes; OpenMP spinning on both makes tiny convs crawl.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pair(ref):
    ours = WanVAE(WanVAEConfig.from_config(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


@pytest.fixture(scope="module")
def models():
    ref = make_wan_vae()
    return ref, _pair(ref)


def _video(b, t, h, w, seed=0):
    return torch.rand(b, 3, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latents(b, t, h, w, seed=1):
    return torch.randn(b, 16, t, h, w, generator=torch.Generator().manual_seed(seed))


def _close(a, b, tol=TOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= tol, err


def test_real_config_names_and_shapes():
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        ref, ours = AutoencoderKLWan(), WanVAE(WanVAEConfig())
    want = {k: v.shape for k, v in ref.state_dict().items()}
    got = {k: v.shape for k, v in ours.state_dict().items()}
    assert got == want
    assert sum(v.numel() for v in ours.parameters()) == 126_892_531  # spec B.1


@pytest.mark.parametrize(
    "t,h,w,chunk,channels_last",
    [
        (1, 32, 48, 1, False),
        (5, 48, 64, 1, True),
        (9, 32, 48, 1, False),
        (9, 32, 48, 2, True),
        (9, 32, 48, None, False),
    ],
)
def test_encode(models, t, h, w, chunk, channels_last):
    ref, ours = models
    x = _video(2, t, h, w)
    with torch.no_grad():
        want = ref.encode(x).latent_dist
    got = ours.encode(x, chunk=chunk, channels_last=channels_last)
    assert got.mean.shape == (2, 16, 1 + (t - 1) // 4, h // 8, w // 8)
    _close(got.mean, want.mean)
    _close(got.logvar, want.logvar)
    assert want.mean.abs().max() > 0.05  # the comparison is not vacuous


def test_encode_sample_matches_reference_draw(models):
    ref, ours = models
    x = _video(1, 5, 32, 48)
    with torch.no_grad():
        want = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(7))
    got = ours.encode(x).sample(generator=torch.Generator().manual_seed(7))
    _close(got, want)


@pytest.mark.parametrize(
    "t,h,w,chunk,channels_last",
    [
        (1, 4, 6, 2, False),
        (2, 6, 8, 1, True),
        (3, 4, 6, 2, False),
        (3, 4, 6, 1, True),
        (3, 4, 6, None, False),
    ],
)
def test_decode(models, t, h, w, chunk, channels_last):
    ref, ours = models
    z = _latents(2, t, h, w)
    with torch.no_grad():
        want = ref.decode(z).sample
    got = ours.decode(z, chunk=chunk, channels_last=channels_last)
    assert got.shape == (2, 3, 1 + 4 * (t - 1), 8 * h, 8 * w)
    _close(got, want)
    assert want.abs().max() > 0.05


def test_decode_clamps_as_reference():
    ref = make_wan_vae()
    with torch.no_grad():
        ref.decoder.conv_out.weight.mul_(40.0)  # push the output well past [-1, 1]
    ours = _pair(ref)
    z = _latents(1, 2, 4, 6)
    with torch.no_grad():
        want = ref.decode(z).sample
    got = ours.decode(z)
    _close(got, want)
    assert (want.abs() == 1.0).float().mean() > 0.1 and (want.abs() < 1.0).any()


def test_tiled_decode_matches_reference_tiling(models):
    ref, ours = models
    # Latent tiles of 4x4 with strides 3 (height) and 2 (width): 2 x 4 overlapping tiles, ragged edges.
    tiles = dict(
        tile_sample_min_height=32,
        tile_sample_min_width=32,
        tile_sample_stride_height=24,
        tile_sample_stride_width=16,
    )
    z = _latents(1, 2, 6, 7)
    ref.enable_tiling(**tiles)
    try:
        with torch.no_grad():
            want = ref.decode(z).sample
    finally:
        ref.disable_tiling()
    ours.enable_tiling(*tiles.values())
    try:
        got = ours.decode(z, chunk=1)
        assert ours.tiling == VAETiling(32, 32, 24, 16)
    finally:
        ours.disable_tiling()
    _close(got, want)
    # Tiling changes the result, so the match above is the tiled path's, not the plain one's.
    assert (ours.decode(z) - want).abs().max() > 1e-3
    _close(ours.decode(z, tiling=VAETiling(32, 32, 24, 16), chunk=None), want)


def test_config_from_hub_dict(models, tmp_path):
    ref, _ = models
    ref.save_config(tmp_path)
    cfg = WanVAEConfig.from_config(json.loads((tmp_path / "config.json").read_text()))
    assert cfg.base_dim == 8 and cfg.z_dim == 16 and cfg.dim_mult == (1, 2, 2, 2)
    assert cfg.num_res_blocks == 1 and cfg.temperal_downsample == (False, True, True)
    assert cfg.latents_mean == tuple(ref.config.latents_mean)
    # An older Hub config: bookkeeping keys, no decoder_base_dim, null scale factors.
    hub = {"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.33.0", "base_dim": 96, "z_dim": 16}
    hub |= {"scale_factor_temporal": None, "scale_factor_spatial": None, "attn_scales": []}
    assert WanVAEConfig.from_config(hub) == WanVAEConfig()
    with pytest.raises(ValueError, match="Wan 2.2"):
        WanVAEConfig.from_config({"z_dim": 48, "is_residual": True, "patch_size": 2})


def test_latent_normalisation_matches_pipeline_formula(models):
    _, ours = models
    cfg = WanVAEConfig()
    with torch.device("meta"):
        vae = WanVAE(cfg)  # the real model's statistics; the helpers need no weights
    z = _latents(2, 3, 4, 6)
    mean = torch.tensor(cfg.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, 16, 1, 1, 1)
    _close(vae.denormalize_latents(z), z / inv_std + mean, 1e-6)  # WanPipeline before vae.decode
    _close(vae.normalize_latents(z), (z - mean) * inv_std, 1e-6)  # WanImageToVideoPipeline after encode
    _close(vae.normalize_latents(vae.denormalize_latents(z)), z, 1e-5)
    assert ours.denormalize_latents(z).dtype == z.dtype


def test_bad_shapes_raise(models):
    _, ours = models
    with pytest.raises(ValueError, match="1 \\+ 4n"):
        ours.encode(_video(1, 6, 32, 48))
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(_video(1, 5, 30, 48))
    with pytest.raises(ValueError, match="latents"):
        ours.decode(torch.zeros(1, 4, 2, 4, 6))


def test_decode_flops_match_flop_counter(models):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    ref, ours = models
    z = _latents(1, 3, 4, 6)
    counter = FlopCounterMode(display=False)
    # The math SDPA backend runs as matmuls the counter sees (it has no formula for the CPU flash kernel).
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        ref.decode(z)
    assert ours.decode_flops(tuple(z.shape)) == counter.get_total_flops()


def test_bf16_decode_error_at_most_twice_the_reference_bf16_error():
    ref = make_wan_vae()
    ours = _pair(ref)
    z = _latents(1, 3, 4, 6)
    with torch.no_grad():
        exact = ref.decode(z).sample
        ref.to(torch.bfloat16)
        ref_err = (ref.decode(z.bfloat16()).sample.float() - exact).abs().max()
    ours_err = (ours.to(torch.bfloat16).decode(z.bfloat16(), channels_last=True).float() - exact).abs().max()
    assert 0 < ours_err <= 2 * ref_err, (ours_err, ref_err)
