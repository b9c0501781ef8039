"""UniPC multistep sampler (Zhao et al. 2023) on flow-matching sigmas, as Wan and Cosmos-Predict2.5 use it.

Flow convention: x_sigma = (1 - sigma) x0 + sigma eps, the model predicts v = eps - x0; alpha = 1 - sigma and
lambda = log(alpha / sigma). Every step converts v to a data prediction m = x - sigma v, corrects the current
sample with UniC (using m, without a new model call), then predicts the next one with UniP. Only the
data-prediction ("predict_x0") form with B(h) = hh (bh1) or e^hh - 1 (bh2) is implemented: it is what
every flow checkpoint uses.

Precision follows diffusers 0.42.1: schedule in float64 then float32 sigmas; per-step coefficients as
float32 scalars, combined with the tensors in the same order, so a run matches the reference to float
rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dit_rt.schedulers.common import (
    StepCounter,
    as_sigmas,
    karras_sigmas,
    linspace64,
    shift_sigmas,
    stretch_to_terminal,
    time_shift,
)

# scheduler_config.json keys that do not matter on flow sigmas (the beta schedule, thresholding knobs).
_IGNORED = {
    "beta_start", "beta_end", "beta_schedule", "trained_betas", "dynamic_thresholding_ratio",
    "sample_max_value", "timestep_spacing", "steps_offset", "rescale_betas_zero_snr",
}  # fmt: skip


@dataclass(frozen=True)
class UniPCConfig:
    """UniPCMultistepScheduler settings, named as in the Hub `scheduler/scheduler_config.json`."""

    num_train_timesteps: int = 1000
    flow_shift: float = 1.0
    solver_order: int = 2
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()
    final_sigmas_type: str = "zero"
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None

    def __post_init__(self):
        if self.solver_type not in ("bh1", "bh2"):
            raise ValueError(f"solver_type {self.solver_type!r}: expected 'bh1' or 'bh2'")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type {self.final_sigmas_type!r}: expected 'zero' or 'sigma_min'")
        if self.solver_order < 1:
            raise ValueError(f"solver_order must be >= 1, got {self.solver_order}")
        if self.use_karras_sigmas and (self.sigma_min is None or self.sigma_max is None):
            raise ValueError("use_karras_sigmas on flow sigmas needs sigma_min and sigma_max in the config")

    @classmethod
    def from_config(cls, config: dict, **overrides) -> UniPCConfig:
        """Read a diffusers UniPCMultistepScheduler config dict; `overrides` (e.g. flow_shift=5.0) win.

        Options this implementation does not cover raise instead of being silently dropped.
        """
        config = {**config, **overrides}
        unsupported = {
            "use_flow_sigmas": (True, "only flow-matching sigmas are implemented"),
            "prediction_type": ("flow_prediction", "only flow (velocity) prediction is implemented"),
            "predict_x0": (True, "only the data-prediction form is implemented"),
            "thresholding": (False, "thresholding is not implemented"),
            "solver_p": (None, "a custom solver_p is not supported"),
            "use_exponential_sigmas": (False, "exponential sigmas are not implemented for UniPC"),
            "use_beta_sigmas": (False, "beta sigmas are not implemented"),
        }
        for key, (want, why) in unsupported.items():
            if key in config and config[key] != want:
                raise NotImplementedError(f"UniPC {key}={config[key]!r}: {why}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config) - names - _IGNORED - set(unsupported)
        unknown = {k for k in unknown if not k.startswith("_")}
        if unknown:
            raise ValueError(f"unknown UniPC scheduler settings: {sorted(unknown)}")
        kwargs = {k: v for k, v in config.items() if k in names}
        if "disable_corrector" in kwargs:
            kwargs["disable_corrector"] = tuple(kwargs["disable_corrector"])
        return cls(**kwargs)


def _lam(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR of a flow sigma: log(1 - sigma) - log(sigma) (+inf at sigma = 0)."""
    return torch.log(1 - sigma) - torch.log(sigma)


class UniPCFlowScheduler:
    """UniPC-p (bh1/bh2, data prediction) on flow sigmas.

    `timesteps` [N] int64 (1000 sigma truncated: what the transformer receives), `sigmas` [N + 1] float32
    (on the CPU, last one 0 or sigma_min). `step(v, i, x)` -> x at the next noise level.
    """

    def __init__(self, config: UniPCConfig | None = None):
        self.config = config or UniPCConfig()
        self.timesteps = torch.empty(0, dtype=torch.long)
        self.sigmas = torch.empty(0)
        self.reset()

    @classmethod
    def from_config(cls, config: dict, **overrides) -> UniPCFlowScheduler:
        return cls(UniPCConfig.from_config(config, **overrides))

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    def reset(self) -> None:
        """Forget the solver history so the same schedule can run another generation."""
        self.history: list[torch.Tensor | None] = [
            None
        ] * self.config.solver_order  # data predictions, newest last
        self.lower_order_nums = 0  # steps taken, capped at solver_order (warm-up of the multistep order)
        self.last_sample: torch.Tensor | None = None  # the sample the last predictor started from
        self.last_order = 0  # order of the last predictor = order of the next corrector
        self.counter = StepCounter()

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: torch.device | str | None = None,
        *,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Build the schedule for `num_inference_steps` steps (or from explicit flow `sigmas`), then reset."""
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("this scheduler uses dynamic shifting: pass mu to set_timesteps")
        if sigmas is not None:
            num_inference_steps = len(sigmas)
        if not num_inference_steps or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        n = num_inference_steps
        if cfg.use_karras_sigmas:
            s = karras_sigmas(cfg.sigma_min, cfg.sigma_max, n)
            s = s / (s + 1)  # an EDM sigma to the flow sigma of the same noise-to-signal ratio
        else:
            if sigmas is None:
                s = linspace64(1.0, 1 / cfg.num_train_timesteps, n + 1)[:-1]
            else:
                s = as_sigmas(sigmas, torch.float64)
            if cfg.use_dynamic_shifting:
                s = time_shift(s, mu, cfg.time_shift_type)
            else:
                s = shift_sigmas(s, cfg.flow_shift)
            if cfg.shift_terminal:
                s = stretch_to_terminal(s, cfg.shift_terminal)
            if abs(float(s[0]) - 1) < 1e-6:
                s[0] -= 1e-6  # sigma = 1 would make alpha = 0 and lambda = -inf in the first update
        last = s[-1:] if cfg.final_sigmas_type == "sigma_min" else torch.zeros(1, dtype=torch.float64)
        self.timesteps = (s * cfg.num_train_timesteps).to(torch.long).to(device)  # truncates toward zero
        self.sigmas = torch.cat([s, last]).to(torch.float32)
        self.reset()

    def scale_model_input(self, sample: torch.Tensor, t=None) -> torch.Tensor:
        return sample

    def _coefficients(self, t: int, s0: int, order: int):
        """Scalars of one UniP/UniC update from sigma index s0 to t.

        The `order - 1` older data predictions sit at sigma indices s0 - 1, s0 - 2, ...; their log-SNR
        distances to s0 (in units of h) are `rks`. Returns (sigma_t / sigma_s0, alpha_t, h_phi_1, B_h,
        rks, R [order, order], b [order]) as float32 CPU tensors; R rho = b gives the solver weights.
        """
        sig = self.sigmas
        lam_t, lam_s0 = _lam(sig[t]), _lam(sig[s0])
        h = lam_t - lam_s0
        rks = [(_lam(sig[s0 - 1 - k]) - lam_s0) / h for k in range(order - 1)]
        hh = -h  # data prediction
        h_phi_1 = torch.expm1(hh)  # h * phi_1(h) = e^hh - 1
        B_h = hh if self.config.solver_type == "bh1" else torch.expm1(hh)
        r = torch.stack([*rks, torch.ones(())])
        R, b = [], []
        h_phi_k, fact = h_phi_1 / hh - 1, 1
        for i in range(1, order + 1):
            R.append(r ** (i - 1))
            b.append(h_phi_k * fact / B_h)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        return sig[t] / sig[s0], 1 - sig[t], h_phi_1, B_h, rks, torch.stack(R), torch.stack(b)

    def _predict(self, x: torch.Tensor, i: int, order: int) -> torch.Tensor:
        """UniP: from the (corrected) sample x at sigma_i to sigma_{i+1}."""
        ratio, alpha_t, h_phi_1, B_h, rks, R, b = self._coefficients(i + 1, i, order)
        m0 = self.history[-1]
        out = ratio * x - alpha_t * h_phi_1 * m0
        if order >= 2:
            D1s = [(self.history[-(k + 2)] - m0) / rk for k, rk in enumerate(rks)]
            # bh2/bh1 order 2 uses the fixed weight 1/2; higher orders solve the Vandermonde system.
            rhos = torch.full((1,), 0.5) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
            rhos = rhos.to(x.dtype)
            res = sum(rho * d for rho, d in zip(rhos, D1s))
            out = out - alpha_t * B_h * res
        return out.to(x.dtype)

    def _correct(self, m_t: torch.Tensor, x_t: torch.Tensor, i: int, order: int) -> torch.Tensor:
        """UniC: refine x_i (the last prediction) using m_t, the data prediction made at x_i."""
        x = self.last_sample
        ratio, alpha_t, h_phi_1, B_h, rks, R, b = self._coefficients(i, i - 1, order)
        m0 = self.history[-1]
        D1s = [(self.history[-(k + 2)] - m0) / rk for k, rk in enumerate(rks)]
        rhos = torch.full((1,), 0.5) if order == 1 else torch.linalg.solve(R, b)
        rhos = rhos.to(x.dtype)
        out = ratio * x - alpha_t * h_phi_1 * m0
        res = sum(rho * d for rho, d in zip(rhos[:-1], D1s))
        out = out - alpha_t * B_h * (res + rhos[-1] * (m_t - m0))
        return out.to(x.dtype)

    def step(self, model_output: torch.Tensor, t, sample: torch.Tensor) -> torch.Tensor:
        """One solver step. model_output: the velocity v at `sample`; t: step index (int) or timestep.

        Returns the sample at the next sigma, in the dtype the arithmetic gives (float32 latents stay
        float32 with a bf16 model output, as in diffusers).
        """
        if len(self.timesteps) == 0:
            raise RuntimeError("call set_timesteps() before step()")
        i = self.counter.resolve(t, self.timesteps)
        cfg = self.config
        m = sample - self.sigmas[i] * model_output  # data prediction x0
        if i > 0 and (i - 1) not in cfg.disable_corrector and self.last_sample is not None:
            sample = self._correct(m, sample, i, self.last_order)
        self.history = [*self.history[1:], m]
        order = min(cfg.solver_order, len(self.timesteps) - i) if cfg.lower_order_final else cfg.solver_order
        order = min(order, self.lower_order_nums + 1)
        self.last_sample, self.last_order = sample, order
        prev = self._predict(sample, i, order)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        self.counter.index = i + 1
        return prev
