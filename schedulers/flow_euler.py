"""Flow-matching Euler sampler (diffusers' FlowMatchEulerDiscreteScheduler): FLUX, Cosmos-Predict2, ...

x_sigma = (1 - sigma) x0 + sigma eps; the model predicts v = eps - x0; a step is x += (sigma_next - sigma) v.
Schedule quirk kept on purpose: the endpoints of the default linspace come from the training table,
which is already statically shifted, and the linspace is then shifted again, exactly as the reference
does, so timesteps match it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dit_rt.schedulers.common import (
    StepCounter,
    as_sigmas,
    exponential_sigmas,
    karras_sigmas,
    linspace64,
    shift_sigmas,
    stretch_to_terminal,
    time_shift,
)


@dataclass(frozen=True)
class FlowMatchEulerConfig:
    """FlowMatchEulerDiscreteScheduler settings, named as in the Hub `scheduler/scheduler_config.json`."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    # Pipelines compute mu from these (linear in the image sequence length); kept for them to read.
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    time_shift_type: str = "exponential"

    def __post_init__(self):
        if self.use_karras_sigmas and self.use_exponential_sigmas:
            raise ValueError("use_karras_sigmas and use_exponential_sigmas are mutually exclusive")
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type {self.time_shift_type!r}: expected 'exponential' or 'linear'")

    @classmethod
    def from_config(cls, config: dict, **overrides) -> FlowMatchEulerConfig:
        """Read a diffusers config dict; `overrides` win. Unsupported options raise."""
        config = {**config, **overrides}
        for key, why in (("use_beta_sigmas", "beta sigmas"), ("stochastic_sampling", "stochastic sampling")):
            if config.get(key):
                raise NotImplementedError(f"FlowMatchEuler {key}=True: {why} not implemented")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = {k for k in config if k not in names and not k.startswith("_")}
        unknown -= {"use_beta_sigmas", "stochastic_sampling"}
        if unknown:
            raise ValueError(f"unknown FlowMatchEuler scheduler settings: {sorted(unknown)}")
        return cls(**{k: v for k, v in config.items() if k in names})


class FlowMatchEulerScheduler:
    """Euler steps on flow sigmas.

    `timesteps` [N] float32 (1000 sigma, what the transformer receives), `sigmas` [N + 1] float32 on the
    CPU ending in 0 (1 with invert_sigmas). `step(v, i, x)` -> x at the next sigma.
    """

    def __init__(self, config: FlowMatchEulerConfig | None = None):
        self.config = cfg = config or FlowMatchEulerConfig()
        # The training table (float32, as the reference builds it) only provides the default endpoints.
        table = torch.arange(cfg.num_train_timesteps, 0, -1, dtype=torch.float32) / cfg.num_train_timesteps
        if not cfg.use_dynamic_shifting:
            table = shift_sigmas(table, cfg.shift)
        self.sigma_max, self.sigma_min = table[0].item(), table[-1].item()
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self.counter = StepCounter()

    @classmethod
    def from_config(cls, config: dict, **overrides) -> FlowMatchEulerScheduler:
        return cls(FlowMatchEulerConfig.from_config(config, **overrides))

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    def reset(self) -> None:
        self.counter = StepCounter()

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: torch.device | str | None = None,
        *,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Build the schedule: N evenly spaced sigmas (or the given ones), shifted statically or by mu."""
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("this scheduler uses dynamic shifting: pass mu to set_timesteps")
        if sigmas is not None:
            if num_inference_steps is not None and len(sigmas) != num_inference_steps:
                raise ValueError(f"{len(sigmas)} sigmas given for {num_inference_steps} steps")
            num_inference_steps = len(sigmas)
            # Given sigmas stay float32 throughout, as in the reference.
            s = as_sigmas(sigmas, torch.float32)
        else:
            if not num_inference_steps or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
            T = cfg.num_train_timesteps
            s = linspace64(self.sigma_max * T, self.sigma_min * T, num_inference_steps) / T
        n = num_inference_steps
        s = time_shift(s, mu, cfg.time_shift_type) if cfg.use_dynamic_shifting else shift_sigmas(s, cfg.shift)
        if cfg.shift_terminal:
            s = stretch_to_terminal(s, cfg.shift_terminal)
        if cfg.use_karras_sigmas:
            s = karras_sigmas(s[-1].item(), s[0].item(), n)
        elif cfg.use_exponential_sigmas:
            s = exponential_sigmas(s[-1].item(), s[0].item(), n)
        s = s.to(torch.float32)
        if cfg.invert_sigmas:
            s = 1.0 - s
        self.timesteps = (s * cfg.num_train_timesteps).to(device)
        self.sigmas = torch.cat([s, torch.full((1,), 1.0 if cfg.invert_sigmas else 0.0)])
        self.reset()

    def scale_model_input(self, sample: torch.Tensor, t=None) -> torch.Tensor:
        return sample

    def scale_noise(self, sample: torch.Tensor, i: int, noise: torch.Tensor) -> torch.Tensor:
        """Forward process at schedule index i (image-to-image starts): sigma eps + (1 - sigma) x0."""
        sigma = self.sigmas[i]
        return sigma * noise + (1.0 - sigma) * sample

    def step(self, model_output: torch.Tensor, t, sample: torch.Tensor) -> torch.Tensor:
        """x_next = x + (sigma_next - sigma) v, computed with x in float32; returned in the model's dtype.

        t: step index (int) or a timestep value from `timesteps`.
        """
        if len(self.timesteps) == 0:
            raise RuntimeError("call set_timesteps() before step()")
        i = self.counter.resolve(t, self.timesteps)
        dt = self.sigmas[i + 1] - self.sigmas[i]
        prev = sample.to(torch.float32) + dt * model_output
        self.counter.index = i + 1
        return prev.to(model_output.dtype)
