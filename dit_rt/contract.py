"""The transformer contract: what a model file declares so that dit_rt applies its features from outside.

A transformer is a plain `nn.Module` holding the math (DESIGN.md, "Families"). Next to its forward it
declares, as class attributes, everything the runtime needs to know about it, all by name:

    class FluxTransformer(nn.Module):
        stacks = (
            BlockStack("double_blocks", carry=("img", "txt"), args=("vec", "pe"), runner="runner"),
            BlockStack("single_blocks", carry=("x",), args=("vec", "pe"), runner="runner"),
        )
        sequence_plan = SequencePlan(...)      # dit_rt.parallel.sequence: which streams split / replicate
        cache_plan = CachePlan(residual="img", module_outputs={"modulated": "double_blocks.0.img_mod"},
                               teacache=FLUX_RULES)
        keep_fp32 = ("time_in", "norm")          # parameters kept in fp32 (substring match)
        ckpt_key_map = ((r"^old\\.(.*)$", r"new.\\1"),)  # checkpoint key -> module key (None: drop the key)

        def flops(self, ...) -> int: ...      # matmul + attention FLOPs of one forward

        @forward_seam                          # dit_rt.runner: whole-forward features (CUDA graphs) hook here
        def forward(self, ...):
            ...
            img, txt = self.runner(self.double_blocks, (img, txt), vec, pe)
            x = self.runner(self.single_blocks, torch.cat([txt, img], 1), vec, pe)

Every stack is run by a `BlockRunner` (dit_rt.runner) as `runner(blocks, carry, *args)`: the carry is one
tensor or a tuple of tensors (each block is then called as `block(*carry, *args)` and returns the tuple);
the arguments after it are named by the stack's `args`, and plans refer to them by those names. Runner
hooks, CUDA graphs, per-block compile, block offload, FSDP sharding and the step caches read `stacks`
(`block_stacks(model)` resolves them); sequence parallelism reads `sequence_plan`; the loaders read
`keep_fp32` and `ckpt_key_map`; the benchmarks read `flops`. `check_transformer` checks a model's
declarations against its modules (the conformance test runs it on every transformer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from torch import nn

if TYPE_CHECKING:
    from dit_rt.cache.teacache import TeaCacheRule
    from dit_rt.parallel.sequence import SequencePlan
    from dit_rt.runner import BlockRunner


@dataclass(frozen=True)
class BlockStack:
    """One stack of blocks, run as `runner(blocks, carry, *args)`.

    blocks: `named_modules` path of the ModuleList. carry: the names of the carried streams, in order (one
    name: the carry is that tensor; several: a tuple of them). args: the names of the runner call's
    positional arguments after the carry. runner: path of the BlockRunner that runs the stack (several
    stacks may share one).
    """

    blocks: str
    carry: tuple[str, ...] = ("x",)
    args: tuple[str, ...] = ()
    runner: str = "runner"

    def __post_init__(self):
        object.__setattr__(self, "carry", tuple(self.carry))
        object.__setattr__(self, "args", tuple(self.args))
        if not self.carry:
            raise ValueError(f"stack {self.blocks!r}: the carry needs at least one stream name")
        names = self.carry + self.args
        if len(set(names)) != len(names):
            raise ValueError(f"stack {self.blocks!r}: carry and argument names must be distinct: {names}")

    def arg(self, name: str) -> int:
        """Position of runner argument `name` in the arguments after the carry (what a stack hook gets)."""
        if name not in self.args:
            raise KeyError(f"stack {self.blocks!r} has no runner argument {name!r}; it has {self.args}")
        return self.args.index(name)

    def stream(self, name: str | None) -> int:
        """Position of carry stream `name` (None: the first)."""
        if name is None:
            return 0
        if name not in self.carry:
            raise KeyError(f"stack {self.blocks!r} carries no stream {name!r}; it carries {self.carry}")
        return self.carry.index(name)


@dataclass(frozen=True)
class CachePlan:
    """What the step caches read, by name. The first declared stack leads: its first block's output and
    its arguments are measured; later stacks follow its decision (computed, or their cached residual).

    residual: the carry stream whose first-block residual FBCache compares (None: the first stream).
    runner_args: signal name -> a runner argument of the first stack (e.g. Wan's "tproj").
    module_outputs: signal name -> a submodule path whose forward output is the signal (hooked per call).
    teacache: TeaCache's rule per `ret_steps` variant (the authors' settings); None: no TeaCache for the
    model (FBCache needs no plan beyond `residual`).
    """

    residual: str | None = None
    runner_args: Mapping[str, str] = field(default_factory=dict)
    module_outputs: Mapping[str, str] = field(default_factory=dict)
    teacache: Mapping[bool, TeaCacheRule] | None = None


@runtime_checkable
class Transformer(Protocol):
    """The declarations every dit_rt transformer makes (see the module docstring)."""

    stacks: ClassVar[tuple[BlockStack, ...]]
    sequence_plan: ClassVar[SequencePlan]
    cache_plan: ClassVar[CachePlan]
    keep_fp32: ClassVar[tuple[str, ...]]
    ckpt_key_map: ClassVar[tuple[tuple[str, str | None], ...]]

    def flops(self, *args: Any, **kwargs: Any) -> int:
        """Matmul + attention FLOPs of one forward at batch 1 (its arguments are the model's sizes)."""
        ...

    def forward(self, *args: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Stack:
    """A declared BlockStack resolved on a model instance."""

    spec: BlockStack
    blocks: nn.ModuleList
    runner: BlockRunner

    @property
    def name(self) -> str:
        return self.spec.blocks


def block_stacks(model: nn.Module) -> list[Stack]:
    """The model's declared stacks, resolved to its ModuleLists and BlockRunners, in run order.

    A model that declares no `stacks` but has a `runner` and a ModuleList `blocks` is one stack named
    "blocks" carrying one tensor (text encoders)."""
    from dit_rt.runner import BlockRunner

    specs = getattr(model, "stacks", None)
    if specs is None:
        specs = (BlockStack("blocks"),)
    out = []
    for spec in specs:
        blocks, runner = _module(model, spec.blocks), _module(model, spec.runner)
        if not isinstance(blocks, nn.ModuleList) or not isinstance(runner, BlockRunner):
            raise TypeError(
                f"{type(model).__name__} stack {spec.blocks!r}: needs a ModuleList `{spec.blocks}` run by a "
                f"BlockRunner `{spec.runner}`"
            )
        out.append(Stack(spec, blocks, runner))
    return out


def _module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def check_transformer(model: nn.Module) -> None:
    """Check a transformer's declarations against its modules; raise naming the first that is wrong."""
    name = type(model).__name__
    for attr in ("stacks", "sequence_plan", "cache_plan", "keep_fp32", "ckpt_key_map", "flops"):
        if not hasattr(model, attr):
            raise TypeError(f"{name} does not declare `{attr}` (dit_rt.contract.Transformer)")
    stacks = block_stacks(model)
    if not stacks:
        raise TypeError(f"{name} declares no block stack")
    plan, lead = model.cache_plan, stacks[0].spec
    lead.stream(plan.residual)
    for arg in plan.runner_args.values():
        lead.arg(arg)
    for path in plan.module_outputs.values():
        if _module(model, path) is None:
            raise ValueError(f"{name}.cache_plan reads the output of {path!r}, which is not a module")
    if plan.teacache is not None:
        for rule in plan.teacache.values():
            if rule.signal not in plan.runner_args and rule.signal not in plan.module_outputs:
                raise ValueError(f"{name}.cache_plan: TeaCache signal {rule.signal!r} is not declared")
