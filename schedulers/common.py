"""Sigma-schedule helpers shared by the flow-matching schedulers.

Schedules are built in float64 with the same operation order as the reference (diffusers builds them
with NumPy), so the float32 sigmas and the int64 timesteps derived from them come out identical;
that matters because Wan's transformer receives truncated integer timesteps and Wan2.2 switches
experts on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def linspace64(start: float, stop: float, num: int) -> torch.Tensor:
    """float64 linspace computed as NumPy does (start + i * step, exact endpoint), bit for bit."""
    if num == 1:
        return torch.tensor([start], dtype=torch.float64)
    step = (stop - start) / (num - 1)
    y = torch.arange(num, dtype=torch.float64) * step + start
    y[-1] = stop
    return y


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Static flow shift: s * sigma / (1 + (s - 1) * sigma)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(sigmas: torch.Tensor, mu: float, kind: str = "exponential") -> torch.Tensor:
    """Resolution-dependent (dynamic) shift with exponent 1: e^mu / (e^mu + 1/sigma - 1), or mu / (...)."""
    if kind not in ("exponential", "linear"):
        raise ValueError(f"time_shift_type {kind!r}: expected 'exponential' or 'linear'")
    # A tensor numerator: torch turns `python_scalar / tensor` into reciprocal-then-multiply (two
    # roundings), while NumPy divides; the schedule must round like the reference.
    m = torch.tensor(math.exp(mu) if kind == "exponential" else mu, dtype=sigmas.dtype)
    return m / (m + (1 / sigmas - 1))


def stretch_to_terminal(sigmas: torch.Tensor, terminal: float) -> torch.Tensor:
    """Rescale 1 - sigma so that the last sigma equals `terminal` (LTX-Video's shift_terminal)."""
    one_minus = 1 - sigmas
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))


def karras_sigmas(sigma_min: float, sigma_max: float, num: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) spacing from sigma_max down to sigma_min, float64."""
    ramp = linspace64(0.0, 1.0, num)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num: int) -> torch.Tensor:
    """Log-uniform spacing from sigma_max down to sigma_min, float64."""
    return torch.exp(linspace64(math.log(sigma_max), math.log(sigma_min), num))


def as_sigmas(values: Sequence[float] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64).to(dtype).cpu()


class StepCounter:
    """Which schedule index a `step()` call refers to.

    `t` may be a Python int (the index itself) or a timestep value (float or tensor) looked up in
    `timesteps`. The first call after `set_timesteps`/`reset` may start anywhere (image-to-video and
    partial schedules start mid-way); later calls must follow in order, because multistep solvers keep
    a history that a skipped or repeated index would silently corrupt.
    """

    def __init__(self):
        self.index: int | None = None

    def resolve(self, t, timesteps: torch.Tensor) -> int:
        if isinstance(t, int) and not isinstance(t, bool):
            i = t
        else:
            hits = (timesteps.cpu() == torch.as_tensor(t).cpu().to(timesteps.dtype)).nonzero()
            if len(hits) == 0:
                raise ValueError(f"timestep {t!r} is not in the schedule {timesteps.tolist()}")
            i = int(hits[0])
            if self.index is not None and len(hits) > 1:
                # A repeated value (possible with custom sigmas): take the occurrence the counter expects.
                i = self.index if self.index in hits.flatten().tolist() else i
        if not 0 <= i < len(timesteps):
            raise IndexError(f"step index {i} outside the schedule of {len(timesteps)} steps")
        if self.index is not None and i != self.index:
            raise ValueError(f"step() called for index {i}, expected {self.index}: steps must run in order")
        return i
