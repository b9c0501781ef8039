"""Flow-matching schedulers: Euler (FLUX), UniPC on flow sigmas (Wan), Cosmos-Predict2's Euler on Karras EDM
sigmas and Predict2.5's UniPC on Karras flow sigmas (schedulers/cosmos.py), EDM Euler (Cosmos-1.0,
schedulers/edm.py).

Shared interface: `set_timesteps(n, device=None, *, sigmas=None, mu=None)`, `timesteps` (what the
transformer receives), `sigmas` (float32, CPU, one longer than timesteps), `step(model_output, i, sample)`
with i the step index (or a value from `timesteps`), and `reset()` to reuse a schedule for a new run.
"""

from dit_rt.schedulers.cosmos import KarrasFlowUniPCScheduler, Predict2EulerScheduler
from dit_rt.schedulers.edm import EDMEulerConfig, EDMEulerScheduler
from dit_rt.schedulers.flow_euler import FlowMatchEulerConfig, FlowMatchEulerScheduler
from dit_rt.schedulers.unipc import UniPCConfig, UniPCFlowScheduler

__all__ = [
    "EDMEulerConfig",
    "EDMEulerScheduler",
    "FlowMatchEulerConfig",
    "FlowMatchEulerScheduler",
    "KarrasFlowUniPCScheduler",
    "Predict2EulerScheduler",
    "UniPCConfig",
    "UniPCFlowScheduler",
]
