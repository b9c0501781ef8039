"""Per-block torch.compile on CPU with the `aot_eager` backend (inductor's C++ build is too slow for CI):
compiled equals eager for the tiny Wan transformer, with a step cache, with block offload and with an
emulated quantized linear format; every block is a full graph and one compilation serves all blocks."""

from __future__ import annotations

import pytest
import torch

from dit_rt.cache import apply_cache, cache_branch, cache_reset, cache_step
from dit_rt.compile import apply_compile, compile_options, remove_compile
from dit_rt.offload import apply_offload
from dit_rt.ops.linear import quantize_
from tests.test_wan_transformer import assert_close, from_reference, inputs
from tests.tiny_checkpoints import make_wan_transformer

TIMESTEPS = [999.0, 950.0, 900.0, 500.0]


@pytest.fixture(scope="module")
def reference():
    return make_wan_transformer(num_layers=3)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def steps(model, cache=False):
    x, _, ctx = inputs(grid=(2, 4, 4))
    if cache:
        cache_reset(model, len(TIMESTEPS))
    outs = []
    for i, t in enumerate(TIMESTEPS):
        cache_step(model, i)
        with cache_branch(model, "cond"):
            outs.append(model(x, torch.tensor([t]), ctx))
    return outs


def compiled_blocks(model) -> int:
    return sum(b._compiled_call_impl is not None for b in model.blocks)


@torch.no_grad()
@pytest.mark.parametrize("feature", ["plain", "teacache", "offload", "fp8-rowwise"])
def test_compiled_equals_eager(reference, feature):
    eager, model = from_reference(reference), from_reference(reference)
    if feature == "fp8-rowwise":  # emulated on CPU: quantize -> dequantize -> matmul in fp32
        quantize_(eager, feature)
        quantize_(model, feature)
    apply_compile(model, backend="aot_eager")  # fullgraph=True: a graph break would raise
    assert compiled_blocks(model) == 3 and compile_options(model).fullgraph
    if feature == "offload":
        apply_offload(model, "block", device="cpu", buffers=2)
    if feature == "teacache":
        for m in (eager, model):
            apply_cache(m, dict(kind="teacache", threshold=1e9, ret_steps=False, coefficients=[1.0, 0.0]))

    counters = torch._dynamo.utils.counters
    counters.clear()
    got, expected = steps(model, cache=True), steps(eager, cache=True)
    for a, b in zip(got, expected):
        assert_close(a, b, rel=1e-6)
    if feature == "teacache":
        decisions = [c for _, _, c in model.runner.stack_hook.decisions]
        assert decisions == [c for _, _, c in eager.runner.stack_hook.decisions]
        assert False in decisions  # the cache did skip with compiled blocks
    # Same-shaped blocks share one graph: one frame compiled for 3 blocks x 4 steps.
    assert counters["stats"]["unique_graphs"] == 1


@torch.no_grad()
def test_remove_compile_and_cuda_graph_offload_conflict(reference):
    model = from_reference(reference)
    apply_compile(model, backend="aot_eager")
    remove_compile(model)
    assert compiled_blocks(model) == 0 and compile_options(model) is None
    apply_compile(model, backend="aot_eager", cuda_graphs=True)  # the block loop replayed from graphs
    assert compile_options(model).cuda_graphs and model.runner.graphs is not None
    with pytest.raises(ValueError, match="CUDA graphs"):
        apply_offload(model, "block", device="cpu")
    remove_compile(model)
    assert model.runner.graphs is None
    other = from_reference(reference)
    apply_offload(other, "block", device="cpu")
    with pytest.raises(ValueError, match="offload='block'"):
        apply_compile(other, backend="aot_eager", cuda_graphs=True)
    assert compiled_blocks(other) == 0  # refused before anything was compiled
