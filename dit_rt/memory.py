"""Will it fit? The GPU memory the weights of a pipeline take under the chosen options, from the safetensors
headers alone (no weight is read), checked against the card before loading starts.

FLUX.2-dev is 112 GB of bf16 weights (a 32B transformer and a 24B text encoder): on an 80 GB card it runs only
with fp8 linears or offload. A user who asks for what cannot fit gets, before minutes of reading weights, the
sizes and the options that would fit, instead of an out-of-memory error halfway through.

The estimate counts weights only, those the component's model reads (its key map drops the parts dit_rt
never builds): per component, each floating tensor in the load dtype (a few fp32-kept
tensors are counted at the load dtype too), quantized linears (2-D block weights of
the components the family quantizes) at their format's bytes per element; under offload="model" the largest
component (they visit the GPU one at a time), under offload="block" the largest of: a block-streamed
component's resident part plus two of its blocks, any other component whole. Activations come on top: the
check keeps `RESERVE` free for them.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("dit_rt")
GiB = 2**30
RESERVE = 4 * GiB  # activations, workspaces and the CUDA context, beyond the weights
# resident_gib="auto" leaves this much more free by default (pipelines set their own): FLUX.2-dev at
# 1024x1024 under block offload peaked 3.5 GiB above its weights (H200, BENCHMARKS.md)
AUTO_MARGIN = 4 * GiB
# videos: the Wan 2.1 VAE's decode of a 704x1280x93 clip peaked at 12.3 GiB (H100, BENCHMARKS.md)
VIDEO_AUTO_MARGIN = 14 * GiB
# Wan, whose VAE runs in float32 by default: that decode's activations are twice the bf16 ones (estimated from
# the bf16 peak, not measured)
WAN_AUTO_MARGIN = 26 * GiB
HOST_RESERVE = 8 * GiB  # under offload: the process, one block loaded and not yet page-locked, the page cache
# bytes per element of a quantized linear weight (scales are negligible)
FORMAT_BYTES = {
    "fp8-per-tensor": 1.0,
    "fp8-rowwise": 1.0,
    "fp8-blockwise": 1.0,
    "nvfp4": 0.5,
    "svdquant": 0.5,
}
_BLOCK = re.compile(r"^(.*?(?:blocks|layers))\.(\d+)\.")  # "transformer_blocks.3.", "model.layers.12."


@dataclass(frozen=True)
class Component:
    name: str
    total: int  # bytes on the GPU when the whole component is there
    resident: int  # bytes with its blocks streamed (offload="block"): non-block part + two largest blocks
    blocks: int = 0  # bytes of all its blocks


@functools.lru_cache(maxsize=32)
def _loaded(folder: Path, name: str) -> Callable[[str], bool]:
    """Which checkpoint keys dit_rt's model of this component reads: its own key map drops the parts it never
    builds (FLUX.2's Mistral text stack past its last output layer, the vision tower, `lm_head`). The model is
    built on meta from its config (no weight is read); every key counts when it cannot be built here."""
    import json

    from dit_rt.components import build_meta
    from dit_rt.loaders.mapping import compile_map, map_key

    try:
        index = json.loads((folder / "model_index.json").read_text())
        with torch.device("meta"):
            model = build_meta(folder, index, name)
        rules = compile_map(getattr(model, "ckpt_key_map", None))
    except Exception:  # noqa: BLE001 - an estimate: the loader reports real problems with their own errors
        return lambda key: True
    return lambda key: map_key(rules, key) is not None


def _component(folder: Path, name: str, dtype: torch.dtype, fmt: str | None) -> Component | None:
    from dit_rt.loaders.safetensors_io import find_weight_files, scan

    try:
        files, index = find_weight_files(folder / name)
    except (FileNotFoundError, ValueError):
        return None  # no weights (a tokenizer, a scheduler)
    if not files:
        return None
    quant = FORMAT_BYTES.get(fmt) if fmt else None
    blocks: dict[str, int] = {}
    rest = 0
    loaded = _loaded(folder, name)
    for key, info in scan(files, index).items():
        if not loaded(key):
            continue
        n = 1
        for d in info.shape:
            n *= d
        floating = info.dtype.is_floating_point
        size = info.nbytes if not floating else n * dtype.itemsize
        m = _BLOCK.match(key)
        if quant is not None and m and len(info.shape) == 2 and min(info.shape) >= 64:
            size = int(n * quant)
        if m:
            blocks[m.group(0)] = blocks.get(m.group(0), 0) + size
        else:
            rest += size
    largest = sorted(blocks.values(), reverse=True)[:2]
    return Component(name, rest + sum(blocks.values()), rest + sum(largest), sum(blocks.values()))


def weights_on_gpu(
    folder: Path,
    components: list[str],
    dtype: torch.dtype,
    *,
    linear: str | None = None,
    quantized: tuple[str, ...] = ("transformer", "transformer_2"),
    offload: str | None = None,
    streamed: tuple[str, ...] = ("transformer", "transformer_2"),
    resident: int = 0,
) -> tuple[int, dict[str, int]]:
    """(peak weight bytes on the GPU, bytes per component as they sit there) for these options.
    resident: offload="block"'s bytes of leading blocks each transformer keeps on the GPU all along."""
    parts = [
        c
        for name in components
        if (c := _component(folder, name, dtype, linear if name in quantized else None)) is not None
    ]
    if offload == "block":
        sizes = {c.name: c.resident if c.name in streamed else c.total for c in parts}
        kept = {c.name: min(resident, c.blocks) for c in parts if c.name.startswith("transformer")}
        for name, n in kept.items():
            sizes[name] += n
        # the kept blocks stay while the other components visit
        return max((v + sum(kept.values()) - kept.get(k, 0) for k, v in sizes.items()), default=0), sizes
    sizes = {c.name: c.total for c in parts}
    if offload == "model":
        return max(sizes.values(), default=0), sizes
    return sum(sizes.values()), sizes


def free_bytes(device: torch.device) -> int:
    """What this process can still allocate on `device`: the driver's free memory plus its own cache."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def check_fits(
    folder: Path,
    components: list[str],
    options,
    *,
    name: str,
    quantized: tuple[str, ...] = ("transformer", "transformer_2"),
    streamed: tuple[str, ...] = ("transformer", "transformer_2"),
    available: int | None = None,
    host_available: int | None = None,
    auto_margin: int = AUTO_MARGIN,
) -> None:
    """Raise MemoryError, before any weight is read, when the weights under `options` (RuntimeOptions)
    cannot fit `available` bytes (default: what the CUDA device has free) less RESERVE, naming the options
    that would; under offload=, also when the host cannot hold the offloaded weights (`host_available`,
    default: MemAvailable, capped by a container's limit) less HOST_RESERVE. Nothing to check off CUDA, or
    under parallel= (FSDP shards and parallel layouts have their own sizes). offload resident_gib="auto" is
    resolved here: the most kept blocks whose weights fit less RESERVE and `auto_margin`."""
    from dit_rt.runtime import AUTO_RESIDENT

    device = options.device
    auto = options.offload == "block" and options.offload_resident == AUTO_RESIDENT
    if available is None:
        if device.type != "cuda" or options.parallel is not None:
            if auto:  # no card to size it against
                options.offload_resident = 0
            return
        available = free_bytes(device)
    budget = available - RESERVE

    def need(**changes) -> tuple[int, dict[str, int]]:
        kw = dict(linear=options.linear_format, offload=options.offload, resident=options.offload_resident)
        kw |= changes
        return weights_on_gpu(folder, components, options.dtype, quantized=quantized, streamed=streamed, **kw)

    if auto:
        options.offload_resident = _most_resident(lambda r: need(resident=r)[0], budget - auto_margin)
        log.info(
            "offload resident_gib='auto': %.1f GiB of leading blocks stay on %s (%.1f GiB free)",
            options.offload_resident / GiB, device, available / GiB,
        )  # fmt: skip

    peak, sizes = need()
    if peak <= budget:
        if options.offload:
            _check_host(need(offload=None)[0], options, name, host_available)
        return
    alternatives = []
    for label, changes in (
        ("linear='fp8-per-tensor'", dict(linear="fp8-per-tensor")),
        ("linear='fp8-per-tensor', offload='model'", dict(linear="fp8-per-tensor", offload="model")),
        ("offload='model'", dict(offload="model")),
        ("offload='block'", dict(offload="block", resident=0)),
    ):
        if all(options_value(options, k) == v for k, v in changes.items()):
            continue  # what the user already chose
        p, _ = need(**changes)
        if p <= budget:
            more = ""
            if changes.get("resident") == 0:
                if options.offload_resident:
                    label += " without resident_gib"
                more = "; with resident_gib='auto' as many blocks as fit stay on the card"
            alternatives.append(f"{label} (~{p / GiB:.1f} GiB{more})")
    parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in sizes.items())
    hint = (
        "; options that fit: " + ", ".join(alternatives)
        if alternatives
        else "; no single option fits: use a larger card or parallel=dict(fsdp=True) over several GPUs"
    )
    kept = f" with resident_gib={options.offload_resident / GiB:g}" if options.offload_resident else ""
    raise MemoryError(
        f"{name} needs ~{peak / GiB:.1f} GiB of weights on {device} with dtype={options.dtype}, "
        f"linear={options.linear!r}, offload={options.offload!r}{kept} (GiB: {parts}), plus "
        f"~{RESERVE / GiB:.0f} GiB for activations; the card has {available / GiB:.1f} GiB free{hint}"
    )


def _most_resident(peak: Callable[[int], int], budget: int) -> int:
    """The most bytes of kept blocks whose peak stays within budget (peak grows with it; 0 if none fits)."""
    lo, hi = 0, max(budget, 0)
    if peak(0) > budget:
        return 0
    while lo < hi:  # the largest r with peak(r) <= budget
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if peak(mid) <= budget else (lo, mid - 1)
    top, lo, hi = peak(lo), 0, lo
    while lo < hi:  # past the model's blocks the peak stops growing: the smallest r reaching the same peak
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if peak(mid) >= top else (mid + 1, hi)
    return lo


MEMINFO = "/proc/meminfo"
# (limit, usage) of this process's memory cgroup, v2 then v1: a container's limit, which MemAvailable ignores
CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" when there is no limit


def host_available_bytes() -> int | None:
    """What this process can still take of host memory: MemAvailable of /proc/meminfo, capped by the memory
    cgroup's limit less its usage (containers); None where neither can be read."""
    found = []
    try:
        with open(MEMINFO) as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:
        pass
    for limit_file, usage_file in CGROUP_FILES:
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:
            found.append(max(limit - usage, 0))
            break
    return min(found) if found else None


def _check_host(total: int, options, name: str, available: int | None) -> None:
    """Offloaded weights live in page-locked host memory, which cannot be swapped: a host too small for them
    would have the process killed minutes into loading."""
    available = host_available_bytes() if available is None else available
    if available is None or total <= available - HOST_RESERVE:
        return
    hint = (
        "linear='fp8-per-tensor' with the offload (about halves it), or a host with more memory"
        if options.linear_format is None
        else "a host with more memory, or parallel=dict(fsdp=True) over several GPUs"
    )
    raise MemoryError(
        f"{name} with offload={options.offload!r} keeps ~{total / GiB:.1f} GiB of weights in page-locked "
        f"host memory, plus ~{HOST_RESERVE / GiB:.0f} GiB while loading; this machine has "
        f"{available / GiB:.1f} GiB available: use {hint}"
    )


def options_value(options, key: str):
    if key == "resident":
        return options.offload_resident
    return options.linear_format if key == "linear" else getattr(options, key)
