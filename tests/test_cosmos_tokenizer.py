"""CosmosVAE against diffusers' AutoencoderKLCosmos on identical tiny random weights (CPU, float32)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dit_rt.demo import randomize
from dit_rt.models.cosmos.tokenizer import CosmosVAE, CosmosVAEConfig, build_from_folder

# Attention at resolution 8 puts spatial + temporal attention into encoder down block 1 and decoder up block
# 1 as well as the mid blocks, so every module kind of the real model (and the optional ones) runs.
TINY = dict(
    encoder_block_out_channels=(8, 16, 16, 16),
    decode_block_out_channels=(16, 16, 16, 16),
    attention_resolutions=(8,),
    resolution=64,
    num_layers=1,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _reference(seed: int = 3, **overrides):
    from diffusers import AutoencoderKLCosmos

    return randomize(AutoencoderKLCosmos(**{**TINY, **overrides}).eval(), seed, std=0.1)


def _pair(ref) -> CosmosVAE:
    ours = CosmosVAE(CosmosVAEConfig.from_config(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


@pytest.fixture(scope="module")
def models():
    ref = _reference()
    return ref, _pair(ref)


def _video(b, t, h, w, seed=0):
    return torch.rand(b, 3, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latents(b, t, h, w, seed=1):
    return torch.randn(b, 16, t, h, w, generator=torch.Generator().manual_seed(seed))


def _close(a, b, rtol=2e-6):
    """Max abs error within rtol of the reference's magnitude (the random decoder's outputs reach ~100)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert scale > 0.1, scale  # not vacuous
    assert err <= rtol * scale, (err, scale)


def test_real_config_names_and_shapes():
    from diffusers import AutoencoderKLCosmos

    with torch.device("meta"):
        ref, ours = AutoencoderKLCosmos(), CosmosVAE()
    want = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == want
    assert sum(v.numel() for v in ours.parameters()) == 105_653_696  # spec C.4.1
    assert ours.config.latents_mean == tuple(ref.config.latents_mean)
    assert ours.config.latents_std == tuple(ref.config.latents_std)


@pytest.mark.parametrize("t,h,w,channels_last", [(1, 16, 24, False), (9, 32, 48, True), (17, 16, 16, False)])
def test_encode(models, t, h, w, channels_last):
    ref, ours = models
    x = _video(2, t, h, w)
    with torch.no_grad():
        want = ref.encode(x).latent_dist.mode()
    got = ours.encode(x, channels_last=channels_last)
    assert got.mean.shape == (2, 16, 1 + (t - 1) // 8, h // 8, w // 8)
    _close(got.mode(), want)
    assert got.sample(torch.Generator().manual_seed(0)) is got.mean  # deterministic, as the reference


@pytest.mark.parametrize("t,h,w", [(1, 2, 3), (2, 4, 6), (5, 2, 2)])
def test_decode_whole_and_chunked(models, t, h, w):
    ref, ours = models
    z = _latents(2, t, h, w)
    with torch.no_grad():
        want = ref.decode(z).sample
    whole = ours.decode(z, chunk=None)
    assert whole.shape == (2, 3, 1 + 8 * (t - 1), 8 * h, 8 * w)
    _close(whole, want)
    # The causal cache makes any chunking the same computation as one pass (convs of other shapes aside).
    for chunk in sorted({1, 2, 3, t}):
        _close(ours.decode(z, chunk=chunk), whole)
    _close(ours.decode(z, chunk=2, channels_last=True), want)


def test_rearrange_patching():
    ref = _reference(seed=5, patch_type="rearrange")
    ours = _pair(ref)
    x, z = _video(1, 9, 16, 16), _latents(1, 3, 2, 2)
    with torch.no_grad():
        want_z, want_x = ref.encode(x).latent_dist.mode(), ref.decode(z).sample
    _close(ours.encode(x).mean, want_z)
    _close(ours.decode(z, chunk=1), want_x)


def test_build_from_hub_folder(models, tmp_path):
    ref, _ = models
    ref.save_pretrained(tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert CosmosVAEConfig.from_config(cfg).encoder_block_out_channels == (8, 16, 16, 16)
    from dit_rt import loaders

    with torch.device("meta"):
        vae = build_from_folder(tmp_path)
    loaders.load_weights(vae, tmp_path, device=torch.device("cpu"), dtype=torch.float32)
    z = _latents(1, 2, 2, 2)
    with torch.no_grad():
        want = ref.decode(z).sample
    _close(vae.eval().decode(z), want)


def test_denormalize_latents_matches_pipeline_formula(models):
    _, ours = models
    cfg = ours.config
    z = _latents(2, 3, 2, 2)
    mean = torch.tensor(cfg.latents_mean).view(1, 16, -1, 1, 1)[:, :, :3]
    std = torch.tensor(cfg.latents_std).view(1, 16, -1, 1, 1)[:, :, :3]
    assert mean[0, 1, 0, 0, 0] == cfg.latents_mean[16]  # channel-major: channel c, frame t at c * 16 + t
    assert torch.equal(ours.denormalize_latents(z, 0.5), z * std / 0.5 + mean)
    with torch.device("meta"):  # a config without statistics; the helper needs no weights
        plain = CosmosVAE(CosmosVAEConfig(latents_mean=None, latents_std=None))
    assert torch.equal(plain.denormalize_latents(z, 0.5), z / 0.5)


def test_bad_inputs_raise(models):
    _, ours = models
    with pytest.raises(ValueError, match="1 \\+ 8k"):
        ours.encode(_video(1, 5, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(_video(1, 9, 12, 16))
    with pytest.raises(ValueError, match="latents"):
        ours.decode(torch.zeros(1, 4, 2, 2, 2))
    with pytest.raises(ValueError, match="patch_type"):
        CosmosVAEConfig(patch_type="db2")


# ------------------------------------------------------------------------------------- parallel decode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stripe_worker(rank: int, world: int, port: int, out: str, state: dict, z: torch.Tensor):
    from dit_rt.parallel.vae import parallel_decode

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    vae = CosmosVAE(CosmosVAEConfig(**TINY)).eval()
    vae.load_state_dict(state)
    video = parallel_decode(vae, z, dist.group.WORLD, chunk=1)
    torch.save(video, Path(out) / f"{rank}.pt")
    dist.destroy_process_group()


def test_parallel_stripe_decode_matches_one_process(models, tmp_path):
    """Latent rows split over 2 gloo processes (halo convs, gathered spatial attention, all-reduced
    GroupNorm statistics) give the one-process frames."""
    _, ours = models
    z = _latents(1, 2, 4, 3)
    want = ours.decode(z, chunk=None)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    mp.start_processes(
        _stripe_worker, args=(2, _free_port(), str(tmp_path), state, z), nprocs=2, start_method="fork"
    )
    for rank in range(2):
        _close(torch.load(tmp_path / f"{rank}.pt"), want)


def test_bf16_decode_error_at_most_twice_the_reference_bf16_error():
    ref = _reference(seed=7)
    ours = _pair(ref)
    z = _latents(1, 3, 2, 3)
    with torch.no_grad():
        exact = ref.decode(z).sample
        ref.to(torch.bfloat16)
        ref_err = (ref.decode(z.bfloat16()).sample.float() - exact).abs().max()
    ours_err = (ours.to(torch.bfloat16).decode(z.bfloat16(), chunk=1).float() - exact).abs().max()
    assert 0 < ours_err <= 2 * ref_err, (ours_err, ref_err)
