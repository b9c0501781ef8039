"""Block-wise offload scheduling on CPU (host and "device" both CPU, synchronous copies): same output as no
offload, the right prefetch order and pool usage, quantized buffers moved, components on demand."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
import torch

from dit_rt.cache import apply_cache, cache_reset
from dit_rt.offload import BlockOffload, ComponentOffload, Packed, apply_offload, leading_blocks_within
from dit_rt.ops.linear import quantize_
from dit_rt.runtime import AUTO_RESIDENT, RuntimeOptions, parse_offload
from tests.test_wan_transformer import from_reference, inputs
from tests.tiny_checkpoints import make_wan_transformer

LAYERS = 5


@pytest.fixture(scope="module")
def reference():
    return make_wan_transformer(num_layers=LAYERS)


def pair(reference, fmt=None):
    """Two identical models: one plain, one to offload."""
    a, b = from_reference(reference), from_reference(reference)
    if fmt:
        quantize_(a, fmt)
        quantize_(b, fmt)
    return a, b


def slot_of(hook: BlockOffload, t: torch.Tensor) -> int | None:
    for k, s in enumerate(hook.slots):
        if s.flat is None:  # released
            continue
        start = s.flat.data_ptr()
        if start <= t.data_ptr() < start + s.flat.numel():
            return k
    return None


def watch(hook: BlockOffload, blocks):
    """Pre-hooks asserting that every tensor of a running block lives in the slot the scheduler says."""
    seen = []

    def check(i):
        def pre(module, args):
            tensors = [*module.parameters(), *module.buffers()]
            if i < hook.resident:
                assert all(slot_of(hook, t) is None for t in tensors)
            else:
                slot = hook.where[i].index
                assert all(slot_of(hook, t) == slot for t in tensors)
                # Evicted streamed blocks point back at their host copy.
                for j in set(hook.streamed) - set(hook.where):
                    assert all(slot_of(hook, t) is None for t in blocks[j].parameters())
            assert len(hook.where) <= len(hook.slots)
            seen.append(i)

        return pre

    for i, b in enumerate(blocks):
        b.register_forward_pre_hook(check(i))
    return seen


@torch.no_grad()
@pytest.mark.parametrize("resident, buffers", [(0, 1), (1, 2), (2, 3), (0, 5)])
def test_block_offload_equals_no_offload(reference, resident, buffers):
    plain, model = pair(reference)
    hook = apply_offload(model, "block", device="cpu", resident=resident, buffers=buffers)
    hook.log = []
    seen = watch(hook, model.blocks)
    streamed = LAYERS - resident
    for step in range(3):
        x, t, ctx = inputs(grid=(2, 4, 4), seed=step)
        assert torch.equal(model(x, t, ctx), plain(x, t, ctx))
        if buffers >= streamed:  # the pool holds every streamed block: copied once, then reused
            assert hook.copies == streamed
        else:  # each streamed block once per forward, plus the next forward's first ones prefetched
            assert hook.copies == streamed * (step + 1) + (buffers - 1)
    assert seen == list(range(LAYERS)) * 3
    # Every run uses the block its slot received last, and blocks are copied in run order (prefetch).
    owner = {}
    copies = []
    for kind, i, s in hook.log:
        if kind == "copy":
            owner[s] = i
            copies.append(i)
        else:
            assert owner[s] == i
    order = list(range(resident, LAYERS))
    assert copies == (order * 4)[: len(copies)]


@torch.no_grad()
def test_prefetch_runs_ahead_and_never_evicts_the_running_block(reference):
    _, model = pair(reference)
    hook = apply_offload(model, "block", device="cpu", resident=0, buffers=3)
    hook.log = []
    x, t, ctx = inputs(grid=(2, 4, 4))
    model(x, t, ctx)
    log = hook.log
    # Block 0 is loaded on demand, then blocks 1 and 2 are prefetched before block 0 runs to completion,
    # and at block LAYERS-1 the next forward's first blocks are already on their way.
    assert log[:4] == [("copy", 0, 0), ("run", 0, 0), ("copy", 1, 1), ("copy", 2, 2)]
    runs = [(k, i) for k, i, _ in log]
    assert runs.index(("copy", 3)) < runs.index(("run", 2))
    copies = [(i, s) for k, i, s in log if k == "copy"]
    last_run_slot = [s for k, i, s in log if k == "run"][-1]
    assert [i for i, _ in copies[-2:]] == [0, 1]
    assert all(s != last_run_slot for _, s in copies[-2:])


@torch.no_grad()
def test_released_slots_are_freed_and_come_back(reference):
    # a text encoder runs once per request: its slots are dropped after it, allocated again on the next run
    plain, model = pair(reference)
    hook = apply_offload(model, "block", device="cpu", resident=1, buffers=2)
    x, t, ctx = inputs(grid=(2, 4, 4))
    expected = plain(x, t, ctx)
    assert torch.equal(model(x, t, ctx), expected)
    hook.release()
    assert all(s.flat is None for s in hook.slots) and not hook.where
    for j in hook.streamed:  # every streamed block back on its host copy
        host = hook.packed[j].host
        start, end = host.data_ptr(), host.data_ptr() + host.numel()
        assert all(start <= p.data_ptr() < end for p in model.blocks[j].parameters())
    seen = watch(hook, model.blocks)
    assert torch.equal(model(x, t, ctx), expected)
    assert seen == list(range(LAYERS)) and all(s.flat.numel() == hook.slot_bytes for s in hook.slots)


@torch.no_grad()
def test_quantized_buffers_are_offloaded(reference):
    plain, model = pair(reference, fmt="fp8-per-tensor")
    names = [n for n, _ in model.blocks[0].named_buffers()]
    assert any("qweight" in n or "weight_scale" in n for n in names), names
    hook = apply_offload(model, "block", device="cpu", resident=0, buffers=2)
    watch(hook, model.blocks)
    x, t, ctx = inputs(grid=(2, 4, 4))
    assert torch.equal(model(x, t, ctx), plain(x, t, ctx))
    # After the forward the slots hold block 4 and the prefetched block 0; block 2 is back on the host.
    assert sorted(hook.where) == [0, 4]
    qweights = [b for b in model.blocks[2].buffers() if b.dtype == torch.float8_e4m3fn]
    assert qweights and all(slot_of(hook, b) is None for b in qweights)
    host = hook.packed[2].host
    assert all(host.data_ptr() <= b.data_ptr() < host.data_ptr() + host.numel() for b in qweights)


@torch.no_grad()
def test_offload_with_step_cache(reference):
    plain, model = pair(reference)
    apply_offload(model, "block", device="cpu", resident=1, buffers=2)
    for m in (plain, model):
        apply_cache(m, dict(kind="fbcache", threshold=0.5))
        cache_reset(m)
    x, _, ctx = inputs(grid=(2, 4, 4))
    for t in (999.0, 990.0, 980.0, 500.0):
        ts = torch.tensor([t])
        assert torch.equal(model(x, ts, ctx), plain(x, ts, ctx))
    assert model.runner.stack_hook.decisions == plain.runner.stack_hook.decisions


@torch.no_grad()
def test_component_offload_moves_on_demand(reference):
    plain, model = pair(reference)
    offload = apply_offload(model, "model", device="cpu")
    assert isinstance(offload, ComponentOffload)
    host = offload.packed[id(model)].host
    inside = host.data_ptr(), host.data_ptr() + host.numel()
    p = model.blocks[0].attn1.to_qkv.weight
    assert inside[0] <= p.data_ptr() < inside[1]
    x, t, ctx = inputs(grid=(2, 4, 4))
    with offload.use(model, None):
        assert not inside[0] <= p.data_ptr() < inside[1]  # a separate device buffer
        out = model(x, t, ctx)
    assert inside[0] <= p.data_ptr() < inside[1] and offload.copies == 1
    assert torch.equal(out, plain(x, t, ctx))


def test_offload_errors(reference):
    _, model = pair(reference)
    with pytest.raises(ValueError, match="choose one of: block, model"):
        apply_offload(model, "layer", device="cpu")
    with pytest.raises(ValueError, match="resident=9"):
        apply_offload(model, "block", device="cpu", resident=9)
    apply_offload(model, "block", device="cpu")
    with pytest.raises(RuntimeError, match="already has block offload"):
        apply_offload(model, "block", device="cpu")


class FakeCudart:
    """torch.cuda.cudart() stand-in recording host registrations (page-locking needs a CUDA driver)."""

    cudaError = SimpleNamespace(success=0, memoryAllocation=2)

    def __init__(self, fail: bool = False):
        self.fail, self.registered, self.unregistered = fail, [], []

    def cudaHostRegister(self, ptr, nbytes, flags):
        self.registered.append((ptr, nbytes, flags))
        return 2 if self.fail else 0

    def cudaHostUnregister(self, ptr):
        self.unregistered.append(ptr)
        return 0


@torch.no_grad()
def test_pinned_host_buffer_is_exact_and_unregistered_with_its_last_view(reference, monkeypatch):
    plain, model = pair(reference)
    cudart = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    packed = Packed(model.blocks[1], pin=True)
    # exactly the packed size (torch's pinned allocator would round it up to a power of two)
    assert packed.host.numel() == packed.nbytes and packed.nbytes & (packed.nbytes - 1)
    assert cudart.registered == [(packed.host.data_ptr(), packed.nbytes, 0)]
    x, t, ctx = inputs(grid=(2, 4, 4))
    assert torch.equal(model(x, t, ctx), plain(x, t, ctx))  # the block computes from the registered memory
    ptr = packed.host.data_ptr()
    del packed
    gc.collect()
    assert cudart.unregistered == []  # the block's parameters still view it
    del model
    gc.collect()
    assert cudart.unregistered == [ptr]
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart(fail=True))
    with pytest.raises(RuntimeError, match="cudaHostRegister of .* GiB of host memory failed"):
        Packed(plain.blocks[0], pin=True)


@torch.no_grad()
def test_resident_budget_keeps_the_leading_blocks(reference):
    plain, model = pair(reference)
    block = sum(t.numel() * t.element_size() for t in model.blocks[0].parameters())
    assert leading_blocks_within(list(model.blocks), 0) == 0
    assert leading_blocks_within(list(model.blocks), int(2.5 * block)) == 2
    assert leading_blocks_within(list(model.blocks), 100 * block) == LAYERS
    hook = apply_offload(model, "block", device="cpu", resident_bytes=int(2.5 * block))
    assert hook.resident == 2 and hook.streamed == list(range(2, LAYERS))
    x, t, ctx = inputs(grid=(2, 4, 4))
    assert torch.equal(model(x, t, ctx), plain(x, t, ctx))


def test_offload_option_parsing():
    assert parse_offload(None) == (None, 0) and parse_offload("model") == ("model", 0)
    assert parse_offload(dict(name="block", resident_gib=1.5)) == ("block", int(1.5 * 2**30))
    assert parse_offload(dict(name="block", resident_gib="auto")) == ("block", AUTO_RESIDENT)
    opts = RuntimeOptions.create(device="cpu", offload=dict(name="block", resident_gib=2))
    assert opts.offload == "block" and opts.offload_resident == 2 * 2**30
    for bad, match in (
        (dict(name="model", resident_gib=1), "a dict takes name='block' and resident_gib="),
        (dict(name="block", resident=1), "a dict takes name='block'"),
        (dict(name="block", resident_gib=-1), "resident_gib=-1 must be a number of GiB >= 0"),
        (dict(name="block", resident_gib="4"), "must be a number of GiB"),
        ("layer", "choose one of: block, model"),
    ):
        with pytest.raises(ValueError, match=match):
            RuntimeOptions.create(device="cpu", offload=bad)
