"""EDM Euler sampler (Karras et al. 2022; diffusers' EDMEulerScheduler) with the EDM preconditioning, as
Cosmos-1.0 Diffusion samples with it.

x_sigma = x0 + sigma eps. The network F sees c_in(sigma) x and c_noise(sigma) = log(sigma) / 4 and the
denoised estimate is x0 = c_skip x + c_out F. A step is deterministic Euler on the probability-flow ODE:
x += (x - x0) / sigma * (sigma_next - sigma). The scheduler takes x0, not F, in `step`: Cosmos applies its
guidance to x0 (the pipeline calls `precondition_outputs` per branch, then steps with the guided x0).

Precision follows diffusers 0.42.1: the schedule in float64 (torch.linspace ramp) then float32; the
per-step coefficients are float32 0-dim tensors combined with the tensors in the reference's order, so a
low-precision model output stays in its dtype where the reference's does; the step itself runs in float32.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from dit_rt.schedulers.common import StepCounter


@dataclass(frozen=True)
class EDMEulerConfig:
    """EDMEulerScheduler settings, named as in the Hub `scheduler/scheduler_config.json`."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    sigma_schedule: str = "karras"
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    rho: float = 7.0
    final_sigmas_type: str = "zero"

    def __post_init__(self):
        if self.sigma_schedule not in ("karras", "exponential"):
            raise ValueError(f"sigma_schedule {self.sigma_schedule!r}: expected 'karras' or 'exponential'")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type {self.prediction_type!r}: expected 'epsilon' or 'v_prediction'"
            )
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type {self.final_sigmas_type!r}: expected 'zero' or 'sigma_min'")

    @classmethod
    def from_config(cls, config: dict, **overrides) -> EDMEulerConfig:
        """Read a diffusers config dict; `overrides` win. Unknown settings raise."""
        config = {**config, **overrides}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = {k for k in config if k not in names and not k.startswith("_")}
        if unknown:
            raise ValueError(f"unknown EDMEuler scheduler settings: {sorted(unknown)}")
        return cls(**{k: v for k, v in config.items() if k in names})


class EDMEulerScheduler:
    """Deterministic Euler steps on EDM sigmas, with the EDM preconditioning.

    `timesteps` [N] float32: c_noise = log(sigma) / 4 (what the transformer receives); `sigmas` [N + 1]
    float32 on the CPU, ending in 0 or, with final_sigmas_type "sigma_min", in sigma_{N-1} again (the last
    step then changes nothing). `step(x0, i, x)` -> x at the next sigma.
    """

    def __init__(self, config: EDMEulerConfig | None = None):
        self.config = config or EDMEulerConfig()
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self.counter = StepCounter()

    @classmethod
    def from_config(cls, config: dict, **overrides) -> EDMEulerScheduler:
        return cls(EDMEulerConfig.from_config(config, **overrides))

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    @property
    def init_noise_sigma(self) -> float:
        """What Cosmos scales its N(0, I) initial latents by: sigma_max (not the reference's
        sqrt(sigma_max^2 + 1), which CosmosTextToWorldPipeline does not use)."""
        return self.config.sigma_max

    def reset(self) -> None:
        self.counter = StepCounter()

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """N sigmas from sigma_max down to sigma_min: Karras' rho-spacing or log-uniform."""
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        cfg, n = self.config, num_inference_steps
        if cfg.sigma_schedule == "karras":
            ramp = torch.linspace(0, 1, n, dtype=torch.float64)
            lo, hi = cfg.sigma_min ** (1 / cfg.rho), cfg.sigma_max ** (1 / cfg.rho)
            s = (hi + ramp * (lo - hi)) ** cfg.rho
        else:  # float32 linspace, as the reference builds this one
            s = torch.linspace(math.log(cfg.sigma_min), math.log(cfg.sigma_max), n).exp().flip(0)
        s = s.to(torch.float32)
        last = s[-1:] if cfg.final_sigmas_type == "sigma_min" else torch.zeros(1)
        self.timesteps = self.precondition_noise(s).to(device)
        self.sigmas = torch.cat([s, last])
        self.reset()

    # ---- preconditioning (Karras et al. table 1, "ours"): all at the sigma of schedule index i ----

    @staticmethod
    def precondition_noise(sigma: torch.Tensor) -> torch.Tensor:
        """c_noise = log(sigma) / 4: the network's noise-level input."""
        return 0.25 * torch.log(sigma)

    def precondition_inputs(self, sample: torch.Tensor, i: int) -> torch.Tensor:
        """c_in x with c_in = 1 / sqrt(sigma^2 + sigma_data^2) (unit variance network input)."""
        sigma = self.sigmas[i]
        return sample * (1 / ((sigma**2 + self.config.sigma_data**2) ** 0.5))

    def precondition_outputs(self, sample: torch.Tensor, model_output: torch.Tensor, i: int) -> torch.Tensor:
        """x0 = c_skip x + c_out F, c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2)
        (negated for v_prediction); x in float32, as the reference's step casts it."""
        sigma, sd = self.sigmas[i], self.config.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2) ** 0.5
        if self.config.prediction_type == "v_prediction":
            c_out = -c_out
        return c_skip * sample.to(torch.float32) + c_out * model_output

    def index(self, t) -> int:
        """The schedule index of the step `t` (an int index or a value from `timesteps`) about to run."""
        if len(self.timesteps) == 0:
            raise RuntimeError("call set_timesteps() before stepping")
        return self.counter.resolve(t, self.timesteps)

    def step(self, denoised: torch.Tensor, t, sample: torch.Tensor) -> torch.Tensor:
        """x_next = x + (x - x0) / sigma * (sigma_next - sigma) in float32, returned in x0's dtype.

        denoised: x0 (after guidance); t: step index (int) or a timestep value from `timesteps`.
        """
        i = self.index(t)
        x = sample.to(torch.float32)
        sigma = self.sigmas[i]
        derivative = (x - denoised) / sigma
        prev = x + derivative * (self.sigmas[i + 1] - sigma)
        self.counter.index = i + 1
        return prev.to(denoised.dtype)
