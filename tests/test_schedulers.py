"""Flow schedulers against diffusers 0.42.1: schedules (exact) and step sequences (<= 1e-6)."""

from __future__ import annotations

import pytest
import torch
from tiny_checkpoints import make_unipc

from dit_rt.schedulers import FlowMatchEulerScheduler, UniPCFlowScheduler

# Wan's serialized scheduler_config.json (spec wan-cosmos E.1), as the loader will pass it.
WAN_CONFIG = {
    "_class_name": "UniPCMultistepScheduler",
    "_diffusers_version": "0.33.0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
    "use_flow_sigmas": True,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": False,
}


def run_pair(ours, ref, n, shape=(2, 4, 3, 5), model_dtype=torch.float32, seed=0, **kw):
    """Same random velocities through both schedulers; returns both trajectories."""
    ours.set_timesteps(n, **kw)
    ref.set_timesteps(n, **kw)
    g = torch.Generator().manual_seed(seed)
    x_ours = x_ref = torch.randn(shape, generator=g)
    traj_ours, traj_ref = [], []
    for i, t in enumerate(ref.timesteps):
        # A velocity that depends on the sample, like a model's, so errors would compound.
        v = (torch.randn(shape, generator=g) + 0.3 * x_ref).to(model_dtype)
        x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
        x_ours = ours.step(v, i, x_ours)
        traj_ours.append(x_ours)
        traj_ref.append(x_ref)
    return traj_ours, traj_ref


# ---- UniPC (Wan) ----


@pytest.mark.parametrize("shift", [3.0, 5.0])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 50])
def test_unipc_schedule_matches_diffusers(shift, n):
    ref = make_unipc(flow_shift=shift)
    ours = UniPCFlowScheduler.from_config(WAN_CONFIG, flow_shift=shift)
    ref.set_timesteps(n)
    ours.set_timesteps(n)
    assert ours.timesteps.dtype == torch.int64 and ours.sigmas.dtype == torch.float32
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(ours.sigmas, ref.sigmas)


def test_unipc_spec_reference_values():
    s = UniPCFlowScheduler.from_config(WAN_CONFIG)
    s.set_timesteps(50)
    assert s.timesteps[:6].tolist() == [999, 993, 986, 979, 971, 964]
    assert s.timesteps[-4:].tolist() == [208, 162, 113, 60]
    torch.testing.assert_close(
        s.sigmas[:4], torch.tensor([0.999999, 0.99325, 0.98632, 0.97919]), atol=6e-6, rtol=0
    )
    torch.testing.assert_close(s.sigmas[-3:], torch.tensor([0.11358, 0.06041, 0.0]), atol=6e-6, rtol=0)
    s = UniPCFlowScheduler.from_config(WAN_CONFIG, flow_shift=5.0)
    s.set_timesteps(40)
    assert s.timesteps[:5].tolist() == [999, 994, 989, 984, 978]
    assert s.timesteps[-3:].tolist() == [291, 211, 117]
    # Wan2.2 A14B expert switch at boundary 875 (timestep >= boundary -> high-noise expert).
    for shift, high in ((3.0, 13), (12.0, 26)):
        s = UniPCFlowScheduler.from_config(WAN_CONFIG, flow_shift=shift)
        s.set_timesteps(40)
        assert int((s.timesteps >= 875).sum()) == high


@pytest.mark.parametrize("n", [1, 2, 3, 7, 20])
@pytest.mark.parametrize("shift", [3.0, 5.0])
def test_unipc_steps_match_diffusers(n, shift):
    ours = UniPCFlowScheduler.from_config(WAN_CONFIG, flow_shift=shift)
    traj_ours, traj_ref = run_pair(ours, make_unipc(flow_shift=shift), n)
    for a, b in zip(traj_ours, traj_ref):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_unipc_bf16_model_output_and_reuse():
    """bf16 velocities with fp32 latents (the Wan pipeline), and a second run after reset()."""
    ours = UniPCFlowScheduler.from_config(WAN_CONFIG)
    ref = make_unipc()
    first = run_pair(ours, ref, 6, model_dtype=torch.bfloat16)
    for a, b in zip(*first):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # Same object, new generation: reset() (set_timesteps also resets) must clear the history.
    ours.reset()
    ref.set_timesteps(6)
    g = torch.Generator().manual_seed(3)
    x_o = x_r = torch.randn(1, 4, 2, 3, generator=g)
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(x_r.shape, generator=g)
        x_r = ref.step(v, t, x_r, return_dict=False)[0]
        x_o = ours.step(v, i, x_o)
    torch.testing.assert_close(x_o, x_r, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "options",
    [
        dict(solver_order=3),
        dict(solver_type="bh1"),
        dict(lower_order_final=False, solver_order=1),
        dict(disable_corrector=[0, 2]),
        dict(final_sigmas_type="sigma_min"),
        dict(shift_terminal=0.1),
    ],
)
def test_unipc_variants_match_diffusers(options):
    from diffusers import UniPCMultistepScheduler

    ref = UniPCMultistepScheduler.from_config({**WAN_CONFIG, **options})
    ours = UniPCFlowScheduler.from_config(WAN_CONFIG, **options)
    ref.set_timesteps(8)
    ours.set_timesteps(8)
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    traj_ours, traj_ref = run_pair(ours, ref, 8)
    if options.get("solver_type") == "bh1":
        # diffusers 0.42.1 returns NaN on bh1's last step to sigma 0 (B(h) = -inf times a zero residual);
        # the limit is the data prediction, which is what we return.
        assert torch.isnan(traj_ref[-1]).all() and torch.isfinite(traj_ours[-1]).all()
        traj_ours, traj_ref = traj_ours[:-1], traj_ref[:-1]
    for a, b in zip(traj_ours, traj_ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_unipc_karras_flow_cosmos25():
    """Cosmos-Predict2.5's UniPC: karras sigmas 200 -> 0.01 mapped to flow sigmas (spec reference values)."""
    from diffusers import UniPCMultistepScheduler

    cfg = {**WAN_CONFIG, "use_karras_sigmas": True, "sigma_max": 200.0, "sigma_min": 0.01, "flow_shift": 1.0}
    ref = UniPCMultistepScheduler.from_config(cfg)
    ours = UniPCFlowScheduler.from_config(cfg)
    ref.set_timesteps(36)
    ours.set_timesteps(36)
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    assert ours.timesteps[:4].tolist() == [995, 994, 993, 992]
    torch.testing.assert_close(ours.sigmas[:2], torch.tensor([0.99502, 0.99421]), atol=6e-6, rtol=0)
    for a, b in zip(*run_pair(ours, ref, 36)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_unipc_dynamic_shift_mu():
    from diffusers import UniPCMultistepScheduler

    cfg = {**WAN_CONFIG, "use_dynamic_shifting": True}
    ref = UniPCMultistepScheduler.from_config(cfg)
    ours = UniPCFlowScheduler.from_config(cfg)
    ref.set_timesteps(12, mu=0.8)
    ours.set_timesteps(12, mu=0.8)
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    with pytest.raises(ValueError, match="mu"):
        ours.set_timesteps(12)


def test_unipc_errors():
    with pytest.raises(NotImplementedError, match="use_flow_sigmas"):
        UniPCFlowScheduler.from_config({**WAN_CONFIG, "use_flow_sigmas": False})
    with pytest.raises(ValueError, match="unknown"):
        UniPCFlowScheduler.from_config({**WAN_CONFIG, "flow_shfit": 5.0})
    s = UniPCFlowScheduler.from_config(WAN_CONFIG)
    x = torch.zeros(1, 2)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        s.step(x, 0, x)
    s.set_timesteps(4)
    s.step(x, 0, x)
    with pytest.raises(ValueError, match="in order"):
        s.step(x, 2, x)
    s.step(x, s.timesteps[1], x)  # a timestep value works as well as the index
    with pytest.raises(ValueError, match="not in the schedule"):
        s.step(x, torch.tensor(5), x)


# ---- FlowMatchEuler (FLUX, Cosmos-Predict2) ----


def make_euler(**config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**config), FlowMatchEulerScheduler.from_config(config)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 7.5])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 50])
def test_euler_schedule_matches_diffusers(shift, n):
    ref, ours = make_euler(shift=shift)
    ref.set_timesteps(n)
    ours.set_timesteps(n)
    assert ours.timesteps.dtype == ours.sigmas.dtype == torch.float32
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(ours.sigmas, ref.sigmas)


FLUX_CONFIG = dict(
    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
    max_image_seq_len=4096,
)  # fmt: skip


@pytest.mark.parametrize("mu", [0.5, 1.15, 0.93])
@pytest.mark.parametrize("n", [1, 4, 28])
def test_euler_dynamic_shift_flux(mu, n):
    """FLUX passes its own sigmas linspace(1, 1/n, n) and mu; also without sigmas."""
    ref, ours = make_euler(**FLUX_CONFIG)
    sigmas = [1.0 - i * (1.0 - 1.0 / n) / max(n - 1, 1) for i in range(n)]
    for kw in (dict(sigmas=sigmas), {}):
        ref.set_timesteps(n, mu=mu, **kw)
        ours.set_timesteps(n, mu=mu, **kw)
        assert torch.equal(ours.timesteps, ref.timesteps), kw
        assert torch.equal(ours.sigmas, ref.sigmas), kw
    with pytest.raises(ValueError, match="mu"):
        ours.set_timesteps(n)


@pytest.mark.parametrize(
    "config",
    [
        dict(shift=3.0, shift_terminal=0.02),
        dict(shift=1.0, use_karras_sigmas=True),
        dict(shift=2.0, use_exponential_sigmas=True),
        dict(shift=3.0, invert_sigmas=True),
        dict(use_dynamic_shifting=True, time_shift_type="linear"),
    ],
)
def test_euler_options_match_diffusers(config):
    ref, ours = make_euler(**config)
    kw = dict(mu=1.1) if config.get("use_dynamic_shifting") else {}
    ref.set_timesteps(9, **kw)
    ours.set_timesteps(9, **kw)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(ours.sigmas, ref.sigmas)


@pytest.mark.parametrize("n", [1, 3, 10, 28])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_euler_steps_match_diffusers(n, model_dtype):
    ref, ours = make_euler(shift=3.0)
    traj_ours, traj_ref = run_pair(ours, ref, n, model_dtype=model_dtype)
    for a, b in zip(traj_ours, traj_ref):
        assert a.dtype == b.dtype == model_dtype  # returned in the model output's dtype, like diffusers
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # reset() lets the same schedule run again from index 0.
    ours.reset()
    x = torch.ones(2, 3)
    torch.testing.assert_close(ours.step(x, 0, x), x + (ours.sigmas[1] - ours.sigmas[0]) * x)


def test_euler_scale_noise_matches_diffusers():
    ref, ours = make_euler(shift=3.0)
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    ref.set_begin_index(3)
    want = ref.scale_noise(x0, ref.timesteps[3:4], eps)
    torch.testing.assert_close(ours.scale_noise(x0, 3, eps), want, atol=0, rtol=0)
