"""The block seam: every transformer runs its stack of blocks through a BlockRunner.

Offload prefetch, per-block compilation and step caches attach here from outside (DESIGN.md,
invariant 4), so model files keep a plain loop. Two kinds of hook, so features compose without knowing
each other:

- one *stack hook* (a step cache) decides how much of the stack runs this call: it gets the runner and
  calls `runner.run(blocks, x, args, kwargs, start, stop)` for the ranges it wants computed;
- any number of *block hooks* (offload) are told before and after each block that actually runs.

Per-block compilation needs no hook: `dit_rt.compile` compiles each block module in place, and the runner
calls the blocks as usual. CUDA graphs (`dit_rt.graphs`) replace the loop of a `run` call by a replay
when no block hook needs to run between blocks. With none of these the runner is exactly the plain loop.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class StackHook(Protocol):
    """Runs (part of) the block stack; must return what the plain loop would, or a cached stand-in."""

    def __call__(
        self, runner: BlockRunner, blocks: nn.ModuleList, x: torch.Tensor, args: tuple, kwargs: dict
    ) -> torch.Tensor: ...


class BlockHook(Protocol):
    """Told around every block call that runs (skipped blocks are not announced)."""

    def before_block(self, blocks: nn.ModuleList, i: int) -> None: ...

    def after_block(self, blocks: nn.ModuleList, i: int) -> None: ...


class BlockRunner(nn.Module):
    """Runs `x = block(x, *args, **kwargs)` over a ModuleList. Holds no parameters.

    `stack_hook` (at most one, a step cache) and `block_hooks` (e.g. offload) are plain attributes, not
    submodules, so they never appear in `state_dict()` or `named_modules()`.
    """

    def __init__(self):
        super().__init__()
        self.stack_hook: StackHook | None = None
        self.block_hooks: list[BlockHook] = []
        self.graphs = None  # a dit_rt.graphs.StackGraphs, or None

    def forward(self, blocks: nn.ModuleList, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.stack_hook is not None:
            return self.stack_hook(self, blocks, x, args, kwargs)
        return self.run(blocks, x, args, kwargs)

    def run(
        self,
        blocks: nn.ModuleList,
        x: torch.Tensor,
        args: tuple = (),
        kwargs: dict | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """blocks[start:stop] on x: a CUDA graph replay where graphs are on, else the plain loop."""
        kwargs = kwargs or {}
        if self.graphs is not None and not self.block_hooks:
            return self.graphs.run(self, blocks, x, args, kwargs, start, stop)
        return self.loop(blocks, x, args, kwargs, start, stop)

    def loop(
        self,
        blocks: nn.ModuleList,
        x: torch.Tensor,
        args: tuple = (),
        kwargs: dict | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """The plain loop over blocks[start:stop], announcing each block to the block hooks."""
        kwargs = kwargs or {}
        stop = len(blocks) if stop is None else stop
        hooks = self.block_hooks
        for i in range(start, stop):
            for h in hooks:
                h.before_block(blocks, i)
            x = blocks[i](x, *args, **kwargs)
            for h in reversed(hooks):
                h.after_block(blocks, i)
        return x


def runner_and_blocks(model: nn.Module) -> tuple[BlockRunner, nn.ModuleList]:
    """A model's block seam: its `runner` (a BlockRunner) and the ModuleList `blocks` it runs."""
    runner, blocks = getattr(model, "runner", None), getattr(model, "blocks", None)
    if not isinstance(runner, BlockRunner) or not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} needs a BlockRunner `runner` and a ModuleList `blocks`")
    return runner, blocks
