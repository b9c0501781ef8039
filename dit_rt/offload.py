"""CPU offload: transformer blocks streamed through a fixed pool of device buffers, components on demand.

`offload="block"`: every tensor (parameters and buffers, so quantized formats' `qweight`/`weight_scale`
too) of each transformer block (of every declared stack, in run order: `dit_rt.contract`) is packed into
one flat pinned host buffer. A pool of `buffers` flat device slots, each the size of the largest block,
holds the blocks being used; while block i computes on the compute stream, the next blocks are copied
host -> slot on a side stream (one memcpy per block). Events order it: a slot is overwritten only after
the compute stream has finished the block that last used it (`free` event), and a block runs only after
its copy has landed (`ready` event). The first `resident` blocks stay on the device for good; the
non-block parts of the transformer (embedders, head) too.

`offload="model"`: whole components (text encoder, VAE, the transformer) live packed in pinned host
memory and move to the device only inside `use(...)`.

A block's or component's tensors are re-pointed (`param.data`, `module._buffers[name]`) to views of the
host or device buffer, so modules, `state_dict()` keys and compiled blocks see the same objects. On a
CPU-only machine the same scheduler runs with host and "device" both CPU and synchronous copies (tests).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from dit_rt.contract import block_stacks
from dit_rt.runner import stack_runners

ALIGN = 256  # byte alignment of every tensor in a packed buffer (any dtype view; aligned GEMM operands)
OFFLOAD_MODES = ("block", "model")


@dataclass
class _Entry:
    module: nn.Module
    name: str
    is_param: bool
    offset: int
    dtype: torch.dtype
    shape: torch.Size

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class _PageLocked(mmap.mmap):
    """Anonymous host memory page-locked for the GPU with cudaHostRegister, at its exact size.

    torch's pinned allocator rounds every request up to a power of two: a 1.1 GB text-encoder layer takes
    2 GiB, and the blocks of FLUX.2-dev's transformer and text encoder (~98 GB) would pin ~124 GiB, past a
    128 GiB host. The mapping is unregistered and unmapped when the last tensor viewing it is gone
    (`torch.frombuffer` holds this object).
    """

    def __new__(cls, nbytes: int):
        self = super().__new__(cls, -1, nbytes)
        self.cudart = torch.cuda.cudart()
        self.ptr = torch.frombuffer(self, dtype=torch.uint8).data_ptr()
        err = self.cudart.cudaHostRegister(self.ptr, nbytes, 0)
        if err != self.cudart.cudaError.success:
            self.ptr = None
            raise RuntimeError(
                f"cudaHostRegister of {nbytes / 2**30:.2f} GiB of host memory failed ({err}): the host "
                "cannot page-lock the offloaded weights; free host memory, or quantize them "
                "(linear='fp8-per-tensor')"
            )
        return self

    def __del__(self) -> None:
        if getattr(self, "ptr", None) is not None:
            self.cudart.cudaHostUnregister(self.ptr)
            self.ptr = None


def host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """A flat uint8 host tensor of exactly `nbytes`, page-locked when `pin` (see _PageLocked)."""
    if not pin or nbytes == 0:
        return torch.empty(nbytes, dtype=torch.uint8)
    return torch.frombuffer(_PageLocked(nbytes), dtype=torch.uint8)


class Packed:
    """Every parameter and buffer of `module`, packed into one flat uint8 host buffer (pinned if `pin`).

    The module's tensors are re-pointed to views of the host buffer; `point(flat)` re-points them to
    views of any other flat buffer of at least `nbytes` (a device slot), `point(self.host)` back.
    """

    def __init__(self, module: nn.Module, pin: bool):
        self.entries: list[_Entry] = []
        seen: dict[int, _Entry] = {}
        unique: list[tuple[_Entry, torch.Tensor]] = []
        offset = 0
        for m in module.modules():
            for table, is_param in ((m._parameters, True), (m._buffers, False)):
                for name, t in table.items():
                    if t is None:
                        continue
                    if id(t) in seen:  # a tensor shared between submodules is stored once
                        e = seen[id(t)]
                        self.entries.append(_Entry(m, name, is_param, e.offset, e.dtype, e.shape))
                        continue
                    if t.is_meta:
                        raise RuntimeError(
                            f"cannot offload {type(m).__name__}.{name}: on meta, load it first"
                        )
                    e = _Entry(m, name, is_param, offset, t.dtype, t.shape)
                    seen[id(t)] = e
                    self.entries.append(e)
                    unique.append((e, t))
                    offset = _align(offset + e.nbytes)
        self.nbytes = offset
        self.host = host_buffer(offset, pin)
        for e, t in unique:
            self.view(self.host, e).copy_(t.detach())
        self.point(self.host)  # the original (device or pageable) storage is released here

    @staticmethod
    def view(flat: torch.Tensor, e: _Entry) -> torch.Tensor:
        return flat[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape)

    def point(self, flat: torch.Tensor) -> None:
        for e in self.entries:
            t = self.view(flat, e)
            if e.is_param:
                e.module._parameters[e.name].data = t
            else:
                e.module._buffers[e.name] = t


class _Sync:
    """Stand-ins for CUDA streams and events where copies are synchronous (CPU): every wait is satisfied."""

    def wait_event(self, event) -> None:
        return None

    def record(self, stream=None) -> None:
        return None


@dataclass(eq=False)
class _Slot:
    index: int
    flat: torch.Tensor | None  # [max block bytes] uint8 on the device; None while released
    ready: object  # event: the copy into this slot has landed
    free: object  # event: the compute that last read this slot has finished
    owner: int | None = None  # block index whose tensors point here
    last_use: int = -1


class BlockOffload:
    """The runner block hook streaming `blocks` through `buffers` device slots (see the module docstring).

    blocks: one ModuleList, or the stacks of a model in run order; their blocks are numbered in that order
    (block i of the second stack is len(first) + i), which is also the prefetch order, across stacks.
    resident: the first `resident` blocks are moved to the device once and never evicted.
    buffers: device slots for the other blocks (>= 1); with buffers = k, up to k - 1 blocks are prefetched
    ahead of the one computing. `copies` counts host -> device block copies; `log` (when a list) records
    ("copy", block, slot) and ("run", block, slot) events in issue order.
    """

    def __init__(
        self,
        blocks: nn.ModuleList | list[nn.ModuleList],
        device: torch.device | str,
        *,
        resident: int = 0,
        buffers: int = 2,
        pin: bool | None = None,
    ):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        stacks = [blocks] if isinstance(blocks, nn.ModuleList) else list(blocks)
        self.offsets: dict[int, int] = {}  # id(stack) -> run-order number of its first block
        blocks = []
        for stack in stacks:
            self.offsets[id(stack)] = len(blocks)
            blocks += list(stack)
        if not 0 <= resident <= len(blocks):
            raise ValueError(
                f"resident={resident} must be between 0 and the number of blocks ({len(blocks)})"
            )
        if buffers < 1:
            raise ValueError(f"buffers={buffers}: need at least one device buffer for streamed blocks")
        self.stacks, self.device, self.resident = stacks, device, resident
        self.cuda = device.type == "cuda"
        pin = self.cuda if pin is None else pin
        for b in list(blocks)[:resident]:
            b.to(device)
        self.streamed = list(range(resident, len(blocks)))
        self.packed = {i: Packed(blocks[i], pin) for i in self.streamed}
        self.slot_bytes = max((p.nbytes for p in self.packed.values()), default=0)
        n_slots = min(buffers, len(self.streamed))
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else _Sync()
        self.slots = [_Slot(k, self._slot_buffer(), self._event(), self._event()) for k in range(n_slots)]
        self.where: dict[int, _Slot] = {}
        self.copies = 0
        self.clock = 0
        self.log: list | None = None

    def _event(self):
        return torch.cuda.Event() if self.cuda else _Sync()

    def _slot_buffer(self) -> torch.Tensor:
        return torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)

    def _compute_stream(self):
        return torch.cuda.current_stream(self.device) if self.cuda else _Sync()

    def _load(self, j: int, protected: set[int]) -> _Slot | None:
        """Start copying block j into a slot (no-op if it is in one); None if every slot is protected."""
        if j in self.where:
            return self.where[j]
        free = [s for s in self.slots if s.owner is None]
        victims = free or sorted(
            (s for s in self.slots if s.owner not in protected), key=lambda s: s.last_use
        )
        if not victims:
            return None
        slot = victims[0]
        if slot.owner is not None:
            self.packed[slot.owner].point(self.packed[slot.owner].host)
            del self.where[slot.owner]
        packed = self.packed[j]
        fresh = slot.flat is None
        if fresh:  # released: allocated again (on the compute stream, as at construction)
            slot.flat = self._slot_buffer()
        if self.cuda:
            compute = self._compute_stream()
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(slot.free)  # the block that last used the slot is done
                if fresh:  # the memory may have been freed by compute-stream work still queued
                    self.copy_stream.wait_stream(compute)
                slot.flat[: packed.nbytes].copy_(packed.host, non_blocking=True)
                slot.ready.record(self.copy_stream)
        else:
            slot.flat[: packed.nbytes].copy_(packed.host)
        packed.point(slot.flat)
        slot.owner, slot.last_use = j, self.clock
        self.where[j] = slot
        self.copies += 1
        if self.log is not None:
            self.log.append(("copy", j, slot.index))
        return slot

    def _upcoming(self, i: int) -> list[int]:
        """The streamed blocks after i in run order, wrapping to the next forward's first ones."""
        k = self.streamed.index(i)
        n = len(self.streamed)
        return [self.streamed[(k + d) % n] for d in range(1, min(len(self.slots), n))]

    def _number(self, blocks: nn.ModuleList, i: int) -> int | None:
        """The run-order number of block i of `blocks`, None for a list this hook does not stream."""
        offset = self.offsets.get(id(blocks))
        return None if offset is None else offset + i

    def before_block(self, blocks: nn.ModuleList, i: int) -> None:
        i = self._number(blocks, i)
        if i not in self.packed:
            return
        self.clock += 1
        slot = self._load(i, protected=set())
        slot.last_use = self.clock
        self._compute_stream().wait_event(slot.ready)
        if self.log is not None:
            self.log.append(("run", i, slot.index))
        protected = {i}
        for j in self._upcoming(i):  # prefetch while block i computes
            if self._load(j, protected) is None:
                break
            protected.add(j)

    def after_block(self, blocks: nn.ModuleList, i: int) -> None:
        i = self._number(blocks, i)
        if i not in self.where:
            return
        self.where[i].free.record(self._compute_stream())

    def detach(self) -> None:
        """Bring every streamed block back to its host copy (slots stay allocated until dropped)."""
        for j in list(self.where):
            self.packed[j].point(self.packed[j].host)
        self.where.clear()
        for s in self.slots:
            s.owner = None

    def release(self) -> None:
        """Free the device slots until the next forward allocates them again. For a model run once per
        request (FLUX.2's 24B text encoder: two 1.1 GB layer slots) the slots otherwise hold device memory
        through the whole denoising loop."""
        self.detach()
        if self.cuda:  # a prefetch may still be writing a slot: later compute-stream allocations wait for it
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        for s in self.slots:
            s.flat = None


def release_slots(models) -> None:
    """`release()` the block offload of each model: between the denoising loop and the VAE decode their
    slots would otherwise sit idle on the device (the next forward allocates them again)."""
    for model in models:
        for runner in stack_runners(model):
            for hook in runner.block_hooks:
                if isinstance(hook, BlockOffload):
                    hook.release()


def leading_blocks_within(blocks: list[nn.Module], nbytes: int) -> int:
    """How many leading blocks, in order, take at most `nbytes` of parameters and buffers together."""
    total = 0
    for i, b in enumerate(blocks):
        total += sum(t.numel() * t.element_size() for t in [*b.parameters(), *b.buffers()])
        if total > nbytes:
            return i
    return len(blocks)


def apply_offload(
    model: nn.Module,
    mode: str = "block",
    *,
    device: torch.device | str = "cuda",
    resident: int = 0,
    resident_bytes: int = 0,
    buffers: int = 2,
    pin: bool | None = None,
) -> BlockOffload | ComponentOffload:
    """Offload a loaded transformer (its weights may be on the host or already on the device).

    "block": the blocks of every stack stream through `buffers` device slots (`resident` first blocks
    stay, or as many leading blocks, in run order, as fit `resident_bytes`), everything else of the model
    moves to `device`; returns the BlockOffload, installed on each stack's runner. "model": the whole model
    is packed in host memory; run it inside `offload.use(model)` of the returned ComponentOffload.
    """
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"offload={mode!r} is unknown; choose one of: {', '.join(OFFLOAD_MODES)}")
    if mode == "model":
        offload = ComponentOffload(device, pin=pin)
        offload.add(model)
        return offload
    stacks = block_stacks(model)
    runners = stack_runners(model)
    if any(isinstance(h, BlockOffload) for r in runners for h in r.block_hooks):
        raise RuntimeError(f"{type(model).__name__} already has block offload")
    if any(r.graphs is not None for r in runners):
        raise ValueError("offload='block' cannot be combined with CUDA graphs (weights move between blocks)")
    if resident_bytes:
        resident = max(resident, leading_blocks_within([b for s in stacks for b in s.blocks], resident_bytes))
    hook = BlockOffload([s.blocks for s in stacks], device, resident=resident, buffers=buffers, pin=pin)
    # The rest of the model (embedders, head, modulation tables) is small: it goes to the device for good.
    block_ids = {id(t) for s in stacks for t in [*s.blocks.parameters(), *s.blocks.buffers()]}
    for m in model.modules():
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is not None and id(t) not in block_ids and t.device != hook.device:
                    if isinstance(t, nn.Parameter):
                        t.data = t.data.to(hook.device)
                    else:
                        table[name] = t.to(hook.device)
    for r in runners:
        r.block_hooks.append(hook)
    return hook


class ComponentOffload:
    """Whole components packed in (pinned) host memory, on `device` only inside `use(...)`."""

    def __init__(self, device: torch.device | str, *, pin: bool | None = None):
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda" if pin is None else pin
        self.packed: dict[int, Packed] = {}
        self.copies = 0

    def add(self, module: nn.Module) -> None:
        if id(module) not in self.packed:
            self.packed[id(module)] = Packed(module, self.pin)

    @contextmanager
    def use(self, *modules: nn.Module | None) -> Iterator[None]:
        """The given components are on the device inside the block; modules not added pass through."""
        active = [self.packed[id(m)] for m in modules if m is not None and id(m) in self.packed]
        flats = []
        for p in active:
            flat = torch.empty(p.nbytes, dtype=torch.uint8, device=self.device)
            flat.copy_(p.host, non_blocking=True)  # ordered before the compute on the same stream
            p.point(flat)
            flats.append(flat)
            self.copies += 1
        try:
            yield
        finally:
            for p in active:
                p.point(p.host)  # the device buffer is freed once the stream is done with it
            del flats
