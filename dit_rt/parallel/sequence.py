"""Sequence parallelism applied to a model from outside, driven by a small per-model plan.

A model declares its block stacks (`dit_rt.contract.BlockStack`: each run as `runner(blocks, carry, *args)`
with every carry stream and argument named) and, as the class attribute `sequence_plan`, what each of
those runner inputs is along the token sequence and which attention modules attend over which streams:

    sequence_plan = SequencePlan(                 # Wan: runner(blocks, x, context, context_img, tproj, rope)
        inputs={"x": Split("x"), "rope": Split("x", dim=0), "context": Replicate(), ...},
        attention={"blocks.*.attn1.attn": ("x",)},
    )
    sequence_plan = SequencePlan(                 # FLUX: (img, txt) double stack, [txt; img] single stack
        inputs={"img": Split("img"), "txt": Split("txt"), "x": Split("txt", "img"),
                "pe": Split("txt", "img", dim=2), "vec": Replicate()},
        attention={"double_blocks.*.attn.attn": ("txt", "img"), "single_blocks.*.attn.attn": ("txt", "img")},
    )

A *stream* is one token sequence (Wan's video tokens; FLUX's text and image tokens). Split streams are
padded at their own end and sharded over the sequence-parallel ranks, each with its own real length; an
input holding several streams (a joint [txt; img] carry or RoPE table) is split stream by stream, so a rank
holds [txt shard; img shard] (split.py). Replicated inputs (cross-attention text, timestep projections)
stay whole on every rank.

`SequenceParallel.apply` hooks every runner of the model's stacks: before a stack runs, each split input (a
tensor, or every tensor of a tuple such as RotaryFreqs) is sharded and the stream lengths recorded; after
it, each split carry stream is gathered and trimmed. A stream's length is measured on the inputs that hold
it alone; an input that holds it only jointly (FLUX's single stack) uses the length recorded by an earlier
stack of the same forward. Each stack call is sharded and gathered on its own, so model code between
stacks (FLUX's cat of txt and img, its slice of the image tokens) sees whole tensors; the price is one
all-gather of the carry per stack call, small next to a stack's attention traffic. RoPE tables are
computed for the full sequence and sharded exactly like the tokens, so positions are right on every shard.
Matching attention modules get a `SequenceParallelAttention` op (Ulysses / Ring / both) wrapping the
backend installed before, told which streams its sequence concatenates so padded keys are excluded by
position; every other Attention (cross-attention over replicated text or image tokens) keeps running
locally.
Apply after `set_attention`: installing a backend again replaces the wrapped ops.

Under torch.compile (per-block, fullgraph=True, dit_rt.compile) the op is traced into the block's graph
where it can be: Ulysses' `dist.all_to_all_single` is one of the c10d calls dynamo rewrites into a
functional collective, which inductor schedules like any other op. Ring's batched isend / irecv is not
traceable (dynamo refuses P2P ops unless an experimental flag is set), and `torch.compiler.disable` around
it would need fullgraph=False and cut each block into two graphs. So an attention with a ring group (Ring
alone, or inside Ulysses) enters the compiled graph as one opaque custom op,
`dit_rt::sequence_parallel_attention`, which runs the eager code above: the block stays one graph, with
its projections, norms, RoPE and FFN compiled around the op. Eager calls do not go through the op.
"""

from __future__ import annotations

import fnmatch
import itertools
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from dit_rt.contract import BlockStack, block_stacks
from dit_rt.ops.attention import Attention, AttentionBackend
from dit_rt.ops.custom import kernel_op
from dit_rt.parallel.mesh import ParallelMesh
from dit_rt.parallel.ring import ring_attention
from dit_rt.parallel.split import ShardLayout, gather_streams, shard_streams
from dit_rt.parallel.ulysses import ulysses_attention


@dataclass(frozen=True, init=False)
class Split:
    """A runner input split along the sequence: the streams it holds, concatenated in this order along
    `dim` (one stream for most inputs, several for a joint one). Every tensor of a tuple input is split."""

    streams: tuple[str, ...]
    dim: int

    def __init__(self, *streams: str, dim: int = 1):
        if not streams or len(set(streams)) != len(streams) or not all(isinstance(s, str) for s in streams):
            raise ValueError(f"Split{streams}: name one or more distinct streams")
        object.__setattr__(self, "streams", streams)
        object.__setattr__(self, "dim", dim)


@dataclass(frozen=True)
class Replicate:
    """A runner input every rank holds whole (no sequence dim, or tokens attended to by cross-attention)."""


@dataclass(frozen=True)
class SequencePlan:
    """What a model tells the runtime for sequence parallelism, all by name (see the module docstring).

    inputs: every runner input of every declared stack (carry stream or argument name, `BlockStack`) ->
    Split or Replicate. attention: fnmatch pattern of `named_modules` Attention paths -> the split streams
    whose shards, concatenated in this order, are the sequence those modules attend over (q, k and v).
    """

    inputs: Mapping[str, Split | Replicate]
    attention: Mapping[str, tuple[str, ...]]

    def __post_init__(self):
        for name, spec in self.inputs.items():
            if not isinstance(spec, (Split, Replicate)):
                raise TypeError(
                    f"sequence plan: input {name!r} is {spec!r}; expected Split(...) or Replicate()"
                )
        split = {s for spec in self.inputs.values() if isinstance(spec, Split) for s in spec.streams}
        for pattern, streams in self.attention.items():
            if isinstance(streams, str) or not streams:
                raise TypeError(f"sequence plan: attention {pattern!r} needs a tuple of stream names")
            unknown = [s for s in streams if s not in split]
            if unknown:
                raise ValueError(
                    f"sequence plan: attention {pattern!r} attends over {unknown}, which no input splits "
                    f"(split streams: {sorted(split)})"
                )

    def check(self, stacks: list[BlockStack], owner: str) -> None:
        """Raise unless the plan declares exactly the runner inputs of `stacks` (of model class `owner`)."""
        names: dict[str, str] = {}  # runner input -> the first stack that takes it
        for s in stacks:
            for n in s.carry + s.args:
                names.setdefault(n, s.blocks)
        missing = [n for n in names if n not in self.inputs]
        if missing:
            raise ValueError(
                f"sequence plan of {owner}: runner input(s) {missing} (stack {names[missing[0]]!r}) are not "
                "declared; declare each as Split(...) or Replicate()"
            )
        unknown = [n for n in self.inputs if n not in names]
        if unknown:
            raise ValueError(
                f"sequence plan of {owner}: {unknown} is no runner input of its stacks; they take "
                f"{sorted(names)}"
            )


@dataclass
class SequenceLayout:
    """Per-forward state shared by the runner hooks and the attention ops: the real length of each split
    stream (set when a stack's inputs are sharded) and the sequence-parallel degree."""

    lengths: dict[str, int] = field(default_factory=dict)
    world: int = 1

    def valid(self, streams: tuple[str, ...]) -> int | ShardLayout:
        """The real keys of a sequence of `streams`: a length for one stream, else its ShardLayout."""
        if len(streams) == 1:
            return self.lengths[streams[0]]
        return ShardLayout(tuple(self.lengths[s] for s in streams), self.world)


# handle -> op, for the opaque custom op (a custom op takes no Python objects; the handle is a constant
# of the compiled graph, and dynamo guards on the op object that holds it).
_OPS: weakref.WeakValueDictionary[int, SequenceParallelAttention] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


class SequenceParallelAttention:
    """An Attention `op` for attention on sequence shards: op(q, k, v, scale) on (B, Ls, H, D), where each
    rank's Ls tokens are its shards of `streams`, concatenated in that order.

    Ulysses when the mesh's ulysses degree is > 1 (with Ring inside it when ring > 1), else Ring.
    """

    def __init__(
        self, base: AttentionBackend, mesh: ParallelMesh, layout: SequenceLayout, streams: tuple[str, ...]
    ):
        self.base = base
        self.layout = layout
        self.streams = tuple(streams)
        self.ulysses_group = mesh.group("ulysses")
        self.ring_group = mesh.group("ring")
        self.name = (
            f"{getattr(base, 'name', 'custom')}+sp(ulysses={mesh.size('ulysses')}, ring={mesh.size('ring')})"
        )
        self.handle = next(_HANDLES)
        _OPS[self.handle] = self

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None):
        if self.ring_group is not None and torch.compiler.is_compiling():
            return _opaque_attention(q, k, v, scale, self.handle)  # see the module docstring
        return self.run(q, k, v, scale)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None):
        """The eager sequence-parallel attention (what `__call__` runs outside torch.compile)."""
        valid = self.layout.valid(self.streams)
        if self.ulysses_group is not None:
            return ulysses_attention(
                q, k, v, scale, group=self.ulysses_group, backend=self.base, valid_len=valid,
                ring_group=self.ring_group,
            )  # fmt: skip
        return ring_attention(q, k, v, scale, group=self.ring_group, backend=self.base, valid_len=valid)


@kernel_op("dit_rt::sequence_parallel_attention", mutates_args=())
def _opaque_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, handle: int
) -> torch.Tensor:
    # Contiguous, as the fake says (Ulysses' head-padding slice is a strided view).
    return _OPS[handle].run(q, k, v, scale).contiguous()


@_opaque_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, handle: int) -> torch.Tensor:
    return q.new_empty((*q.shape[:3], v.shape[-1]))  # [B, Ls, H, Dv] in q's dtype


def _map_tensors(x, fn):
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, tuple):
        mapped = [_map_tensors(t, fn) for t in x]
        return type(x)(*mapped) if hasattr(x, "_fields") else tuple(mapped)
    raise TypeError(f"sequence plan: cannot shard an argument of type {type(x).__name__}")


def _first_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else _first_tensor(x[0])


class SequenceParallel:
    """Installs sequence parallelism into a model per its SequencePlan; `remove()` undoes it."""

    def __init__(self, model: nn.Module, mesh: ParallelMesh, plan: SequencePlan | None = None):
        owner = type(model).__name__
        plan = plan or getattr(model, "sequence_plan", None)
        if plan is None:
            raise ValueError(
                f"{owner} declares no `sequence_plan`; sequence parallelism needs one "
                "(see dit_rt.parallel.SequencePlan)"
            )
        stacks = block_stacks(model)
        plan.check([s.spec for s in stacks], owner)
        self.model, self.mesh, self.plan = model, mesh, plan
        self.world, self.rank = mesh.size("sp"), mesh.rank("sp")
        self.group = mesh.group("sp")
        self.layout = SequenceLayout(world=self.world)
        self._stacks = {id(s.blocks): s.spec for s in stacks}
        modules = dict(model.named_modules())
        self._ops: list[tuple[Attention, AttentionBackend]] = []
        shared: dict[
            tuple, SequenceParallelAttention
        ] = {}  # one op per backend: one compiled graph per block
        for pattern, streams in plan.attention.items():
            found = [
                m for n, m in modules.items() if isinstance(m, Attention) and fnmatch.fnmatchcase(n, pattern)
            ]
            if not found:
                raise ValueError(f"sequence plan: no Attention module of {owner} matches {pattern!r}")
            for m in found:
                if any(m is done for done, _ in self._ops):
                    raise ValueError(f"sequence plan: {owner} attention {pattern!r} matches a module twice")
                key = (id(m.op), tuple(streams))
                if key not in shared:
                    shared[key] = SequenceParallelAttention(m.op, mesh, self.layout, tuple(streams))
                self._ops.append((m, m.op))
                m.op = shared[key]
        self._hooks = []
        for runner in {id(s.runner): s.runner for s in stacks}.values():  # one runner may run several stacks
            self._hooks += [
                runner.register_forward_pre_hook(self._shard),
                runner.register_forward_hook(self._gather),
            ]

    @classmethod
    def apply(
        cls, model: nn.Module, mesh: ParallelMesh, plan: SequencePlan | None = None
    ) -> SequenceParallel:
        return cls(model, mesh, plan)

    def _stack(self, blocks: nn.Module) -> BlockStack:
        spec = self._stacks.get(id(blocks))
        if spec is None:
            raise ValueError(
                f"sequence parallel: {type(self.model).__name__}'s runner ran a block list that is none of "
                f"its declared stacks {[s.blocks for s in self._stacks.values()]}"
            )
        return spec

    def _shard(self, module: nn.Module, args: tuple) -> tuple:
        spec = self._stack(args[0])
        carry = tuple(args[1]) if len(spec.carry) > 1 else (args[1],)
        names, values = spec.carry + spec.args, carry + tuple(args[2:])
        if len(values) != len(names):
            raise ValueError(
                f"sequence parallel: stack {spec.blocks!r} declares inputs {names}, its runner got "
                f"{len(values)}"
            )
        seen: dict[str, tuple[int, str]] = {}  # stream -> (length, input that holds it alone)
        for name, value in zip(names, values):
            split = self.plan.inputs[name]
            if isinstance(split, Split) and len(split.streams) == 1 and value is not None:
                n = _first_tensor(value).shape[split.dim]
                stream = split.streams[0]
                if seen.setdefault(stream, (n, name))[0] != n:
                    raise ValueError(
                        f"sequence plan: stream {stream!r} has {seen[stream][0]} tokens in "
                        f"{seen[stream][1]!r} but {n} in {name!r} (dim {split.dim})"
                    )
        self.layout.lengths.update({stream: n for stream, (n, _) in seen.items()})
        out = [self._shard_input(name, value) for name, value in zip(names, values)]
        carry = tuple(out[: len(spec.carry)]) if len(spec.carry) > 1 else out[0]
        return (args[0], carry, *out[len(spec.carry) :])

    def _lengths(self, split: Split, name: str) -> list[int]:
        unknown = [s for s in split.streams if s not in self.layout.lengths]
        if unknown:
            raise ValueError(
                f"sequence plan: input {name!r} holds stream(s) {unknown} jointly, but no input of this or "
                "an earlier stack holds them alone, so their lengths are unknown"
            )
        return [self.layout.lengths[s] for s in split.streams]

    def _shard_input(self, name: str, value):
        split = self.plan.inputs[name]
        if value is None or not isinstance(split, Split):
            return value
        lengths = self._lengths(split, name)
        return _map_tensors(value, lambda t: shard_streams(t, split.dim, self.world, self.rank, lengths))

    def _gather(self, module: nn.Module, args: tuple, out):
        spec = self._stack(args[0])
        many = len(spec.carry) > 1
        parts = [self._gather_stream(name, value) for name, value in zip(spec.carry, out if many else (out,))]
        return tuple(parts) if many else parts[0]

    def _gather_stream(self, name: str, x: torch.Tensor) -> torch.Tensor:
        split = self.plan.inputs[name]
        if not isinstance(split, Split):
            return x
        return gather_streams(x, split.dim, self.group, self._lengths(split, name))

    def remove(self) -> None:
        """Restore the original attention ops and unhook the runners."""
        for m, base in self._ops:
            m.op = base
        for h in self._hooks:
            h.remove()
