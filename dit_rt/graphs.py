"""CUDA graphs of the transformer forward: capture it once per input signature, then replay it.

A diffusion run calls the same stack of blocks with the same shapes at every step, so the whole loop
(hundreds of kernels per block) can be recorded once and replayed with one launch. `apply_cuda_graphs(model)`
records at two levels, one StackGraphs serving both:

- the whole forward (embedders, block stacks, head) when nothing in it has to run in eager code: no step
  cache and no block hooks on any stack's runner (checked at every call). The embedders' and the head's
  few dozen small kernels then cost no host time either (at Wan 1.3B the host spent ~1 ms launching them
  while the GPU idled, plus ~0.5 ms in the stack's checks). Tensors a module caches in plain attributes
  (Wan's RoPE table) are held by the graph that read them, so a replaced cache entry is never freed under
  it. The whole forward is entered through the model's `forward_seam` (dit_rt.runner), not a patched
  `forward`; a model without one gets the stack graphs only;
- otherwise the BlockRunners' seam: every `runner.run(...)` call (a full stack, or the ranges a step
  cache asks for) of every declared stack goes through it; the carry may be a tuple of tensors.

For both:

- the key is ("forward", or the (start, stop) range and the stack's name; the tree structure of the
  inputs; and each leaf: a tensor's shape, dtype, device and strides, or a plain value); a new key
  captures a new graph (a new resolution, a CFG batch);
- inputs are copied into the graph's static buffers before each replay, and the output (every tensor of
  a tuple carry) is returned as a fresh copy, so two calls (the two CFG branches) never alias;
- the weights' addresses (the blocks', or the whole model's) are recorded at capture and checked before
  each replay: weights that moved (a parked Wan 2.2 expert brought back) make that graph be captured again
  instead of reading freed memory;
- eager (no graph) when autograd is on, when the inputs are not on CUDA, or when block hooks (offload)
  are installed, whose copies must run between blocks.

All graphs of one device share one memory pool (`torch.cuda.MemPool`): they never run concurrently, and
each keeps its static inputs and output alive, so only intermediates are shared. Works on eager and on
compiled blocks (`dit_rt.compile`), with every attention backend and linear format whose kernels do not
synchronise with the host (all of dit_rt's: scales stay on the device).

With parallel= (one process per GPU, NCCL) the graphs hold the collectives that run inside the forward:
Ulysses' all-to-alls, Ring's isend / irecv, the sequence gather after the block stack. Every rank of a
group must then launch the same collectives in the same order, whether it replays or records:
- all ranks see the same keys (sequence shards are padded to equal lengths, CFG ranks run equal shapes),
  so they record a new key together; the warm-up run before a first recording also creates NCCL's lazy
  communicators and P2P connections, which cannot be created during a capture;
- a recapture for moved weights is a rank's own decision (its allocator's addresses), so it records
  without the warm-up: the rank then runs the collectives exactly once for that call, in the replay,
  like a rank that only replays;
- the capture is thread-local (`capture_error_mode`): NCCL's watchdog thread keeps querying the events
  of earlier collectives, which a global-mode capture forbids to every thread.
FSDP is refused: it frees each block's gathered weights after use and gathers them into new memory at
the next forward, on its own streams, which a replay cannot follow.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch import nn

from dit_rt.contract import block_stacks
from dit_rt.runner import BlockRunner, stack_runners

# (fn, warm_up) -> (replay, output): records fn once (after one eager run of it when warm_up); replay()
# re-runs the recording, rewriting `output` (a tensor or a tuple of tensors) in place.
Capture = Callable[[Callable[[], object], bool], tuple[Callable[[], None], object]]

# One CUDA graph memory pool per device, shared by the graphs of every model (two Wan 2.2 experts): graphs
# never run concurrently. Weakly held: the pool is released once no StackGraphs uses it.
_POOLS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class CudaRecorder:
    """The CUDA recorder: warm fn up once on a side stream (lazy kernel setup and compilation must not be
    recorded; skipped for a recapture, whose setup is done), then record it into the device's shared memory
    pool, which this recorder keeps alive."""

    def __init__(self):
        self.pool = None

    def __call__(
        self, fn: Callable[[], torch.Tensor], warm_up: bool = True
    ) -> tuple[Callable[[], None], torch.Tensor]:
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device())
        if self.pool is None:
            self.pool = _POOLS.get(device)
            if self.pool is None:
                self.pool = _POOLS[device] = torch.cuda.MemPool()
        if warm_up:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        mode = "thread_local" if dist.is_available() and dist.is_initialized() else "global"
        with torch.cuda.graph(graph, pool=self.pool.id, capture_error_mode=mode):
            out = fn()
        return graph.replay, out


def _signature(leaf) -> tuple:
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.stride())
    return ("value", type(leaf), leaf)  # must be hashable: ints, floats, strings, None


@dataclass
class _Graph:
    inputs: list[torch.Tensor]  # static buffers, in leaf order
    replay: Callable[[], None]
    output: object  # a tensor or a tuple of tensors (a stack's carry)
    weights: list[torch.Tensor]
    addresses: list[int]  # the weights' data_ptr at capture
    held: list[torch.Tensor]  # module-cached tensors the recording reads (kept alive)

    def weights_moved(self) -> bool:
        return list(map(torch.Tensor.data_ptr, self.weights)) != self.addresses


def _cached_tensors(modules: list[nn.Module]) -> list[torch.Tensor]:
    """Tensors the modules hold in plain attributes (caches such as Wan's RoPE table), not parameters or
    buffers: a graph that read them keeps them alive."""
    held = []
    for root in modules:
        for m in root.modules():
            for name, v in vars(m).items():
                if name not in ("_parameters", "_buffers", "_modules"):
                    held += [t for t in pytree.tree_leaves(v) if isinstance(t, torch.Tensor)]
    return held


class StackGraphs:
    """The runners' graph cache: `run` has `BlockRunner.run`'s signature and result. names: id of each
    stack's ModuleList -> the stack's name (part of the key)."""

    def __init__(self, capture: Capture | None = None, names: dict[int, str] | None = None):
        self.capture = capture or CudaRecorder()
        self.names = names or {}
        self.graphs: dict[tuple, _Graph] = {}
        self.captures = 0  # how many graphs were recorded (recaptures included)
        self.replays = 0
        self._in_forward = False  # recording a whole forward: its runner runs the plain loop inside

    def run(self, runner: BlockRunner, blocks: nn.ModuleList, x, args, kwargs, start, stop):
        if self._in_forward:
            return runner.loop(blocks, x, args, kwargs, start, stop)
        stop_ = len(blocks) if stop is None else stop
        name = self.names.get(id(blocks), id(blocks))
        out = self._replay(
            (start, stop, name), (x, args, kwargs), list(blocks[start:stop_]),
            lambda sx, sargs, skwargs: runner.loop(blocks, sx, sargs, skwargs, start, stop),
        )  # fmt: skip
        return runner.loop(blocks, x, args, kwargs, start, stop) if out is None else out

    def forward(self, model: nn.Module, plain: Callable, args: tuple, kwargs: dict):
        """model's forward `plain` on (args, kwargs): one replay of the whole forward when no step cache or
        block hook has to run in it, else the plain forward (whose block stacks go through `run`)."""
        if any(r.stack_hook is not None or r.block_hooks for r in stack_runners(model)):
            return plain(*args, **kwargs)

        def record(sargs, skwargs):
            self._in_forward = True
            try:
                return plain(*sargs, **skwargs)
            finally:
                self._in_forward = False

        out = self._replay(("forward",), (args, kwargs), [model], record, hold=True)
        return plain(*args, **kwargs) if out is None else out

    def _replay(self, head: tuple, tree, modules: list[nn.Module], fn, hold: bool = False):
        """Replay (recording first if needed) fn over the leaves of `tree`; None where no graph applies."""
        leaves, spec = pytree.tree_flatten(tree)
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        on_cuda = all(t.is_cuda for t in tensors) or not isinstance(self.capture, CudaRecorder)
        if torch.is_grad_enabled() or not on_cuda:
            return None
        key = (*head, spec, tuple(_signature(leaf) for leaf in leaves))
        graph = self.graphs.get(key)
        moved = graph is not None and graph.weights_moved()
        if moved:
            del self.graphs[key]  # a parked expert came back at new addresses: record again
            graph = None
        if graph is None:  # no warm-up for a recapture (see the module docstring)
            graph = self.graphs[key] = self._record(leaves, spec, modules, fn, hold, warm_up=not moved)
        for buf, t in zip(graph.inputs, tensors):
            buf.copy_(t)
        graph.replay()
        self.replays += 1
        return pytree.tree_map(torch.Tensor.clone, graph.output)

    def _record(self, leaves, spec, modules, fn, hold, warm_up: bool) -> _Graph:
        static = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        weights = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        addresses = [t.data_ptr() for t in weights]
        replay, out = self.capture(lambda: fn(*pytree.tree_unflatten(static, spec)), warm_up)
        self.captures += 1
        inputs = [t for t in static if isinstance(t, torch.Tensor)]
        return _Graph(inputs, replay, out, weights, addresses, _cached_tensors(modules) if hold else [])


def apply_cuda_graphs(model: nn.Module, capture: Capture | None = None) -> StackGraphs:
    """Replay `model`'s block stacks (and its whole forward, through its `forward_seam`) from CUDA graphs,
    captured per input signature at first use.

    Refused with block offload (its weight copies run between blocks) and with FSDP (its all-gathers put
    the weights at new addresses at every forward); `capture` replaces the CUDA recorder (tests use a
    stand-in with the same contract on the CPU).
    """
    from torch.distributed.fsdp import FSDPModule

    from dit_rt.offload import BlockOffload

    stacks = block_stacks(model)
    runners = stack_runners(model)
    if any(isinstance(h, BlockOffload) for r in runners for h in r.block_hooks):
        raise ValueError("CUDA graphs cannot be combined with offload='block' (weights move between blocks)")
    if any(isinstance(m, FSDPModule) for m in (model, *(b for s in stacks for b in s.blocks))):
        raise ValueError(
            "CUDA graphs cannot be combined with FSDP (it re-gathers the weights at every forward)"
        )
    graphs = StackGraphs(capture, {id(s.blocks): s.name for s in stacks})
    for r in runners:
        r.graphs = graphs
    model.forward_wrapper = lambda plain, args, kwargs: graphs.forward(model, plain, args, kwargs)
    return graphs


def remove_cuda_graphs(model: nn.Module) -> None:
    for r in stack_runners(model):
        r.graphs = None
    model.__dict__.pop("forward_wrapper", None)
