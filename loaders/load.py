"""Stream a safetensors checkpoint into a module tree built on the `meta` device.

Plan first, allocate second: every header is parsed, keys are mapped and matched against the model, shapes
and dtypes are checked, and only then is device memory touched. Each tensor then goes file -> (pinned
staging) -> device once and is cast there into its final dtype, one tensor at a time, so an fp32 checkpoint
loaded as bf16 never holds more than one chunk in fp32 on the GPU. Fused projections (a `dit_rt.ops.Linear`
with `sources`) get their sources copied into slices of one tensor, or load whole from their own name where a
format stores them fused. A Linear is converted to its weight format as soon as its last tensor lands, so
peak memory stays near the final model size plus one layer.
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dit_rt.loaders.mapping import KeyMap, compile_map, detect_format, map_key_transform
from dit_rt.loaders.safetensors_io import (
    CheckpointError,
    PinnedStaging,
    TensorInfo,
    find_weight_files,
    iter_mmap,
    iter_staged,
    scan,
)
from dit_rt.ops.linear import Linear

log = logging.getLogger("dit_rt")

STAGING_MIN_BYTES = 64 << 20  # large sequential reads; a bigger tensor grows the buffers to fit it
_staging: PinnedStaging | None = None


@dataclass
class _Target:
    """One parameter or persistent buffer of the model and the checkpoint tensors that fill it."""

    names: list[str]  # model-side names (several when tied)
    owners: list[tuple[nn.Module, str]]  # (module, attribute) for each name
    is_param: bool
    shape: torch.Size
    meta_dtype: torch.dtype
    sources: list[tuple[str, int, int]]  # (model-side key, dim-0 offset, dim-0 length); length -1 = whole
    dtype: torch.dtype | None = None
    value: torch.Tensor | None = None
    remaining: int = 0


@dataclass
class LoadReport:
    component: str
    files: list[Path]
    tensors: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    ignored: list[str] = field(default_factory=list)


def _short(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _targets(model: nn.Module) -> list[_Target]:
    """Every parameter and persistent buffer, tied ones merged, fused Linears expanded into their sources."""
    by_id: dict[int, _Target] = {}
    out: list[_Target] = []
    for mod_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        entries = [(n, t, True) for n, t in module._parameters.items()]
        entries += [
            (n, t, False) for n, t in module._buffers.items() if n not in module._non_persistent_buffers_set
        ]
        for attr, tensor, is_param in entries:
            if tensor is None:
                continue
            name = prefix + attr
            if id(tensor) in by_id:  # tied (shared) tensor: any alias in the checkpoint fills it
                by_id[id(tensor)].names.append(name)
                by_id[id(tensor)].owners.append((module, attr))
                continue
            fused = isinstance(module, Linear) and module.sources
            if fused:
                parent = mod_name.rpartition(".")[0]
                parent = f"{parent}." if parent else ""
                offsets = [0]
                for s in module.splits:
                    offsets.append(offsets[-1] + s)
                if offsets[-1] != tensor.shape[0] or len(module.splits) != len(module.sources):
                    raise ValueError(f"{name}: splits {module.splits} do not match sources {module.sources}")
                sources = [
                    (f"{parent}{src}.{attr}", offsets[i], module.splits[i])
                    for i, src in enumerate(module.sources)
                ]
            else:
                sources = [(name, 0, -1)]
            t = _Target([name], [(module, attr)], is_param, tensor.shape, tensor.dtype, sources)
            by_id[id(tensor)] = t
            out.append(t)
    return out


def _final_dtype(t: _Target, stored: list[torch.dtype], dtype: torch.dtype | None, keep_fp32) -> torch.dtype:
    if not t.meta_dtype.is_floating_point:
        return stored[0]  # integer / bool tensors keep their stored dtype
    if any(s.itemsize == 1 for s in stored if s.is_floating_point):
        return stored[0]  # fp8 checkpoints carry their own scales: a cast would lose them
    if any(sub in name for name in t.names for sub in keep_fp32):
        return torch.float32
    if dtype is not None:
        return dtype
    if len(set(stored)) > 1:
        raise CheckpointError(
            f"{t.names[0]}: fused sources are stored in different dtypes {stored}; pass dtype="
        )
    return stored[0]


def _assign(t: _Target) -> None:
    value = nn.Parameter(t.value, requires_grad=False) if t.is_param else t.value  # one object: ties survive
    for module, attr in t.owners:
        (module._parameters if t.is_param else module._buffers)[attr] = value


def _staging_for(nbytes: int) -> PinnedStaging:
    global _staging
    size = max(STAGING_MIN_BYTES, nbytes)
    if _staging is None or _staging.nbytes < size:
        _staging = None  # free the old pinned buffers before pinning new ones
        _staging = PinnedStaging(size)
    return _staging


def _init_buffers(model: nn.Module, device: torch.device) -> None:
    """Materialise computed (non-persistent) buffers such as RoPE tables on the target device."""
    for module in model.modules():
        if callable(getattr(module, "init_buffers", None)):
            module.init_buffers(device)
        elif callable(getattr(module, "reset_buffers", None)):
            with torch.device(device):
                module.reset_buffers()


def load_weights(
    model: nn.Module,
    source: str | Path | list,
    *,
    device: str | torch.device,
    dtype: torch.dtype | None = None,
    key_map: KeyMap | str | None = None,
    ignore: Iterable[str] = (),
    linear_format: str | None = None,
    strict: bool = True,
    component: str | None = None,
) -> LoadReport:
    """Fill `model` (built on `meta`) from safetensors weights, in place, on `device`.

    source: a component folder (diffusion_pytorch_model / model, single or sharded with an index), a file,
        an index file, or a list of files.
    dtype: floating-point parameters are cast to it (None keeps the stored dtype); names matching the
        model's `keep_fp32` substrings stay float32; integer and fp8 tensors keep their stored dtype.
    key_map: a source-format table (mapping.py) or its name ("diffusers", "wan-original", "auto"); applied
        before the model's own `ckpt_key_map`.
    ignore: regexes (re.search) of checkpoint keys, after mapping, that the model deliberately lacks.
    linear_format: if given, `Linear.convert(linear_format)` runs on each dit_rt Linear as soon as its
        weights are in place.
    strict: unexpected checkpoint keys raise (missing ones always do: the model could not run).
    Errors name the component, the file(s) and the keys, and are raised before any device allocation.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    files, index = find_weight_files(source)
    where = str(index or (files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"))
    component = component or (Path(source).name if isinstance(source, str | Path) else files[0].parent.name)
    tensors = scan(files, index)

    # ---- map checkpoint keys to model names
    if key_map == "auto":
        key_map = detect_format(tensors)
    tables = [compile_map(key_map), compile_map(getattr(model, "ckpt_key_map", None))]
    ignore_res = [re.compile(p) for p in ignore]
    by_name: dict[str, TensorInfo] = {}
    report = LoadReport(component, files)
    transforms: dict[str, list[Callable]] = {}  # model name -> the tables' tensor transforms, in order
    for key, info in tensors.items():
        name, fns = key, []
        for rules in tables:
            if name is not None:
                name, fn = map_key_transform(rules, name)
                fns += [fn] if fn is not None else []
        if name is None:
            report.ignored.append(key)
            continue
        if name in by_name:
            raise CheckpointError(
                f"{component}: checkpoint keys {by_name[name].name!r} and {key!r} both map to {name!r} "
                f"({where})"
            )
        by_name[name] = info
        if fns:
            transforms[name] = fns

    # ---- match against the model (only tensors still on meta must be in the checkpoint)
    targets = _targets(model)
    wanted: dict[str, tuple[_Target, int, int]] = {}
    missing: list[str] = []
    for t in targets:
        # A fused Linear also loads whole from its own name: formats that store the projection fused
        # (BFL's `qkv`, `linear1`) map to it directly.
        whole = [[(t.names[0], 0, -1)]] if t.sources != [(t.names[0], 0, -1)] else []
        aliases = [t.sources] + whole + [[(n, 0, -1)] for n in t.names[1:]]
        found = next((srcs for srcs in aliases if all(s[0] in by_name for s in srcs)), None)
        if found is None:
            if _is_meta(t):
                missing += [s[0] for s in t.sources if s[0] not in by_name]
            continue
        t.sources = found
        for key, off, length in found:
            wanted[key] = (t, off, length)
    extra = [n for n in by_name if n not in wanted]
    tied = {n for t in targets if len(t.names) > 1 for n in t.names}  # a second copy of a tied tensor
    unexpected = [n for n in extra if n not in tied and not any(r.search(n) for r in ignore_res)]
    if missing:
        raise CheckpointError(
            f"{component}: {len(missing)} key(s) the model needs are missing from {where}: {_short(missing)}"
        )
    if unexpected and strict:
        names = [f"{n} ({by_name[n].file.name})" for n in unexpected]
        raise CheckpointError(
            f"{component}: {len(unexpected)} unexpected key(s) in {where} that the model does not have: "
            f"{_short(names)} (a different model or version? pass ignore= for keys dropped on purpose)"
        )
    report.ignored += [by_name[n].name for n in extra]

    # ---- shapes and dtypes, still before allocation
    bad = []
    keep_fp32 = tuple(getattr(model, "keep_fp32", ()) or ())
    loading = list({id(t): t for t, _, _ in wanted.values()}.values())
    for t in loading:
        for key, _, length in t.sources:
            want = t.shape if length < 0 else torch.Size((length, *t.shape[1:]))
            info = by_name[key]
            got = torch.empty(info.shape, dtype=info.dtype, device="meta")
            for fn in transforms.get(key, ()):  # the shape the transforms make (conv1x1_as_linear changes it)
                got = fn(got)
            if tuple(got.shape) != tuple(want):
                bad.append(
                    f"{info.name} ({info.file.name}): checkpoint {list(info.shape)}, model {list(want)}"
                )
        t.dtype = _final_dtype(t, [by_name[k].dtype for k, _, _ in t.sources], dtype, keep_fp32)
        t.remaining = len(t.sources)
    if bad:
        raise CheckpointError(f"{component}: shape mismatch in {where}: {_short(bad)}")

    # ---- stream, file by file in on-disk order
    per_file: dict[Path, list[TensorInfo]] = defaultdict(list)
    for key in wanted:
        per_file[by_name[key].file].append(by_name[key])
    model_key = {id(info): key for key, info in by_name.items()}
    pending: dict[int, int] = defaultdict(int)  # Linear id -> tensors still to land
    if linear_format is not None:
        for t in loading:
            for module, _ in t.owners:
                if isinstance(module, Linear):
                    pending[id(module)] += 1
    if device.type == "cuda":
        biggest = max((i.nbytes for items in per_file.values() for i in items), default=0)
        staging = _staging_for(biggest)
    for path in sorted(per_file):
        items = sorted(per_file[path], key=lambda i: i.start)
        stream = (
            iter_staged(path, items, device, staging) if device.type == "cuda" else iter_mmap(path, items)
        )
        for info, src in stream:
            key = model_key[id(info)]
            t, off, length = wanted[key]
            if t.value is None:
                t.value = torch.empty(t.shape, dtype=t.dtype, device=device)
            for fn in transforms.get(key, ()):
                src = fn(src)
            (t.value if length < 0 else t.value[off : off + length]).copy_(src)
            report.tensors += 1
            report.bytes_read += info.nbytes
            t.remaining -= 1
            if t.remaining == 0:
                _assign(t)
                t.value = None  # the module owns it now: a conversion below frees the loaded copy at once
                for module, _ in t.owners:
                    if id(module) in pending:
                        pending[id(module)] -= 1
                        if pending[id(module)] == 0:
                            _convert(module, linear_format)

    _init_buffers(model, device)
    left = [n for n, p in (*model.named_parameters(), *model.named_buffers()) if p.is_meta]
    if left:
        raise CheckpointError(
            f"{component}: tensors still on meta after loading {where}: {_short(left)} (computed buffers "
            "need an `init_buffers(device)` or `reset_buffers()` method on their module)"
        )
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    report.seconds = time.perf_counter() - t0
    log.info(
        "loaded %s: %d tensors, %.2f GB in %.2f s from %s",
        component,
        report.tensors,
        report.bytes_read / 1e9,
        report.seconds,
        where,
    )
    return report


def _is_meta(t: _Target) -> bool:
    module, attr = t.owners[0]
    tensor = module._parameters.get(attr) if t.is_param else module._buffers.get(attr)
    return tensor is not None and tensor.is_meta


def _convert(module: nn.Module, fmt: str) -> None:
    convert: Callable | None = getattr(module, "convert", None)
    if convert is None:
        raise NotImplementedError(f"linear_format={fmt!r}: this dit_rt.ops.Linear has no convert()")
    convert(fmt)


def build_and_load(factory: Callable[..., nn.Module], config, source, **load_kwargs) -> nn.Module:
    """`factory(config)` built on meta, then `load_weights(model, source, **load_kwargs)`, in eval mode."""
    with torch.device("meta"):
        model = factory(config)
    load_weights(model, source, **load_kwargs)
    return model.eval().requires_grad_(False)
