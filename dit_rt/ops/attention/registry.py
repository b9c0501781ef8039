"""The attention backend registry: names -> backends, resolved once per (name, device, dtype, head_dim).

A backend is a plain callable `fn(q, k, v, scale, return_lse)` on (B, L, H, D) tensors plus two checks:
`requires()` (can this process run it at all: package importable, ...) and `supports(device, dtype,
head_dim)` (can it take these inputs). Both return None when fine, else a reason a user can act on.
Optional packages are imported only inside `requires()` and the kernels, never at `import dit_rt`, through
`optional_import`, which tells "not installed" from "installed but fails to import"; `supports` asks the
device through `cuda_capability`, which never calls CUDA on a CPU device or a torch without CUDA.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

log = logging.getLogger("dit_rt")

Reason = str | None
Result = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class BrokenPackage(ImportError):
    """An optional package that is installed but fails to import; the message says how."""


_IMPORTS: dict[str, ModuleType | Exception | None] = {}


def optional_import(name: str) -> ModuleType | None:
    """Import an optional kernel package once: the module, or None when it is not installed.

    A package that is installed but fails to import (a CUDA library missing under a CPU-only torch, an ABI
    mismatch, a broken dependency) raises BrokenPackage with the import's own error: calling it "not
    installed" would send the user to reinstall what is there.
    """
    if name not in _IMPORTS:
        try:
            _IMPORTS[name] = importlib.import_module(name)
        except ModuleNotFoundError as e:  # absent: the package itself is missing, not one of its imports
            absent = e.name is not None and name.split(".")[0] == e.name
            _IMPORTS[name] = None if absent else e
        except Exception as e:  # an extension module's import may raise anything: report it
            _IMPORTS[name] = e
    got = _IMPORTS[name]
    if isinstance(got, Exception):
        first = next((line for line in str(got).splitlines() if line.strip()), "")
        raise BrokenPackage(f"{name} is installed but fails to import: {type(got).__name__}: {first}")
    return got


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device; None for any other device and when this torch has no usable CUDA
    (a CPU-only build, no driver, no visible GPU). `supports` checks ask this, never CUDA directly."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def needs_cuda(device: torch.device) -> str:
    """The reason for a CUDA-only backend on `device`."""
    if device.type != "cuda":
        return f"needs a CUDA device (got device={device})"
    return "needs a CUDA device, and this torch has none usable (a CPU-only build, or no GPU visible)"


def _always() -> Reason:
    return None


def _anything(device: torch.device, dtype: torch.dtype, head_dim: int | None) -> Reason:
    return None


@dataclass(frozen=True)
class AttentionBackend:
    """One attention implementation.

    fn(q, k, v, scale, return_lse): q (B, Lq, H, D), k/v (B, Lk, Hk, D) -> out (B, Lq, H, D), or
    (out, lse) with lse float32 (B, H, Lq), the natural-log sum of exp(scale * q.k) over keys.
    auto_rank: position in `auto`'s preference (lower first); None: `auto` never picks it (lossy or
    unmeasured backends are only used when named).
    lse: whether fn can return the log-sum-exp (Ring attention needs it).
    takes_codes: whether fn also takes q/k/v as `Fp8Codes` (per-tensor e4m3 made by their producer, one
    scale for every head): the fused ops in `dit_rt.ops.fused_ops` then hand it codes on CUDA instead of
    model-dtype tensors. A wrapper around a backend (sequence parallelism) has no such attribute: it
    takes tensors.
    """

    name: str
    fn: Callable[..., Result]
    requires: Callable[[], Reason] = _always
    supports: Callable[[torch.device, torch.dtype, int | None], Reason] = _anything
    auto_rank: int | None = None
    lse: bool = True
    takes_codes: bool = False

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, return_lse=False
    ) -> Result:
        if return_lse and not self.lse:
            raise NotImplementedError(
                f"attention backend {self.name!r} cannot return the log-sum-exp; use 'sdpa' or 'fa3'"
            )
        return self.fn(q, k, v, scale, return_lse)


@dataclass(frozen=True)
class AttentionMode:
    """An attention that binds to a model rather than being one kernel (`svg`, Sparse VideoGen).

    It reads what the model declares through the seam (which Attention modules attend over its video tokens,
    their grid per forward, the denoising step: `dit_rt.ops.attention.AttentionContext`) and installs its own
    op in those modules; every other module runs a dense kernel. Selected with `attention=name` or
    `attention=dict(name=name, **options)`.

    parse(options) -> config: validates the options (ValueError naming the valid ones); the config's `dense`
    field names the dense kernel ("auto" or a registered backend). bind(model, config, dense) -> {module: op}:
    the ops for the Attention modules the mode handles (the rest get the dense kernel); dense(module) is the
    dense backend resolved for that module. It raises, before anything is installed, on a model it cannot
    serve. ring: whether it runs under Ring attention (which splits the sequence over ranks).
    """

    name: str
    parse: Callable[[dict], Any]
    bind: Callable[[Any, Any, Callable[[Any], AttentionBackend]], dict]
    ring: bool = False


_BACKENDS: dict[str, AttentionBackend] = {}
_MODES: dict[str, AttentionMode] = {}
_RESOLVED: dict[tuple, AttentionBackend] = {}


def register_mode(mode: AttentionMode) -> AttentionMode:
    if mode.name in _BACKENDS or mode.name == "auto":
        raise ValueError(f"attention mode {mode.name!r} would shadow a backend of the same name")
    _MODES[mode.name] = mode
    return mode


def attention_mode(name: object) -> AttentionMode | None:
    """The registered mode called `name`, or None (a kernel name, "auto", or an unknown name)."""
    return _MODES.get(name) if isinstance(name, str) else None


def attention_spec(attention: str | dict | AttentionBackend) -> tuple[str | AttentionBackend, dict]:
    """(name, options) of an `attention=` value: a name or backend (no options), or dict(name=, **options)."""
    if not isinstance(attention, dict):
        return attention, {}
    options = dict(attention)
    name = options.pop("name", None)
    if not isinstance(name, str):
        raise ValueError(f"attention={attention!r}: a dict needs name=, e.g. dict(name='svg', budget=0.25)")
    if options and name not in _MODES:
        raise ValueError(f"attention backend {name!r} takes no options, got {sorted(options)}")
    return name, options


def register_backend(backend: AttentionBackend, *, replace: bool = False) -> AttentionBackend:
    if backend.name in _BACKENDS and not replace:
        raise ValueError(f"attention backend {backend.name!r} is already registered (pass replace=True)")
    if backend.name == "auto":
        raise ValueError("'auto' is reserved: it picks the best available backend")
    if backend.name in _MODES:
        raise ValueError(f"{backend.name!r} is an attention mode; pick another backend name")
    _BACKENDS[backend.name] = backend
    _RESOLVED.clear()  # a new or replaced backend may change what names and `auto` resolve to
    return backend


def unregister_attention(name: str) -> None:
    """Remove a registered backend (user code and tests; builtins may be removed too)."""
    _BACKENDS.pop(name)
    _RESOLVED.clear()


def register_attention(name: str, *, lse: bool = False, replace: bool = False):
    """Decorator registering a user attention under `name`, selectable with `attention=name`.

    The decorated object is a function or a class; a class is instantiated once (no arguments) on
    first use. Either is called as `obj(query, key, value, attn_mask=None, scale=..., **kwargs)` with
    (B, L, H, D) tensors and returns (B, Lq, H, D). With lse=True it is also called with
    return_lse=True when the caller needs the log-sum-exp and must then return (out, lse).
    """

    def decorate(obj):
        instance: list = []

        def target():
            if not isinstance(obj, type):
                return obj
            if not instance:
                instance.append(obj())
            return instance[0]

        def fn(q, k, v, scale, return_lse):
            if not return_lse:
                return target()(q, k, v, attn_mask=None, scale=scale)
            out = target()(q, k, v, attn_mask=None, scale=scale, return_lse=True)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    f"attention backend {name!r} was asked for (out, lse) and returned {type(out)}"
                )
            return out

        register_backend(AttentionBackend(name, fn, lse=lse), replace=replace)
        return obj

    return decorate


def _usable(backend: AttentionBackend, device, dtype, head_dim) -> Reason:
    reason = backend.requires()
    if reason is None and device is not None:
        reason = backend.supports(torch.device(device), dtype, head_dim)
    return reason


def unusable_reason(
    name: str, *, device: torch.device | str, dtype: torch.dtype | None = None, head_dim: int | None = None
) -> Reason:
    """Why the registered backend `name` cannot run on these inputs (None when it can; head_dim None: any)."""
    return _usable(_BACKENDS[name], torch.device(device), dtype, head_dim)


def available_attention(
    device: torch.device | str | None = None, dtype: torch.dtype | None = None, head_dim: int | None = None
) -> list[str]:
    """Names usable in this process; with device (and dtype, head_dim), those that take such inputs."""
    return [n for n, b in _BACKENDS.items() if _usable(b, device, dtype, head_dim) is None]


def attention_names() -> list[str]:
    """Every name `attention=` accepts: "auto", each registered backend, usable here or not, and each mode."""
    return ["auto", *_BACKENDS, *_MODES]


def _describe(device, dtype, head_dim) -> str:
    return f"device={device}, dtype={str(dtype).removeprefix('torch.')}, head_dim={head_dim}"


def resolve_attention(
    name: str | AttentionBackend,
    *,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
) -> AttentionBackend:
    """The backend `name` resolves to for these inputs; cached, and logged once per resolution.

    `auto` picks the best available backend for the device, dtype and head_dim. A named backend
    that is unknown, not installed or cannot take the inputs is an error listing the usable ones.
    """
    if isinstance(name, AttentionBackend):
        return name
    device = torch.device(device)
    key = (name, device, dtype, head_dim)
    backend = _RESOLVED.get(key)
    if backend is not None:
        return backend
    where = _describe(device, dtype, head_dim)
    if name == "auto":
        ranked = sorted((b for b in _BACKENDS.values() if b.auto_rank is not None), key=lambda b: b.auto_rank)
        backend = next((b for b in ranked if _usable(b, device, dtype, head_dim) is None), None)
        if backend is None:
            raise RuntimeError(f"no attention backend is usable for {where}")
    elif name in _MODES:
        raise ValueError(
            f"attention {name!r} binds to a model (it needs the video geometry the model declares): install "
            f"it with set_attention(model, {name!r}) or dit_rt.load(..., attention={name!r}), not per call"
        )
    elif name not in _BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; registered: {sorted(_BACKENDS)}; "
            f"usable for {where}: {available_attention(device, dtype, head_dim)}"
        )
    else:
        backend = _BACKENDS[name]
        reason = _usable(backend, device, dtype, head_dim)
        if reason is not None:
            raise RuntimeError(
                f"attention backend {name!r} is not usable for {where}: {reason}. "
                f"Usable: {available_attention(device, dtype, head_dim)}"
            )
    if torch.compiler.is_compiling():
        return backend  # inside a trace: logging would break fullgraph; the first eager call caches and logs
    _RESOLVED[key] = backend
    log.info("attention backend: %s%s for %s", backend.name, " (auto)" if name == "auto" else "", where)
    return backend
