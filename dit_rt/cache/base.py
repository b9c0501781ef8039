"""What every step cache shares: per-branch state, the step/branch the pipeline is in, counters.

A step cache is the BlockRunner's stack hook (see dit_rt/runner.py). It keeps one `BranchState` per
branch name ("cond", "uncond", ...), so classifier-free guidance branches never compare against each
other; every transformer (each Wan 2.2 expert) has its own runner and so its own cache object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dit_rt.runner import BlockRunner


@dataclass
class BranchState:
    prev: torch.Tensor | None = None  # the signal measured at this branch's previous call
    residual: torch.Tensor | None = None  # output - input of the skippable part, from the last computed call
    accumulated: float = 0.0  # TeaCache: rescaled change summed since the last computed call
    computed: int = 0
    skipped: int = 0


class StepCache:
    """Base of the step caches: branch/step bookkeeping, decision log and stats.

    threshold <= 0 disables skipping altogether, so the output is exactly the uncached one. `reduce`, when
    set (sequence parallelism), all-reduces (sum) a small tensor of partial sums so that every rank takes
    the same decision from its local shard.
    """

    kind = ""

    def __init__(self, threshold: float):
        if not isinstance(threshold, (int, float)) or threshold < 0:
            raise ValueError(f"cache threshold must be a number >= 0, got {threshold!r}")
        self.threshold = float(threshold)
        self.step: int | None = None
        self.num_steps: int | None = None
        self.branch = "default"
        self.states: dict[str, BranchState] = {}
        self.decisions: list[tuple[int | None, str, bool]] = []  # (step, branch, computed) per call
        self.reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def reset(self, num_steps: int | None = None) -> None:
        """Forget all branches (a new generation); `num_steps` enables the step-position rules."""
        self.states.clear()
        self.decisions.clear()
        self.step, self.num_steps, self.branch = None, num_steps, "default"

    def state(self) -> BranchState:
        return self.states.setdefault(self.branch, BranchState())

    def record(self, st: BranchState, computed: bool) -> None:
        if computed:
            st.computed += 1
        else:
            st.skipped += 1
        self.decisions.append((self.step, self.branch, computed))

    def stats(self) -> dict:
        computed = sum(s.computed for s in self.states.values())
        skipped = sum(s.skipped for s in self.states.values())
        return {"cache": self.kind, "computed": computed, "skipped": skipped}

    def rel_l1(self, new: torch.Tensor, prev: torch.Tensor) -> float:
        """mean |new - prev| / mean |prev| over all elements (all ranks' shards when `reduce` is set)."""
        sums = torch.stack([(new.float() - prev.float()).abs().sum(), prev.float().abs().sum()])
        if self.reduce is not None:
            sums = self.reduce(sums)
        num, den = sums.tolist()
        return num / den if den > 0 else float("inf")

    def __call__(
        self, runner: BlockRunner, blocks: nn.ModuleList, x: torch.Tensor, args: tuple, kwargs: dict
    ) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement __call__")

    def detach(self) -> None:
        """Remove anything the cache installed besides the runner hook (probes); override as needed."""


def can_reuse(st: BranchState, x: torch.Tensor, signal: torch.Tensor) -> bool:
    """A cached residual applies only to inputs of the same shape, dtype and device as when it was made."""
    return (
        st.prev is not None
        and st.residual is not None
        and st.prev.shape == signal.shape
        and st.residual.shape == x.shape
        and st.residual.dtype == x.dtype
        and st.residual.device == x.device
    )
