"""The block seam: every transformer runs its stacks of blocks through BlockRunners.

Offload prefetch, per-block compilation and step caches attach here from outside (DESIGN.md,
invariant 4), so model files keep a plain loop. A model declares its stacks (`dit_rt.contract`): each is
a ModuleList run as `runner(blocks, carry, *args)`, where the carry is one tensor or a tuple of tensors
(FLUX's double blocks carry (img, txt)); a block is called as `block(carry, *args)` for a tensor carry and
`block(*carry, *args)` for a tuple, returning the new carry. Two kinds of hook, so features compose
without knowing each other:

- one *stack hook* (a step cache) decides how much of a stack runs this call: it gets the runner and
  calls `runner.run(blocks, carry, args, kwargs, start, stop)` for the ranges it wants computed;
- any number of *block hooks* (offload) are told before and after each block that actually runs.

Per-block compilation needs no hook: `dit_rt.compile` compiles each block module in place, and the runner
calls the blocks as usual. CUDA graphs (`dit_rt.graphs`) replace the loop of a `run` call by a replay
when no block hook needs to run between blocks, and the whole forward through `forward_seam`. With none
of these the runner is exactly the plain loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from dit_rt.contract import block_stacks

# What a stack carries from block to block: one tensor, or a tuple of tensors (one per stream).
Carry = torch.Tensor | tuple[torch.Tensor, ...]


class StackHook(Protocol):
    """Runs (part of) the block stack; must return what the plain loop would, or a cached stand-in."""

    def __call__(
        self, runner: BlockRunner, blocks: nn.ModuleList, x: Carry, args: tuple, kwargs: dict
    ) -> Carry: ...


class BlockHook(Protocol):
    """Told around every block call that runs (skipped blocks are not announced)."""

    def before_block(self, blocks: nn.ModuleList, i: int) -> None: ...

    def after_block(self, blocks: nn.ModuleList, i: int) -> None: ...


class BlockRunner(nn.Module):
    """Runs `x = block(x, *args, **kwargs)` (`block(*x, ...)` for a tuple carry) over a ModuleList.

    Holds no parameters; one runner may run several stacks (hooks tell them apart by the ModuleList).

    `stack_hook` (at most one, a step cache) and `block_hooks` (e.g. offload) are plain attributes, not
    submodules, so they never appear in `state_dict()` or `named_modules()`.
    """

    def __init__(self):
        super().__init__()
        self.stack_hook: StackHook | None = None
        self.block_hooks: list[BlockHook] = []
        self.graphs = None  # a dit_rt.graphs.StackGraphs, or None
        self.compile_options = None  # a dit_rt.compile.CompileOptions when its blocks are compiled

    def forward(self, blocks: nn.ModuleList, x: Carry, *args, **kwargs) -> Carry:
        if self.stack_hook is not None:
            return self.stack_hook(self, blocks, x, args, kwargs)
        return self.run(blocks, x, args, kwargs)

    def run(
        self,
        blocks: nn.ModuleList,
        x: Carry,
        args: tuple = (),
        kwargs: dict | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> Carry:
        """blocks[start:stop] on x: a CUDA graph replay where graphs are on, else the plain loop."""
        kwargs = kwargs or {}
        if self.graphs is not None and not self.block_hooks:
            return self.graphs.run(self, blocks, x, args, kwargs, start, stop)
        return self.loop(blocks, x, args, kwargs, start, stop)

    def loop(
        self,
        blocks: nn.ModuleList,
        x: Carry,
        args: tuple = (),
        kwargs: dict | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> Carry:
        """The plain loop over blocks[start:stop], announcing each block to the block hooks."""
        kwargs = kwargs or {}
        stop = len(blocks) if stop is None else stop
        hooks = self.block_hooks
        for i in range(start, stop):
            for h in hooks:
                h.before_block(blocks, i)
            x = blocks[i](*x, *args, **kwargs) if isinstance(x, tuple) else blocks[i](x, *args, **kwargs)
            for h in reversed(hooks):
                h.after_block(blocks, i)
        return x


def forward_seam(forward: Callable) -> Callable:
    """Marks a transformer's `forward` as the whole-forward seam (the block seam's counterpart).

    A feature that runs the whole forward its own way (CUDA graphs of it, `dit_rt.graphs`) sets the
    instance attribute `forward_wrapper = fn(plain, args, kwargs)`, where `plain(*args, **kwargs)` is the
    undecorated forward; without one the decorated forward is the plain forward. Nothing is patched.
    """

    @functools.wraps(forward)
    def seam(self, *args, **kwargs):
        wrapper = self.__dict__.get("forward_wrapper")
        if wrapper is None:
            return forward(self, *args, **kwargs)
        return wrapper(functools.partial(forward, self), args, kwargs)

    return seam


def stack_runners(model: nn.Module) -> list[BlockRunner]:
    """The distinct BlockRunners that run the model's declared stacks (dit_rt.contract)."""
    seen: dict[int, BlockRunner] = {}
    for s in block_stacks(model):
        seen.setdefault(id(s.runner), s.runner)
    return list(seen.values())
