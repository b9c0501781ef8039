"""Per-block torch.compile: each transformer block is compiled in place (`nn.Module.compile`).

Why per block and not the whole model: the block is the unit every other feature works around. Step
caches decide in eager code between blocks (they read `.item()`), offload swaps a block's weights between
calls, sequence parallelism shards the runner's inputs; none of that is inside a compiled region, so it all
keeps working. All blocks of a model share one forward, and parameters are graph inputs (dynamo inlines
built-in nn modules), so one compilation serves every block and every expert of the same shape.

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

from dit_rt.runner import runner_and_blocks


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
    """Compile every block of `model` in place; compilation itself happens at the first forward.

    dynamic=False: one graph per input shape (a generation keeps its shapes; a new resolution recompiles).
    cuda_graphs=True also replays the whole block loop from CUDA graphs (dit_rt.graphs.apply_cuda_graphs).
    """
    runner, blocks = runner_and_blocks(model)
    if cuda_graphs:
        from dit_rt.graphs import apply_cuda_graphs

        apply_cuda_graphs(model)  # refused (before anything is compiled) with block offload
    opts = CompileOptions(backend, mode, fullgraph, dynamic, cuda_graphs)
    for block in blocks:
        block.compile(backend=backend, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
    runner.compile_options = opts
    return opts


def remove_compile(model: nn.Module) -> None:
    """Back to eager blocks."""
    runner, blocks = runner_and_blocks(model)
    for block in blocks:
        block._compiled_call_impl = None
    opts = getattr(runner, "compile_options", None)
    if opts is not None and opts.cuda_graphs:
        from dit_rt.graphs import remove_cuda_graphs

        remove_cuda_graphs(model)
    runner.compile_options = None


def compile_options(model: nn.Module) -> CompileOptions | None:
    return getattr(getattr(model, "runner", None), "compile_options", None)
