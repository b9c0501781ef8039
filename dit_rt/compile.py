"""Per-block torch.compile: each transformer block is compiled in place (`nn.Module.compile`).

Why per block and not the whole model: the block is the unit every other feature works around. Step
caches decide in eager code between blocks (they read `.item()`), offload swaps a block's weights between
calls, sequence parallelism shards the runner's inputs; none of that is inside a compiled region, so it all
keeps working. Every declared stack is compiled (a model may have several: FLUX's double and single
blocks; `dit_rt.contract`). All blocks of a stack share one forward, and parameters are graph inputs
(dynamo inlines built-in nn modules), so one compilation serves every block and every expert of the same
shape.

Attention backends stay traceable: sdpa is a PyTorch op and the kernel backends are `torch.library`
custom ops with fake implementations; quantized linears compile through their emulated or custom-op paths.
CUDA graphs are not inductor's per-function "reduce-overhead" mode here (its graph trees cannot chain the
outputs of one compiled function called 30 times with different weights): `cuda_graphs=True` records the
whole block loop instead (`dit_rt.graphs`), over the compiled blocks.

With parallel=, each block stays one full graph. CFG and data parallelism do not reach into the blocks.
Sequence parallelism's self-attention op is traced where it can be: Ulysses' all-to-alls become functional
collectives in the graph, Ring attention is one opaque custom op (why: `dit_rt.parallel.sequence`).
FSDP2's forward hooks are kept out of tracing by torch itself, so they run eagerly around each block's
compiled forward: the all-gather of the block's weights before it, the reshard after.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dit_rt.contract import block_stacks
from dit_rt.runner import stack_runners


@dataclass(frozen=True)
class CompileOptions:
    backend: str = "inductor"
    mode: str | None = None
    fullgraph: bool = True
    dynamic: bool = False
    cuda_graphs: bool = False


def apply_compile(
    model: nn.Module,
    *,
    backend: str = "inductor",
    mode: str | None = None,
    fullgraph: bool = True,
    dynamic: bool = False,
    cuda_graphs: bool = False,
) -> CompileOptions:
    """Compile every block of every stack of `model` in place; compilation happens at the first forward.

    dynamic=False: one graph per input shape (a generation keeps its shapes; a new resolution recompiles).
    cuda_graphs=True also replays the whole block loop from CUDA graphs (dit_rt.graphs.apply_cuda_graphs).
    """
    stacks = block_stacks(model)
    if cuda_graphs:
        from dit_rt.graphs import apply_cuda_graphs

        apply_cuda_graphs(model)  # refused (before anything is compiled) with block offload
    opts = CompileOptions(backend, mode, fullgraph, dynamic, cuda_graphs)
    for s in stacks:
        for block in s.blocks:
            block.compile(backend=backend, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
        s.runner.compile_options = opts
    return opts


def remove_compile(model: nn.Module) -> None:
    """Back to eager blocks."""
    opts = compile_options(model)
    for s in block_stacks(model):
        for block in s.blocks:
            block._compiled_call_impl = None
        s.runner.compile_options = None
    if opts is not None and opts.cuda_graphs:
        from dit_rt.graphs import remove_cuda_graphs

        remove_cuda_graphs(model)


def compile_options(model: nn.Module) -> CompileOptions | None:
    """The options `apply_compile` used on model's stacks, or None when they run eager."""
    return next((r.compile_options for r in stack_runners(model) if r.compile_options is not None), None)
