"""Sequence parallelism applied to a model from outside, driven by a small per-model plan.

A model declares (as a class attribute `sequence_plan`, or the caller passes one) where the token
sequence lives and which of its attention modules are self-attention:

    sequence_plan = SequencePlan(
        runner="runner",                          # the BlockRunner whose call runs on sequence shards
        shard_args={1: 1, 5: 0},                  # runner positional arg -> sequence dim (x; RoPE tables)
        self_attention=("blocks.*.attn1.attn",),  # Attention modules whose keys are the sharded sequence
    )

`SequenceParallel.apply` then hooks the runner: before it, each planned argument (a tensor, or every
tensor of a tuple such as RotaryFreqs) is padded and sharded along its sequence dim; after it, the
output is gathered and trimmed. RoPE tables are computed for the full sequence and sharded exactly like
the tokens, so positions are right on every shard. Matching self-attention modules get a
`SequenceParallelAttention` op (Ulysses / Ring / both) wrapping the backend installed before; every
other Attention (cross-attention over replicated text or image tokens) keeps running locally.
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
from dataclasses import dataclass, field

import torch
from torch import nn

from dit_rt.ops.attention import Attention, AttentionBackend
from dit_rt.parallel.mesh import ParallelMesh
from dit_rt.parallel.ring import ring_attention
from dit_rt.parallel.split import gather_sequence, shard_sequence
from dit_rt.parallel.ulysses import ulysses_attention


@dataclass(frozen=True)
class SequencePlan:
    """What a model tells the runtime for sequence parallelism (module paths are `named_modules` names).

    runner: path of the BlockRunner module run on shards. shard_args: the runner's positional argument
    index -> the sequence dim of that tensor (or of every tensor in that tuple); index 1 is the hidden
    states (index 0 is the block list), whose dim gives the sequence length. out_dim: sequence dim of the
    runner's output. self_attention: fnmatch patterns naming the self-attention Attention modules.
    """

    self_attention: tuple[str, ...]
    shard_args: dict[int, int] = field(default_factory=lambda: {1: 1})
    runner: str = "runner"
    out_dim: int = 1


@dataclass
class SequenceLayout:
    """Per-forward state shared by the runner hooks and the attention ops: the real sequence length."""

    valid_len: int | None = None


# handle -> op, for the opaque custom op (a custom op takes no Python objects; the handle is a constant
# of the compiled graph, and dynamo guards on the op object that holds it).
_OPS: weakref.WeakValueDictionary[int, SequenceParallelAttention] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


class SequenceParallelAttention:
    """An Attention `op` for self-attention on sequence shards: op(q, k, v, scale) on (B, Ls, H, D).

    Ulysses when the mesh's ulysses degree is > 1 (with Ring inside it when ring > 1), else Ring.
    """

    def __init__(self, base: AttentionBackend, mesh: ParallelMesh, layout: SequenceLayout):
        self.base = base
        self.layout = layout
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
        valid = self.layout.valid_len
        if self.ulysses_group is not None:
            return ulysses_attention(
                q, k, v, scale, group=self.ulysses_group, backend=self.base, valid_len=valid,
                ring_group=self.ring_group,
            )  # fmt: skip
        return ring_attention(q, k, v, scale, group=self.ring_group, backend=self.base, valid_len=valid)


@torch.library.custom_op("dit_rt::sequence_parallel_attention", mutates_args=())
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


class SequenceParallel:
    """Installs sequence parallelism into a model per its SequencePlan; `remove()` undoes it."""

    def __init__(self, model: nn.Module, mesh: ParallelMesh, plan: SequencePlan | None = None):
        plan = plan or getattr(model, "sequence_plan", None)
        if plan is None:
            raise ValueError(
                f"{type(model).__name__} declares no `sequence_plan`; sequence parallelism needs one "
                "(see dit_rt.parallel.SequencePlan)"
            )
        self.model, self.mesh, self.plan = model, mesh, plan
        self.layout = SequenceLayout()
        self.world, self.rank = mesh.size("sp"), mesh.rank("sp")
        self.group = mesh.group("sp")
        modules = dict(model.named_modules())
        if plan.runner not in modules:
            raise ValueError(f"sequence plan: {type(model).__name__} has no module {plan.runner!r}")
        self.attention: list[Attention] = []
        for pattern in plan.self_attention:
            found = [
                m for n, m in modules.items() if isinstance(m, Attention) and fnmatch.fnmatchcase(n, pattern)
            ]
            if not found:
                raise ValueError(
                    f"sequence plan: no Attention module of {type(model).__name__} matches {pattern!r}"
                )
            self.attention += found
        self._ops = [(m, m.op) for m in self.attention]
        shared: dict[int, SequenceParallelAttention] = {}  # one op per backend: one compiled graph per block
        for m, base in self._ops:
            if id(base) not in shared:
                shared[id(base)] = SequenceParallelAttention(base, mesh, self.layout)
            m.op = shared[id(base)]
        runner = modules[plan.runner]
        self._hooks = [
            runner.register_forward_pre_hook(self._shard),
            runner.register_forward_hook(self._gather),
        ]

    @classmethod
    def apply(
        cls, model: nn.Module, mesh: ParallelMesh, plan: SequencePlan | None = None
    ) -> SequenceParallel:
        return cls(model, mesh, plan)

    def _shard(self, module: nn.Module, args: tuple) -> tuple:
        length = args[1].shape[self.plan.shard_args.get(1, 1)]
        self.layout.valid_len = length
        args = list(args)
        for index, dim in self.plan.shard_args.items():
            if args[index] is not None:
                args[index] = _map_tensors(args[index], lambda t, d=dim: self._shard_tensor(t, d, length))
        return tuple(args)

    def _shard_tensor(self, x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
        if x.shape[dim] != length:
            raise ValueError(
                f"sequence plan: a sharded argument has {x.shape[dim]} tokens along dim {dim}, the hidden "
                f"states {length}"
            )
        return shard_sequence(x, dim, self.world, self.rank)

    def _gather(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return gather_sequence(out, self.plan.out_dim, self.group, self.layout.valid_len)

    def remove(self) -> None:
        """Restore the original attention ops and unhook the runner."""
        for m, base in self._ops:
            m.op = base
        for h in self._hooks:
            h.remove()
