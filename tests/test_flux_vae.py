"""FluxVAE against diffusers' AutoencoderKL on identical tiny random weights (CPU, float32): encode posterior,
posterior sampling, decode, the BFL `ae.safetensors` key map, and the parallel stripe decode (gloo)."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_parallel_pipeline import _error, _free_port
from tiny_checkpoints import FLUX_VAE, make_flux_vae

from dit_rt.components import build_component
from dit_rt.loaders import detect_format, load_weights, read_config
from dit_rt.models.flux.vae import FluxVAE, FluxVAEConfig

TOL = 1e-5  # relative to the reference's largest magnitude
INDEX = {"vae": ["diffusers", "AutoencoderKL"]}
# Beyond FLUX.1: SD-style quant convs, 4 latent channels, three levels, two resnets per encoder level.
GENERAL = dict(
    FLUX_VAE,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(8, 16, 16),
    layers_per_block=2,
    latent_channels=4,
    use_quant_conv=True,
    use_post_quant_conv=True,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _saved_pair(root, name: str, config: dict):
    """(reference, dit_rt model) with the same weights, dit_rt's loaded from the Hub-layout folder."""
    from diffusers import AutoencoderKL

    ref = make_flux_vae() if config is FLUX_VAE else _randomize_general(AutoencoderKL(**config).eval())
    folder = root / name
    ref.save_pretrained(str(folder / "vae"), safe_serialization=True)
    ours = build_component(folder, INDEX, "vae", device=torch.device("cpu"), dtype=torch.float32)
    return ref, ours, folder


def _randomize_general(model):
    from dit_rt.demo import randomize

    return randomize(model, seed=15, std=0.1)


@pytest.fixture(scope="module", params=["flux", "general"])
def pair(request, tmp_path_factory):
    config = FLUX_VAE if request.param == "flux" else GENERAL
    ref, ours, folder = _saved_pair(tmp_path_factory.mktemp("vae"), request.param, config)
    return ref, ours, folder


@pytest.fixture(scope="module")
def flux_pair(tmp_path_factory):
    return _saved_pair(tmp_path_factory.mktemp("flux_vae"), "flux", FLUX_VAE)


def _close(got, want, tol=TOL):
    assert got.shape == want.shape, (got.shape, want.shape)
    err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
    assert err <= tol, err


def _images(b, h, w, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_real_config_names_and_shapes():
    from diffusers import AutoencoderKL

    real = dict(
        FLUX_VAE, block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32
    )  # spec A.8.1
    with torch.device("meta"):
        ref, ours = AutoencoderKL(**real), FluxVAE(FluxVAEConfig.from_config(real))
    assert ours.config == FluxVAEConfig()  # the defaults are FLUX.1's
    want = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == want
    assert "quant_conv.weight" not in want and ours.quant_conv is None


def test_config_from_hub_folder(pair):
    ref, ours, folder = pair
    cfg = FluxVAEConfig.from_config(read_config(folder / "vae"))
    assert ours.config == cfg
    assert (ours.scaling_factor, ours.shift_factor) == (ref.config.scaling_factor, ref.config.shift_factor)


@pytest.mark.parametrize("h,w,channels_last", [(32, 48, False), (40, 24, True)])
def test_encode(pair, h, w, channels_last):
    ref, ours, _ = pair
    x = _images(2, h, w)
    with torch.no_grad():
        want = ref.encode(x).latent_dist
    got = ours.encode(x, channels_last=channels_last)
    s = ours.config.spatial_scale
    assert got.mean.shape == (2, ours.config.latent_channels, h // s, w // s)
    _close(got.mean, want.mean)
    _close(got.logvar, want.logvar)
    _close(got.std, want.std)


def test_posterior_sample_same_noise(pair):
    # Same generator state on both sides: the noise is one randn of the mean's shape, dtype and device.
    ref, ours, _ = pair
    x = _images(2, 32, 32, seed=3)
    with torch.no_grad():
        want = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(7))
    got = ours.encode(x).sample(generator=torch.Generator().manual_seed(7))
    _close(got, want)
    assert torch.equal(ours.encode(x).mode(), ours.encode(x).mean)


@pytest.mark.parametrize("h,w,chunk,channels_last", [(4, 6, None, False), (5, 3, 1, True)])
def test_decode(pair, h, w, chunk, channels_last):
    ref, ours, _ = pair
    z = torch.randn(2, ours.config.latent_channels, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.decode(z).sample
    got = ours.decode(z, chunk=chunk, channels_last=channels_last)
    _close(got, want)


def test_latent_normalisation_is_fluxpipelines(flux_pair):
    _, ours, _ = flux_pair
    z = torch.randn(1, 16, 2, 2)
    torch.testing.assert_close(ours.normalize_latents(z), (z - 0.1159) * 0.3611)
    torch.testing.assert_close(ours.denormalize_latents(ours.normalize_latents(z)), z)


def test_decode_flops(flux_pair):
    _, ours, _ = flux_pair
    one = ours.decode_flops((1, 16, 4, 6))
    assert one > 0 and ours.decode_flops((3, 16, 4, 6)) == 3 * one
    # FLUX.1 at 1024^2: about 10.5 TFLOP, nearly all of it in the convs at full resolution.
    with torch.device("meta"):
        real = FluxVAE()
    assert 10.0e12 < real.decode_flops((1, 16, 128, 128)) < 11.0e12


def test_bad_inputs_raise(flux_pair):
    _, ours, _ = flux_pair
    with pytest.raises(ValueError, match="encode needs"):
        ours.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="decode needs"):
        ours.decode(torch.zeros(1, 4, 2, 2))


# ---------------------------------------------------------------- BFL / LDM `ae.safetensors` (spec A.8.5)


def _to_bfl(key: str, t: torch.Tensor, levels: int = 4) -> tuple[str, torch.Tensor]:
    """diffusers AutoencoderKL key -> the BFL/LDM name, written independently of the loader's table."""
    if re.search(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", key):
        t = t[:, :, None, None]  # 1x1 convs in the original
    key = key.replace("mid_block.attentions.0.group_norm", "mid.attn_1.norm")
    key = re.sub(r"mid_block\.attentions\.0\.to_([qkv])\.", r"mid.attn_1.\1.", key)
    key = key.replace("mid_block.attentions.0.to_out.0.", "mid.attn_1.proj_out.")
    key = key.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
    m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)", key)
    if m:
        part = "block." if m[2] == "resnets" else "upsample."
        key = f"decoder.up.{levels - 1 - int(m[1])}.{part}{m[3]}"
    return key, t.contiguous()


def test_bfl_key_map_round_trip(flux_pair, tmp_path):
    from safetensors.torch import save_file

    ref, ours, _ = flux_pair
    bfl = dict(_to_bfl(k, v) for k, v in ref.state_dict().items())
    assert len(bfl) == len(ref.state_dict())
    assert "decoder.up.0.block.0.nin_shortcut.weight" in bfl  # the reversed level order is exercised
    assert bfl["encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    save_file(bfl, str(tmp_path / "ae.safetensors"))
    assert detect_format(bfl) == "flux-vae-original"
    with torch.device("meta"):
        model = FluxVAE(ours.config)
    load_weights(model, tmp_path / "ae.safetensors", device="cpu", key_map="auto")
    want = ref.state_dict()
    got = model.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


# ------------------------------------------------------------------------- parallel stripe decode (gloo)

ROWS = (7, 2)  # uneven over 2 ranks, and one latent row per rank


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    from dit_rt.parallel.vae import StripeDecode, parallel_decode

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    with torch.device("meta"):
        vae = FluxVAE(FluxVAEConfig.from_config(read_config(f"{folder}/vae")))
    load_weights(vae, f"{folder}/vae", device="cpu", dtype=torch.float32)
    group, results = dist.group.WORLD, {}
    for rows in ROWS:
        z = torch.randn(2, 16, rows, 5, generator=torch.Generator().manual_seed(rows))
        ref = vae.decode(z)
        results[f"rows{rows}"] = _error(parallel_decode(vae, z, group, chunk=None), ref)
        out = parallel_decode(vae, z, group, chunk=1, channels_last=True)
        results[f"rows{rows}_channels_last"] = _error(out, vae.decode(z, channels_last=True))
        # Control: stripes decoded without the hooks must differ, or the cases above prove nothing.
        stripes = StripeDecode(group, rows)
        results[f"rows{rows}_control"] = _error(stripes.gather(vae.decode(stripes.stripe(z))), ref)
    with open(f"{folder}/rank{rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def test_parallel_decode_two_ranks_match_one(flux_pair):
    _, _, folder = flux_pair
    mp.start_processes(_worker, args=(2, _free_port(), str(folder)), nprocs=2, start_method="fork")
    for rank in range(2):
        results = json.loads((folder / f"rank{rank}.json").read_text())
        for rows in ROWS:
            assert results[f"rows{rows}"] <= TOL, (rank, rows, results)
            assert results[f"rows{rows}_channels_last"] <= TOL, (rank, rows, results)
            assert results[f"rows{rows}_control"] > 1e-3, (rank, rows, results)
