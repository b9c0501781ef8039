"""Cosmos-Predict2 and Predict2.5 samplers: the Karras schedules their pipelines build, and their steps.

Predict2 (diffusers' `Cosmos2TextToImagePipeline` / `Cosmos2VideoToWorldPipeline`) runs a
FlowMatchEulerDiscreteScheduler with `use_karras_sigmas`, but the pipeline registers EDM limits into its
config (sigma 80 -> 0.002, sigma_data 1) and makes the last sigma repeat instead of reaching 0, so the
schedule is Karras rho = 7 on the EDM scale and the last step moves nothing. The DiT sees the rectified-flow
time t = sigma / (sigma + 1); the pipeline turns its output into x0, guides on x0, and Euler steps in EDM
space with d = (x - x0) / sigma. `Predict2EulerScheduler.step` takes that x0. (Cosmos-1.0's EDM Euler,
dit_rt.schedulers.edm, differs: its network sees c_noise = log(sigma) / 4 with sigma_data 0.5, and its step
returns x0's dtype, where Predict2 keeps float32 latents.)

Predict2.5 (`Cosmos2_5_PredictBasePipeline`) runs UniPC on Karras sigmas 200 -> 0.01 mapped to flow sigmas
s / (1 + s); dit_rt.schedulers.unipc builds that schedule already, and the DiT receives the flow sigma
itself. `KarrasFlowUniPCScheduler` only adds `sigma_at`, and refuses configs that are not that schedule.
"""

from __future__ import annotations

import torch

from dit_rt.schedulers.common import StepCounter, karras_sigmas
from dit_rt.schedulers.unipc import UniPCFlowScheduler

# What Cosmos2TextToImagePipeline / Cosmos2VideoToWorldPipeline register into their scheduler's config,
# whatever the saved config says.
PREDICT2_SIGMA_MAX = 80.0
PREDICT2_SIGMA_MIN = 0.002
PREDICT2_SIGMA_DATA = 1.0


class Predict2EulerScheduler:
    """Euler on Karras EDM sigmas with x0 input (Cosmos-Predict2).

    `sigmas` [N + 1] float32 on the CPU, the last one repeated (final_sigmas_type "sigma_min"); `timesteps`
    [N] float32 = 1000 sigma (the reference scheduler's values; only a step key here). `sigma_at(t)` is the
    EDM sigma of a step; `step(x0, t, x)` -> x at the next sigma (float32).
    """

    def __init__(
        self,
        sigma_min: float = PREDICT2_SIGMA_MIN,
        sigma_max: float = PREDICT2_SIGMA_MAX,
        sigma_data: float = PREDICT2_SIGMA_DATA,
        num_train_timesteps: int = 1000,
    ):
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.num_train_timesteps = num_train_timesteps
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self.counter = StepCounter()

    @classmethod
    def from_config(cls, config: dict) -> Predict2EulerScheduler:
        """From a Predict2 `scheduler_config.json` (FlowMatchEulerDiscreteScheduler with Karras sigmas).

        The sigma limits are the pipeline's constants, as in the reference, which overwrites whatever the
        config holds; settings that would change the schedule otherwise raise.
        """
        name = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if name != "FlowMatchEulerDiscreteScheduler":
            raise NotImplementedError(f"Cosmos-Predict2 expects FlowMatchEulerDiscreteScheduler, got {name}")
        if not config.get("use_karras_sigmas", False):
            raise NotImplementedError(
                "Cosmos-Predict2 scheduler without use_karras_sigmas is not implemented"
            )
        for key, default in (("shift", 1.0), ("use_dynamic_shifting", False), ("invert_sigmas", False)):
            if config.get(key, default) != default:
                raise NotImplementedError(f"Cosmos-Predict2 scheduler with {key}={config[key]!r}")
        return cls(num_train_timesteps=config.get("num_train_timesteps", 1000))

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    def reset(self) -> None:
        self.counter = StepCounter()

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        if not num_inference_steps or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        s = karras_sigmas(self.sigma_min, self.sigma_max, num_inference_steps).to(torch.float32)
        self.timesteps = (s * self.num_train_timesteps).to(device)
        self.sigmas = torch.cat([s, s[-1:]])  # the last step stays at sigma_min: a no-op
        self.reset()

    def sigma_at(self, t) -> torch.Tensor:
        """The EDM sigma (float32 scalar tensor) of step t (an index or a value of `timesteps`)."""
        return self.sigmas[self.counter.resolve(t, self.timesteps)]

    def step(self, x0: torch.Tensor, t, sample: torch.Tensor) -> torch.Tensor:
        """Euler from sigma_i to sigma_{i+1} along d = (x - x0) / sigma_i, in float32."""
        if len(self.timesteps) == 0:
            raise RuntimeError("call set_timesteps() before step()")
        i = self.counter.resolve(t, self.timesteps)
        sigma = self.sigmas[i]
        x = sample.to(torch.float32)
        d = (x - x0) / sigma
        self.counter.index = i + 1
        return x + (self.sigmas[i + 1] - sigma) * d


class KarrasFlowUniPCScheduler(UniPCFlowScheduler):
    """UniPC on Karras flow sigmas (Cosmos-Predict2.5); `sigma_at(t)` is the flow sigma the DiT receives."""

    @classmethod
    def from_config(cls, config: dict, **overrides) -> KarrasFlowUniPCScheduler:
        scheduler = super().from_config(config, **overrides)
        if not scheduler.config.use_karras_sigmas:
            raise NotImplementedError(
                "Cosmos-Predict2.5 expects UniPC with use_karras_sigmas (and sigma_min / sigma_max)"
            )
        return scheduler

    def sigma_at(self, t) -> torch.Tensor:
        """The flow sigma (float32 scalar tensor) of step t (an index or a value of `timesteps`)."""
        return self.sigmas[self.counter.resolve(t, self.timesteps)]
