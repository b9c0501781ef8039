"""Cosmos-Predict2 / Predict2.5 schedules and steps against diffusers 0.42.1, configured as the Cosmos
pipelines configure their schedulers (spec wan-cosmos.md C.5, C.6, E.1)."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from dit_rt.schedulers.cosmos import KarrasFlowUniPCScheduler, Predict2EulerScheduler


def _predict2_reference(steps: int) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler as Cosmos2TextToImagePipeline sets it up and as its __call__ builds the schedule."""
    ref = FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True)
    ref.register_to_config(sigma_max=80.0, sigma_min=0.002, sigma_data=1.0, final_sigmas_type="sigma_min")
    ref.set_timesteps(sigmas=torch.linspace(0, 1, steps, dtype=torch.float64))
    ref.sigmas[-1] = ref.sigmas[-2]
    return ref


def _predict25_reference() -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(
        use_karras_sigmas=True,
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        sigma_max=200.0,
        sigma_min=0.01,
    )


@pytest.mark.parametrize("steps", [1, 2, 7, 35])
def test_predict2_schedule_matches_diffusers(steps):
    ref = _predict2_reference(steps)
    ours = Predict2EulerScheduler.from_config(dict(ref.config))
    ours.set_timesteps(steps)
    assert torch.equal(ours.sigmas, ref.sigmas)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert ours.sigmas[-1] == ours.sigmas[-2]  # the last step is a no-op


def test_predict2_spec_values():
    s = Predict2EulerScheduler()
    s.set_timesteps(35)
    assert s.sigmas[:3].tolist() == pytest.approx([80.0, 68.0051, 57.586], rel=1e-5)
    assert s.sigmas[-3:].tolist() == pytest.approx([0.004, 0.002, 0.002], rel=1e-3)


def test_predict2_steps_match_the_reference_loop():
    """x0 in, Euler in EDM space out: the reference turns x0 into (x - x0) / sigma and Euler-steps it."""
    steps = 5
    ref, ours = _predict2_reference(steps), Predict2EulerScheduler()
    ours.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x_ref = x = torch.randn(1, 4, 2, 3, 3, generator=g) * 80
    for i, t in enumerate(ref.timesteps):
        x0 = torch.randn(x.shape, generator=g)
        x_ref = ref.step((x_ref - x0) / ref.sigmas[i], t, x_ref, return_dict=False)[0]
        assert ours.sigma_at(ours.timesteps[i]) == ref.sigmas[i]
        before, x = x, ours.step(x0, ours.timesteps[i], x)
        assert torch.equal(x, x_ref), i
    assert torch.equal(x, before)  # the last step moves nothing


def test_predict2_refuses_other_schedules():
    with pytest.raises(NotImplementedError, match="use_karras_sigmas"):
        Predict2EulerScheduler.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler"})
    with pytest.raises(NotImplementedError, match="shift"):
        Predict2EulerScheduler.from_config({"use_karras_sigmas": True, "shift": 3.0})
    with pytest.raises(NotImplementedError, match="UniPC"):
        Predict2EulerScheduler.from_config(
            {"_class_name": "UniPCMultistepScheduler", "use_karras_sigmas": True}
        )


@pytest.mark.parametrize("steps", [2, 5, 36])
def test_predict25_schedule_matches_diffusers(steps):
    ref = _predict25_reference()
    ref.set_timesteps(steps)
    ours = KarrasFlowUniPCScheduler.from_config(dict(ref.config))
    ours.set_timesteps(steps)
    assert torch.equal(ours.sigmas, ref.sigmas.float())
    assert torch.equal(ours.timesteps, ref.timesteps)
    for i, t in enumerate(ours.timesteps):
        if i == 0 or t != ours.timesteps[i - 1]:  # a repeated timestep resolves in step order
            assert ours.sigma_at(t) == ref.sigmas[i]


def test_predict25_spec_values():
    s = KarrasFlowUniPCScheduler.from_config(dict(_predict25_reference().config))
    s.set_timesteps(36)
    assert s.sigmas[:4].tolist() == pytest.approx([0.99502, 0.99421, 0.99323, 0.99207], abs=1e-5)
    assert s.sigmas[-3:].tolist() == pytest.approx([0.01784, 0.00990, 0.0], abs=1e-5)
    assert s.timesteps[:4].tolist() == [995, 994, 993, 992]


def test_predict25_steps_match_diffusers():
    steps = 6
    ref = _predict25_reference()
    ref.set_timesteps(steps)
    ours = KarrasFlowUniPCScheduler.from_config(dict(ref.config))
    ours.set_timesteps(steps)
    g = torch.Generator().manual_seed(1)
    x_ref = x = torch.randn(1, 4, 3, 4, 4, generator=g)
    for t in ref.timesteps:
        v = torch.randn(x.shape, generator=g)
        x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
        x = ours.step(v, t, x)
        assert (x - x_ref).abs().max() <= 1e-6 * max(1.0, x_ref.abs().max().item())


def test_predict25_refuses_plain_flow_sigmas():
    with pytest.raises(NotImplementedError, match="use_karras_sigmas"):
        KarrasFlowUniPCScheduler.from_config(
            dict(UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction").config)
        )
