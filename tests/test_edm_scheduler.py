"""EDMEulerScheduler against diffusers' on the same settings: schedule, preconditioning and a guided loop run
as CosmosTextToWorldPipeline runs it (the reference steps twice per step: once for x0, once with it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dit_rt.schedulers.edm import EDMEulerConfig, EDMEulerScheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from bench_e2e import COSMOS1_SCHEDULER  # noqa: E402

COSMOS1 = COSMOS1_SCHEDULER  # Cosmos-1.0's scheduler_config.json


def _reference(**overrides):
    from diffusers import EDMEulerScheduler as Ref

    return Ref(**{**COSMOS1, **overrides})


def _fake_model(x: torch.Tensor, c_noise: torch.Tensor, shift: float) -> torch.Tensor:
    """A stand-in network whose output depends on its input, its noise level and the 'prompt'."""
    return torch.tanh(x * 0.7 + c_noise + shift)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(final_sigmas_type="zero"),
        dict(sigma_schedule="exponential"),
        dict(prediction_type="v_prediction", sigma_data=1.0),
    ],
)
@pytest.mark.parametrize("steps", [1, 5, 36])
def test_schedule_matches_reference(overrides, steps):
    ref, ours = _reference(**overrides), EDMEulerScheduler(EDMEulerConfig(**{**COSMOS1, **overrides}))
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert torch.equal(ours.sigmas, ref.sigmas)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert ours.sigmas.dtype == ours.timesteps.dtype == torch.float32


def test_cosmos1_values_from_the_spec():
    s = EDMEulerScheduler.from_config({"_class_name": "EDMEulerScheduler", **COSMOS1})
    s.set_timesteps(36)
    torch.testing.assert_close(s.sigmas[:3], torch.tensor([80.0, 68.3251, 58.1421]), rtol=0, atol=1e-4)
    torch.testing.assert_close(s.sigmas[-3:], torch.tensor([0.00393, 0.002, 0.002]), rtol=0, atol=1e-5)
    torch.testing.assert_close(s.timesteps[:3], torch.tensor([1.0955, 1.0561, 1.0157]), rtol=0, atol=1e-4)
    assert s.sigmas[-1] == s.sigmas[-2]  # sigma_min final type: the last step has dt = 0
    assert s.init_noise_sigma == 80.0


@pytest.mark.parametrize("overrides", [{}, dict(prediction_type="v_prediction")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_guided_loop_matches_reference(overrides, dtype):
    """The Cosmos-1.0 loop: x ~ N(0, I) * sigma_max; per step the network on c_in x for both prompts, x0 per
    branch, x0 = x0_c + g (x0_c - x0_u), one Euler step. `dtype`: the network's (bf16 output stays bf16
    through c_out * F in both)."""
    steps, g = 6, 7.0
    ref, ours = _reference(**overrides), EDMEulerScheduler(EDMEulerConfig(**{**COSMOS1, **overrides}))
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    noise = torch.randn(2, 4, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    x_ref = noise * ref.config.sigma_max
    x = noise * ours.init_noise_sigma
    for i, t in enumerate(ref.timesteps):
        # reference, statement for statement as the pipeline
        inp = ref.scale_model_input(x_ref, t).to(dtype)
        c_noise = t.expand(2).to(dtype).view(2, 1, 1, 1, 1)
        cond, unc = _fake_model(inp, c_noise, 0.1), _fake_model(inp, c_noise, -0.2)
        x0 = ref.step(torch.cat([unc, cond]), t, torch.cat([x_ref, x_ref]), return_dict=False)[1]
        ref._step_index -= 1
        x0_u, x0_c = x0.chunk(2)
        x0 = x0_c + g * (x0_c - x0_u)
        x_ref = ref.step(x0, t, x_ref, return_dict=False, pred_original_sample=x0)[0]
        # ours
        inp = ours.precondition_inputs(x, i).to(dtype)
        c_noise = ours.timesteps[i].expand(2).to(dtype).view(2, 1, 1, 1, 1)
        cond, unc = _fake_model(inp, c_noise, 0.1), _fake_model(inp, c_noise, -0.2)
        x0_c, x0_u = ours.precondition_outputs(x, cond, i), ours.precondition_outputs(x, unc, i)
        assert x0_c.dtype == torch.float32
        x = ours.step(x0_c + g * (x0_c - x0_u), t, x)
        assert x.dtype == x_ref.dtype == torch.float32
        torch.testing.assert_close(x, x_ref, rtol=1e-6, atol=1e-5)
    assert x.abs().max() > 0.5  # the loop moved somewhere non-trivial


def test_step_order_and_errors():
    s = EDMEulerScheduler(EDMEulerConfig(**COSMOS1))
    x = torch.ones(1, 2)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        s.step(x, 0, x)
    s.set_timesteps(4)
    s.step(x, 0, x)
    with pytest.raises(ValueError, match="in order"):
        s.step(x, 2, x)
    s.reset()
    s.step(x, s.timesteps[0], x)  # a timestep value works as the index
    with pytest.raises(ValueError, match="unknown EDMEuler"):
        EDMEulerConfig.from_config({"s_churn": 1.0})
    with pytest.raises(ValueError, match="prediction_type"):
        EDMEulerConfig(prediction_type="sample")
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(0)
