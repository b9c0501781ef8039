"""CUDA graphs of the block stack (dit_rt.graphs), on the CPU with a stand-in recorder of the same contract:
it records fn once and `replay()` re-runs that recording, which reads the static input buffers captured at
record time and rewrites the same output tensor, exactly what a CUDA graph replay does. What is tested is
the Python side: keys, static buffers, output copies, recapture when weights move, eager fallbacks,
composition with step caches, conflicts and option validation."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

from dit_rt.cache import apply_cache, cache_branch, cache_reset, cache_step
from dit_rt.graphs import StackGraphs, apply_cuda_graphs, remove_cuda_graphs
from dit_rt.offload import apply_offload
from dit_rt.runtime import RuntimeOptions
from tests.test_wan_transformer import from_reference, inputs
from tests.tiny_checkpoints import make_wan_transformer


def fake_capture(fn, warm_up=True):
    out = fn()  # a tensor, or a tuple of tensors (a stack's carry)

    def replay():
        for o, new in zip(pytree.tree_leaves(out), pytree.tree_leaves(fn())):
            o.copy_(new)

    return replay, out


@pytest.fixture(scope="module")
def reference():
    return make_wan_transformer(num_layers=3)


@pytest.fixture
def pair(reference):
    eager, graphed = from_reference(reference), from_reference(reference)
    return eager, graphed, apply_cuda_graphs(graphed, capture=fake_capture)


@torch.no_grad()
def test_replay_equals_eager_and_outputs_do_not_alias(pair):
    eager, graphed, graphs = pair
    x, t, ctx = inputs(grid=(2, 4, 4))
    x2, _, ctx2 = inputs(grid=(2, 4, 4), seed=1)
    first = graphed(x, t, ctx)
    second = graphed(x2, torch.tensor([500.0]), ctx2)  # same signature: a replay with new inputs
    assert graphs.captures == 1 and graphs.replays == 2
    assert torch.equal(second, eager(x2, torch.tensor([500.0]), ctx2))
    assert torch.equal(first, eager(x, t, ctx))  # the first result survived the second replay
    assert not torch.equal(first, second)


@torch.no_grad()
def test_whole_forward_is_one_graph_and_holds_the_rope_it_read(pair):
    """Without a step cache the whole forward (embedders, stack, head) is recorded, not the runner's stack;
    the RoPE table cached on the model when a graph was recorded stays alive in that graph after a new
    resolution replaces the cache, so going back replays correctly."""
    eager, graphed, graphs = pair
    x, t, ctx = inputs(grid=(2, 4, 4))
    graphed(x, t, ctx)
    assert [key[0] for key in graphs.graphs] == ["forward"]
    first_rope = graphed._rope_cache[1]
    x6, t6, ctx6 = inputs(grid=(2, 4, 6))
    assert torch.equal(graphed(x6, t6, ctx6), eager(x6, t6, ctx6))
    assert graphed._rope_cache[1] is not first_rope  # the cache moved on
    held = next(iter(graphs.graphs.values())).held  # the first resolution's graph
    assert any(h is first_rope.cos for h in held) and any(h is first_rope.sin for h in held)
    assert torch.equal(graphed(x, t, ctx), eager(x, t, ctx)) and graphs.captures == 2
    remove_cuda_graphs(graphed)
    assert "forward" not in graphed.__dict__ and graphed.runner.graphs is None
    assert torch.equal(graphed(x, t, ctx), eager(x, t, ctx))


@torch.no_grad()
def test_new_signature_captures_again(pair):
    eager, graphed, graphs = pair
    for grid in [(2, 4, 4), (2, 4, 6), (2, 4, 4)]:
        x, t, ctx = inputs(grid=grid)
        assert torch.equal(graphed(x, t, ctx), eager(x, t, ctx))
    assert graphs.captures == 2 and len(graphs.graphs) == 2
    x, t, ctx = inputs(B=2, grid=(2, 4, 4))  # a CFG batch is one more signature
    assert torch.equal(graphed(x, t, ctx), eager(x, t, ctx))
    assert graphs.captures == 3


@torch.no_grad()
def test_moved_weights_are_recaptured(pair):
    eager, graphed, graphs = pair
    x, t, ctx = inputs(grid=(2, 4, 4))
    graphed(x, t, ctx)
    for m in (eager, graphed):  # a parked expert brought back: new storage (and here new values)
        w = m.blocks[1].ffn.net[2].weight
        w.data = w.data * 2
    assert torch.equal(graphed(x, t, ctx), eager(x, t, ctx))
    assert graphs.captures == 2 and len(graphs.graphs) == 1


def test_eager_when_grad_is_on_or_inputs_are_not_cuda(reference, pair):
    eager, graphed, graphs = pair
    x, t, ctx = inputs(grid=(2, 4, 4))
    out = graphed(x, t, ctx)  # autograd on: no graph
    assert graphs.captures == 0 and out.requires_grad
    real = from_reference(reference)
    real_graphs = apply_cuda_graphs(real)  # the CUDA recorder, with CPU tensors: the plain loop
    with torch.no_grad():
        assert torch.equal(real(x, t, ctx), eager(x, t, ctx))
    assert real_graphs.captures == 0 and real_graphs.replays == 0
    remove_cuda_graphs(real)
    assert real.runner.graphs is None


@torch.no_grad()
@pytest.mark.parametrize("kind", ["teacache", "fbcache"])
def test_step_caches_replay_their_ranges(pair, kind):
    eager, graphed, graphs = pair
    cache = dict(kind=kind, threshold=1e9)  # skip whatever can be skipped
    if kind == "teacache":
        cache.update(ret_steps=False, coefficients=[1.0, 0.0])
    for m in (eager, graphed):
        apply_cache(m, cache)
        cache_reset(m, 4)
    x, _, ctx = inputs(grid=(2, 4, 4))
    for i, t in enumerate([999.0, 990.0, 700.0, 300.0]):
        outs = []
        for m in (eager, graphed):
            cache_step(m, i)
            with cache_branch(m, "cond"):
                outs.append(m(x, torch.tensor([t]), ctx))
        assert torch.equal(*outs)
    decisions = [d for _, _, d in graphed.runner.stack_hook.decisions]
    assert decisions == [d for _, _, d in eager.runner.stack_hook.decisions] and False in decisions
    ranges = {key[:2] for key in graphs.graphs}
    assert ranges == ({(0, None)} if kind == "teacache" else {(0, 1), (1, None)})


def test_conflicts_and_options(reference, monkeypatch):
    model = from_reference(reference)
    apply_cuda_graphs(model, capture=fake_capture)
    with pytest.raises(ValueError, match="CUDA graphs"):
        apply_offload(model, "block", device="cpu")
    other = from_reference(reference)
    apply_offload(other, "block", device="cpu")
    with pytest.raises(ValueError, match="offload='block'"):
        apply_cuda_graphs(other)
    with pytest.raises(ValueError, match="needs device='cuda'"):
        RuntimeOptions.create(device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="True or False"):
        RuntimeOptions.create(device="cpu", cuda_graphs="yes")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # validation only: nothing touches CUDA
    with pytest.raises(ValueError, match="cannot be combined with offload='model'"):
        RuntimeOptions.create(device="cuda", cuda_graphs=True, offload="model")
    monkeypatch.undo()
    # install() puts the graphs on the runner after the other per-model features (CPU: nothing captured).
    opts = RuntimeOptions.create(device="cpu", attention="sdpa")
    opts.cuda_graphs = True
    installed = from_reference(reference)
    opts.install(installed)
    assert isinstance(installed.runner.graphs, StackGraphs)
