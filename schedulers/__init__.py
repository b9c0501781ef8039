"""Flow-matching schedulers: Euler (FLUX, Cosmos-Predict2) and UniPC on flow sigmas (Wan, Cosmos-Predict2.5).

Shared interface: `set_timesteps(n, device=None, *, sigmas=None, mu=None)`, `timesteps` (what the
transformer receives), `sigmas` (float32, CPU, one longer than timesteps), `step(model_output, i, sample)`
with i the step index (or a value from `timesteps`), and `reset()` to reuse a schedule for a new run.
"""

from dit_rt.schedulers.flow_euler import FlowMatchEulerConfig, FlowMatchEulerScheduler
from dit_rt.schedulers.unipc import UniPCConfig, UniPCFlowScheduler

__all__ = ["FlowMatchEulerConfig", "FlowMatchEulerScheduler", "UniPCConfig", "UniPCFlowScheduler"]
