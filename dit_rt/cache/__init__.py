"""Step caches (TeaCache, First-Block Cache), installed on a transformer's BlockRunners from outside.

    cache = apply_cache(model, dict(kind="teacache", threshold=0.2), alias="wan2.1-t2v-1.3b")
    cache_reset(models, num_steps)              # once per generation, every transformer (each expert)
    for i, t in enumerate(timesteps):
        cache_step(expert, i)
        with cache_branch(expert, "cond"):
            cond = expert(...)
        with cache_branch(expert, "uncond"):
            uncond = expert(...)
    out.stats.update(cache_stats(models))       # {"cache": "teacache", "computed": n, "skipped": m}

Options: kind ("teacache" | "fbcache"), threshold (0 = never skip: exactly the uncached output);
teacache only: ret_steps (default True), coefficients (default: the authors' for the model), model (the
catalog alias whose coefficients to use, when the pipeline has none). Every function accepts a model or a
list of models and is a no-op for a model without a cache, so pipelines call them unconditionally.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

from dit_rt.cache.base import BranchState, StepCache
from dit_rt.cache.fbcache import FirstBlockCache
from dit_rt.cache.teacache import (
    TEACACHE_COEFFICIENTS,
    TeaCache,
    TeaCacheRule,
    make_teacache,
    poly,
    teacache_coefficients,
)
from dit_rt.contract import block_stacks
from dit_rt.runner import BlockRunner, stack_runners

CACHE_KINDS = ("teacache", "fbcache")
_OPTIONS = {
    "teacache": {"kind", "threshold", "ret_steps", "coefficients", "model"},
    "fbcache": {"kind", "threshold"},
}


def check_cache(cache: dict | None) -> None:
    """Validate a `cache=` option up front (kind, option names, threshold); coefficients are checked when
    the cache is applied to a model, where the model is known."""
    if cache is None:
        return
    if not isinstance(cache, dict):
        raise TypeError(f"cache must be a dict such as dict(kind='teacache', threshold=0.2), got {cache!r}")
    kind = cache.get("kind")
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache kind {kind!r} is unknown; choose one of: {', '.join(CACHE_KINDS)}")
    unknown = set(cache) - _OPTIONS[kind]
    if unknown:
        raise ValueError(f"cache kind {kind!r} takes {sorted(_OPTIONS[kind])}; unknown: {sorted(unknown)}")
    threshold = cache.get("threshold", 0.2 if kind == "teacache" else 0.1)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        raise ValueError(f"cache threshold must be a number >= 0, got {threshold!r}")


def _runners(model: nn.Module) -> list[BlockRunner]:
    try:
        return stack_runners(model)
    except TypeError as e:
        raise TypeError(f"{e}; step caches hook on the stacks' runners") from None


def apply_cache(model: nn.Module, cache: dict | None, *, alias: str | None = None) -> StepCache | None:
    """Install the step cache described by `cache` on the runners of model's stacks (replacing any earlier
    one); the stacks and the model's `cache_plan` say which stack leads and which stream is measured.

    alias: the catalog name of the model, used to find TeaCache's published coefficients (the cache
    dict's `model` wins). Returns the cache object, or None when `cache` is None.
    """
    check_cache(cache)
    runners = _runners(model)
    remove_cache(model)
    if cache is None:
        return None
    if cache["kind"] == "teacache":
        hook = make_teacache(
            model,
            threshold=cache.get("threshold", 0.2),
            ret_steps=cache.get("ret_steps", True),
            coefficients=cache.get("coefficients"),
            model_name=cache.get("model", alias),
        )
    else:
        hook = FirstBlockCache(cache.get("threshold", 0.1))
    stacks = block_stacks(model)
    plan = getattr(model, "cache_plan", None)
    hook.stacks = [id(s.blocks) for s in stacks]
    hook.stream = stacks[0].spec.stream(plan.residual if plan is not None else None)
    for r in runners:
        r.stack_hook = hook
    return hook


def remove_cache(model: nn.Module) -> None:
    for r in _runners(model):
        if isinstance(r.stack_hook, StepCache):
            r.stack_hook.detach()
        r.stack_hook = None


def get_cache(model: nn.Module) -> StepCache | None:
    try:
        hook = stack_runners(model)[0].stack_hook
    except TypeError:  # not a transformer with a block seam: no cache
        return None
    return hook if isinstance(hook, StepCache) else None


def _caches(models: nn.Module | Iterable[nn.Module]) -> list[StepCache]:
    models = [models] if isinstance(models, nn.Module) else list(models)
    return [c for c in map(get_cache, models) if c is not None]


def cache_reset(models: nn.Module | Iterable[nn.Module], num_steps: int | None = None) -> None:
    """Start a generation: forget cached residuals and counters; num_steps enables the step rules."""
    for c in _caches(models):
        c.reset(num_steps)


def cache_step(models: nn.Module | Iterable[nn.Module], i: int) -> None:
    """Tell the caches which denoising step (0-based) the next evaluations belong to."""
    for c in _caches(models):
        c.step = i


@contextmanager
def cache_branch(models: nn.Module | Iterable[nn.Module], name: str) -> Iterator[None]:
    """Evaluations inside use (and update) the cache state of branch `name` ("cond", "uncond", ...)."""
    caches = _caches(models)
    before = [c.branch for c in caches]
    for c in caches:
        c.branch = name
    try:
        yield
    finally:
        for c, b in zip(caches, before):
            c.branch = b


def cache_stats(models: nn.Module | Iterable[nn.Module]) -> dict:
    """{"cache": kind, "computed": n, "skipped": m} summed over the models' caches; {} without a cache."""
    caches = _caches(models)
    if not caches:
        return {}
    return {
        "cache": caches[0].kind,
        "computed": sum(c.stats()["computed"] for c in caches),
        "skipped": sum(c.stats()["skipped"] for c in caches),
    }


__all__ = [
    "CACHE_KINDS",
    "TEACACHE_COEFFICIENTS",
    "BranchState",
    "FirstBlockCache",
    "StepCache",
    "TeaCache",
    "TeaCacheRule",
    "apply_cache",
    "cache_branch",
    "cache_reset",
    "cache_stats",
    "cache_step",
    "check_cache",
    "get_cache",
    "make_teacache",
    "poly",
    "remove_cache",
    "teacache_coefficients",
]
