"""Model references -> a local folder in the Hub Diffusers layout (`model_index.json` + component folders).

A reference is a local folder, a catalog alias (dit_rt.catalog) or a Hub repo id. Repo ids go through
huggingface_hub, so HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE and tokens behave as everywhere else, downloads
show huggingface_hub's own progress bars, and only the components the pipeline lists are fetched. A repo
already complete in the local cache is used without touching the network.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CONFIG_NAMES = ("config.json", "scheduler_config.json", "preprocessor_config.json", "tokenizer_config.json")

# Optional hook: alias -> (repo id, revision) or None. By default dit_rt.catalog.lookup is used if present.
Resolver = Callable[[str], "tuple[str, str | None] | None"]


class ResolveError(ValueError):
    """A model reference that names no loadable model; the message says how to fix it."""


def _catalog(ref: str) -> tuple[str, str | None] | None:
    try:
        from dit_rt import catalog
    except ImportError:
        return None
    entry = catalog.lookup(ref) if hasattr(catalog, "lookup") else getattr(catalog, "CATALOG", {}).get(ref)
    return None if entry is None else (entry.repo, getattr(entry, "revision", None))


def _known_aliases() -> list[str]:
    try:
        from dit_rt import catalog
    except ImportError:
        return []
    return sorted(getattr(catalog, "CATALOG", {}))


def read_model_index(folder: str | os.PathLike) -> dict:
    """`model_index.json` of a pipeline folder as a dict; a clear error if the folder is not a model."""
    folder = Path(folder)
    path = folder / "model_index.json"
    if not path.is_file():
        what = "does not exist" if not folder.exists() else "has no model_index.json"
        raise ResolveError(
            f"{folder} {what}: not a model in the Hub Diffusers layout (model_index.json + one folder per "
            "component); pass a catalog alias, a Hub repo id, or such a folder"
        )
    return _read_json(path)


def read_config(component_dir: str | os.PathLike) -> dict:
    """A component's config (config.json, or scheduler_config.json / preprocessor / tokenizer config)."""
    component_dir = Path(component_dir)
    for name in CONFIG_NAMES:
        if (component_dir / name).is_file():
            return _read_json(component_dir / name)
    raise ResolveError(
        f"{component_dir}: no {' / '.join(CONFIG_NAMES)}; is the component missing from the snapshot? "
        "(download it again, or check the folder is a Hub Diffusers layout)"
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResolveError(f"{path}: unreadable JSON ({type(e).__name__}: {e})") from None


# Components dit_rt never runs: NVIDIA's Cosmos guardrail (a separate model and package). A folder loads
# whether or not it ships one, and a download never fetches it.
SKIPPED_COMPONENTS = ("safety_checker",)
SKIPPED_LIBRARIES = ("cosmos_guardrail",)


def pipeline_components(index: dict) -> list[str]:
    """Components a pipeline uses: model_index entries of the form [library, class] with a class, less the
    guardrail (SKIPPED_COMPONENTS / SKIPPED_LIBRARIES)."""
    return [
        k
        for k, v in index.items()
        if not k.startswith("_")
        and isinstance(v, list)
        and len(v) == 2
        and v[0]
        and v[1]
        and k not in SKIPPED_COMPONENTS
        and v[0] not in SKIPPED_LIBRARIES
    ]


def _check_components(folder: Path, components: Iterable[str], why: str = "") -> None:
    lacking = [c for c in components if not (folder / c).is_dir()]
    if lacking:
        present = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise ResolveError(
            f"{folder}: component folder(s) {', '.join(lacking)} missing (present: "
            f"{', '.join(present) or 'none'}){why}"
        )


def is_local(ref: str | os.PathLike) -> bool:
    """Whether a model reference names a local folder (a path object, an existing folder, or a string that
    starts like a path) rather than a catalog alias or Hub repo id."""
    return (
        isinstance(ref, os.PathLike)
        or Path(ref).expanduser().is_dir()
        or str(ref).startswith((".", "/", "~"))
    )


def resolve(
    ref: str | os.PathLike,
    *,
    revision: str | None = None,
    components: Iterable[str] | None = None,
    allow_patterns: list[str] | None = None,
    resolver: Resolver | None = None,
) -> Path:
    """The local snapshot folder for a folder path, catalog alias or Hub repo id.

    components: the component folders needed (default: every component model_index.json lists).
    allow_patterns: extra file patterns to download besides those components (e.g. root files).
    resolver: alias -> (repo id, revision) or None, used before dit_rt.catalog.
    """
    if is_local(ref):
        folder = Path(ref).expanduser()
        index = read_model_index(folder)
        _check_components(folder, pipeline_components(index) if components is None else components)
        return folder
    ref = str(ref)
    hit = (resolver(ref) if resolver else None) or _catalog(ref)
    if hit is not None:
        repo, alias_revision = hit
        revision = revision or alias_revision
    elif REPO_ID.match(ref):
        repo = ref
    else:
        known = _known_aliases()
        raise ResolveError(
            f"unknown model {ref!r}: not a catalog alias"
            + (f" ({', '.join(known)})" if known else "")
            + ", not a Hub repo id (org/name) and not an existing folder"
        )
    return _snapshot(repo, revision, None if components is None else list(components), allow_patterns or [])


def _unreachable(repo: str, revision: str | None, why: str) -> ResolveError:
    """One line: which repo, that it is not in the local cache (where), that the Hub was not reached (why),
    and the fixes."""
    from huggingface_hub import constants

    at = f"@{revision}" if revision else ""
    flag = f" --revision {revision}" if revision else ""
    return ResolveError(
        f"{repo}{at} is not (completely) in the local Hub cache ({constants.HF_HUB_CACHE}; set by HF_HOME / "
        f"HF_HUB_CACHE) and {why}: connect to the network once, or run `hf download {repo}{flag}` "
        "(`huggingface-cli download` on older huggingface_hub) and point HF_HOME at that cache, or pass a "
        "local folder in the Hub Diffusers layout"
    )


def _snapshot(repo: str, revision: str | None, components: list[str] | None, extra: list[str]) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    offline = constants.HF_HUB_OFFLINE

    def fetch(patterns: list[str], local: bool) -> Path:
        return Path(
            snapshot_download(repo, revision=revision, allow_patterns=patterns, local_files_only=local)
        )

    def download(patterns: list[str]) -> Path:
        try:
            return fetch(patterns, local=False)
        except OfflineModeIsEnabled:
            raise _unreachable(repo, revision, "HF_HUB_OFFLINE=1") from None
        except (LocalEntryNotFoundError, ConnectionError, TimeoutError) as e:
            # huggingface_hub's "cannot find the appropriate snapshot folder ... check your internet
            # connection" (several lines, a traceback's worth): the Hub did not answer.
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            why = f"{constants.ENDPOINT} could not be reached ({first.removeprefix('Got: ')})"
            raise _unreachable(repo, revision, why) from None

    def get(patterns: list[str], need: list[str]) -> Path:
        """The cached snapshot if it has everything; else a download (which is resumable and skips what is
        already there)."""
        try:
            folder = fetch(patterns, local=True)
            if (folder / "model_index.json").is_file() and all((folder / c).is_dir() for c in need):
                return folder
        except (LocalEntryNotFoundError, OSError, ValueError):
            folder = None
        if offline and folder is not None:
            _check_components(folder, need, "; HF_HUB_OFFLINE=1, so it cannot be downloaded now")
        if offline:
            raise _unreachable(repo, revision, "HF_HUB_OFFLINE=1")
        return download(patterns)

    if components is None:
        index = read_model_index(get(["model_index.json"], []))
        components = pipeline_components(index)
    patterns = ["model_index.json", *extra] + [f"{c}/*" for c in components]
    folder = get(patterns, components)
    read_model_index(folder)
    _check_components(folder, components)
    return folder


def config_to_dataclass(cls, config: dict, **overrides):
    """Build a (typed) dataclass config from a Hub config dict: unknown keys (e.g. `_class_name`) are dropped,
    JSON lists become tuples where the field is a tuple, `overrides` win."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in config or not f.init:
            continue
        v = config[f.name]
        hint = hints.get(f.name)
        origin = typing.get_origin(hint)
        if origin is types.UnionType or origin is typing.Union:
            origin = next(
                (typing.get_origin(a) or a for a in typing.get_args(hint) if a is not type(None)), None
            )
        if isinstance(v, list) and (origin is tuple or hint is tuple):
            v = tuple(v)
        values[f.name] = v
    return cls(**{**values, **overrides})
