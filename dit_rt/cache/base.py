"""What every step cache shares: per-branch state, the step/branch the pipeline is in, counters.

A step cache is the stack hook of a transformer's BlockRunners (see dit_rt/runner.py). It keeps one
`BranchState` per branch name ("cond", "uncond", ...), so classifier-free guidance branches never compare
against each other; every transformer (each Wan 2.2 expert) has its own cache object.

A model with several stacks (FLUX: double then single blocks; `dit_rt.contract`) gets one decision per
call: the first stack *leads* (its signal or first-block residual decides, as the cache's `lead`
implements), and every later stack in the same call *follows*: it runs in full and keeps its residual
when the lead computed, and applies its cached residual when the lead skipped. The summed residuals are
the whole chain's residual, since what passes between stacks (a concatenation) is linear. Carries may
be tuples of tensors; residuals are then tuples too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dit_rt.runner import BlockRunner, Carry


def carry_map(fn: Callable[..., torch.Tensor], *carries: Carry) -> Carry:
    """fn applied stream by stream to carries of the same structure (a tensor, or a tuple of tensors)."""
    if isinstance(carries[0], tuple):
        return tuple(fn(*ts) for ts in zip(*carries))
    return fn(*carries)


def _leaves(c: Carry) -> tuple[torch.Tensor, ...]:
    return c if isinstance(c, tuple) else (c,)


def same_layout(a: Carry, b: Carry) -> bool:
    """Same structure, and per stream the same shape, dtype and device."""
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(
        x.shape == y.shape and x.dtype == y.dtype and x.device == y.device for x, y in zip(la, lb)
    )


@dataclass
class BranchState:
    prev: torch.Tensor | None = None  # the signal measured at this branch's previous call
    residual: Carry | None = None  # output - input of the skippable part, from the last computed call
    followers: dict[int, Carry] = field(default_factory=dict)  # stack position -> its whole residual
    accumulated: float = 0.0  # TeaCache: rescaled change summed since the last computed call
    computed: int = 0
    skipped: int = 0


class StepCache:
    """Base of the step caches: branch/step bookkeeping, decision log and stats.

    threshold <= 0 disables skipping altogether, so the output is exactly the uncached one. `reduce`, when
    set (sequence parallelism), all-reduces (sum) a small tensor of partial sums so that every rank takes
    the same decision from its local shard. `stacks` (ids of the model's stack ModuleLists, in run order)
    and `stream` (the carry stream a residual is measured on) come from the model's declarations
    (`apply_cache`); without them every call leads.
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
        self.stacks: list[int] = []
        self.stream = 0
        self.computing = True  # the lead's decision in the current call

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
        self, runner: BlockRunner, blocks: nn.ModuleList, x: Carry, args: tuple, kwargs: dict
    ) -> Carry:
        k = self.stacks.index(id(blocks)) if id(blocks) in self.stacks else 0
        if k == 0:
            return self.lead(runner, blocks, x, args, kwargs)
        st = self.state()
        cached = st.followers.get(k)
        if not self.computing and cached is not None and same_layout(cached, x):
            return carry_map(torch.add, x, cached)
        out = runner.run(blocks, x, args, kwargs)
        st.followers[k] = carry_map(torch.sub, out, x)
        return out

    def lead(self, runner: BlockRunner, blocks: nn.ModuleList, x: Carry, args: tuple, kwargs: dict) -> Carry:
        """The first stack's call: decide (and set `computing`), then run or reuse."""
        raise NotImplementedError(f"{type(self).__name__} does not implement lead")

    def stream_of(self, x: Carry) -> torch.Tensor:
        """The measured stream of a carry."""
        return x[self.stream] if isinstance(x, tuple) else x

    def detach(self) -> None:
        """Remove anything the cache installed besides the runner hook (probes); override as needed."""


def can_reuse(st: BranchState, x: Carry, signal: torch.Tensor) -> bool:
    """A cached residual applies only to inputs of the same shape, dtype and device as when it was made."""
    return (
        st.prev is not None
        and st.residual is not None
        and st.prev.shape == signal.shape
        and same_layout(st.residual, x)
    )
