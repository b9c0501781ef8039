"""Step caches on the tiny Wan transformer (CPU, float32): decisions against a hand-computed sequence,
threshold 0 bit-identical to no cache, large thresholds skip, per-branch state, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dit_rt.cache import (
    TEACACHE_COEFFICIENTS,
    apply_cache,
    cache_branch,
    cache_reset,
    cache_stats,
    cache_step,
    check_cache,
    get_cache,
    poly,
    remove_cache,
    teacache_coefficients,
)
from dit_rt.models.wan.transformer import timestep_sinusoid
from tests.test_wan_transformer import from_reference, inputs
from tests.tiny_checkpoints import make_wan_transformer

STEPS = 10
TIMESTEPS = torch.linspace(999, 0, STEPS)


@pytest.fixture(scope="module")
def model():
    return from_reference(make_wan_transformer())


def run_loop(model, cond, uncond, x, steps=STEPS, cfg=True):
    """What the pipeline does per generation: reset, then per step one call per CFG branch."""
    cache_reset(model, steps)
    outs = []
    for i in range(steps):
        t = TIMESTEPS[i : i + 1]
        cache_step(model, i)
        with cache_branch(model, "cond"):
            outs.append(model(x, t, cond))
        if cfg:
            with cache_branch(model, "uncond"):
                outs.append(model(x, t, uncond))
    return outs


def branch_inputs():
    x, _, cond = inputs(grid=(2, 4, 4), seed=1)
    uncond = torch.randn(cond.shape, generator=torch.Generator().manual_seed(9))
    return x, cond, uncond


def test_poly_is_numpy_poly1d():
    for coeffs in TEACACHE_COEFFICIENTS.values():
        for v in (0.0, 0.013, 0.1, 0.37):
            assert poly(coeffs, v) == pytest.approx(float(np.poly1d(coeffs)(v)), rel=1e-12, abs=1e-9)


def hand_decisions(signals: list[torch.Tensor], coeffs, threshold, warmup, compute_last, steps):
    """The authors' rule written out plainly for one branch."""
    decisions, acc, prev = [], 0.0, None
    for i, s in enumerate(signals):
        if prev is None or i < warmup or (compute_last and i >= steps - 1):
            compute, acc = True, 0.0
        else:
            d = ((s - prev).abs().mean() / prev.abs().mean()).item()
            acc += float(np.poly1d(coeffs)(d))
            compute = acc >= threshold
            if compute:
                acc = 0.0
        prev = s
        decisions.append(compute)
    return decisions


@torch.no_grad()
@pytest.mark.parametrize("ret_steps", [True, False])
def test_teacache_decisions_match_hand_computed(model, ret_steps):
    emb = model.condition_embedder
    temb = [emb.time_embedder(timestep_sinusoid(TIMESTEPS[i : i + 1], emb.freq_dim)) for i in range(STEPS)]
    tproj = [emb.time_proj(F.silu(e)).unflatten(1, (6, -1)) for e in temb]
    signals = tproj if ret_steps else temb
    coeffs = [1.0, 0.0]  # poly(d) = d: the accumulator is the plain relative L1 change
    d = [((b - a).abs().mean() / a.abs().mean()).item() for a, b in zip(signals, signals[1:])]
    threshold = 2.5 * float(np.median(d))  # skips some steps, computes others
    warmup, last = (5, False) if ret_steps else (1, True)
    expected = hand_decisions(signals, coeffs, threshold, warmup, last, STEPS)
    assert True in expected[warmup:] and False in expected  # the sequence exercises both outcomes

    x, cond, _ = branch_inputs()
    apply_cache(model, dict(kind="teacache", threshold=threshold, ret_steps=ret_steps, coefficients=coeffs))
    try:
        run_loop(model, cond, None, x, cfg=False)
        got = [c for _, _, c in get_cache(model).decisions]
    finally:
        remove_cache(model)
    assert got == expected


@torch.no_grad()
def test_skipped_call_reuses_the_branch_residual(model):
    """A skipped evaluation is exactly x + (out - x) of that branch's last computed evaluation."""
    x, cond, uncond = branch_inputs()
    cache = apply_cache(model, dict(kind="teacache", threshold=1e9, ret_steps=False, coefficients=[1.0, 0.0]))
    residual = {}
    try:
        cache_reset(model, STEPS)
        for i in range(3):
            cache_step(model, i)
            for name, ctx in (("cond", cond), ("uncond", uncond)):
                with cache_branch(model, name):
                    out = model(x, TIMESTEPS[i : i + 1], ctx)
                computed = cache.decisions[-1][2]
                assert computed == (i == 0)  # 1 warm-up step, then everything is skipped
                if computed:
                    residual[name] = cache.states[name].residual.clone()
                    continue
                # The same forward with the stack replaced by the hand-kept residual of this branch.
                model.runner.stack_hook = lambda runner, blocks, h, args, kwargs, r=residual[name]: h + r
                expected = model(x, TIMESTEPS[i : i + 1], ctx)
                model.runner.stack_hook = cache
                assert torch.equal(out, expected)
        assert not torch.equal(residual["cond"], residual["uncond"])
        assert cache_stats(model) == {"cache": "teacache", "computed": 2, "skipped": 4}
    finally:
        remove_cache(model)


@torch.no_grad()
@pytest.mark.parametrize(
    "cache",
    [
        dict(kind="teacache", threshold=0.0, model="wan2.1-t2v-1.3b"),
        dict(kind="teacache", threshold=0, ret_steps=False, model="wan2.1-t2v-14b"),  # poly < 0 here
        dict(kind="fbcache", threshold=0.0),
    ],
)
def test_threshold_zero_is_exactly_uncached(model, cache):
    x, cond, uncond = branch_inputs()
    expected = run_loop(model, cond, uncond, x)
    apply_cache(model, cache)
    try:
        got = run_loop(model, cond, uncond, x)
        stats = cache_stats(model)
    finally:
        remove_cache(model)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert stats["computed"] == 2 * STEPS and stats["skipped"] == 0


@torch.no_grad()
@pytest.mark.parametrize(
    "cache, computed_per_branch",
    [
        (dict(kind="teacache", threshold=1e9, ret_steps=True, coefficients=[1.0, 0.0]), 5),  # 5 warm-up
        (dict(kind="teacache", threshold=1e9, ret_steps=False, coefficients=[1.0, 0.0]), 2),  # first + last
        (dict(kind="fbcache", threshold=1e9), 1),  # only the first call has nothing to compare with
    ],
)
def test_large_threshold_skips(model, cache, computed_per_branch):
    x, cond, uncond = branch_inputs()
    expected = run_loop(model, cond, uncond, x)
    apply_cache(model, cache)
    try:
        got = run_loop(model, cond, uncond, x)
        c = get_cache(model)
        stats = cache_stats(model)
    finally:
        remove_cache(model)
    assert stats["computed"] == 2 * computed_per_branch
    assert stats["skipped"] == 2 * (STEPS - computed_per_branch)
    assert set(c.states) == {"cond", "uncond"}
    # Computed calls are bit-identical; skipped ones are approximations that differ.
    for (_, _, computed), a, b in zip(c.decisions, got, expected):
        assert torch.equal(a, b) == computed or (not computed and (a - b).abs().max() > 0)


@torch.no_grad()
def test_fbcache_skip_is_first_block_plus_cached_tail(model):
    x, cond, _ = branch_inputs()
    cache = apply_cache(model, dict(kind="fbcache", threshold=1e9))
    try:
        cache_reset(model)
        model(x, TIMESTEPS[:1], cond)
        tail = cache.states["default"].residual.clone()
        out = model(x, TIMESTEPS[1:2], cond)
        assert cache.decisions[-1][2] is False

        def first_block_then_tail(runner, blocks, h, args, kwargs):
            return runner.run(blocks, h, args, kwargs, 0, 1) + tail

        model.runner.stack_hook = first_block_then_tail
        assert torch.equal(out, model(x, TIMESTEPS[1:2], cond))
    finally:
        model.runner.stack_hook = cache
        remove_cache(model)


def test_published_coefficients_and_clear_errors(model):
    c = apply_cache(model, dict(kind="teacache"), alias="wan2.1-t2v-14b")
    assert c.coefficients == TEACACHE_COEFFICIENTS[("wan2.1-t2v-14b", True)] and c.rule.signal == "tproj"
    c = apply_cache(model, dict(kind="teacache", ret_steps=False, model="wan2.1-i2v-14b-720p"))
    assert c.coefficients[0] == pytest.approx(-114.36346466) and c.rule.signal == "temb"
    remove_cache(model)
    # FLUX.2-dev: NVIDIA's published fit (one variant for both settings), cubic
    assert teacache_coefficients("flux.2-dev", False) == teacache_coefficients("flux.2-dev", True)
    assert len(teacache_coefficients("flux.2-dev", True)) == 4
    with pytest.raises(ValueError, match="no published coefficients for model 'wan2.2-t2v-a14b'"):
        apply_cache(model, dict(kind="teacache"), alias="wan2.2-t2v-a14b")
    with pytest.raises(ValueError, match="loaded from a folder"):
        apply_cache(model, dict(kind="teacache"))
    assert get_cache(model) is None
    with pytest.raises(ValueError, match="choose one of: teacache, fbcache"):
        check_cache(dict(kind="magcache"))
    with pytest.raises(ValueError, match="unknown"):
        check_cache(dict(kind="fbcache", coefficients=[1.0]))
    with pytest.raises(ValueError, match=">= 0"):
        check_cache(dict(kind="teacache", threshold=-1))


@torch.no_grad()
def test_no_cache_functions_are_no_ops(model):
    x, cond, uncond = branch_inputs()
    out = run_loop(model, cond, uncond, x, steps=2)
    assert cache_stats(model) == {} and len(out) == 4
