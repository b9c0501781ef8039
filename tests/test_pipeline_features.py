"""Step caches and CPU offload through the public API, on the tiny Wan pipeline: exactness where promised,
skip counts in the output, and clear errors for what cannot be combined."""

import pytest
import torch
from tiny_checkpoints import make_wan_t2v

import dit_rt

KW = dict(
    height=32, width=48, num_frames=5, num_inference_steps=6, guidance_scale=4.0, seed=3, progress_bar=False
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan")
    make_wan_t2v(path)
    return str(path)


@pytest.fixture(scope="module")
def baseline(tiny):
    return dit_rt.load(tiny, device="cpu").generate("a cat", **KW)


@pytest.mark.parametrize("kind", ["fbcache", "teacache"])
def test_cache_threshold_zero_is_exact_and_counts(tiny, baseline, kind):
    cache = dict(kind=kind, threshold=0.0)
    if kind == "teacache":
        cache["coefficients"] = [1.0, 0.0]  # a folder has no catalog alias, so no published coefficients
    out = dit_rt.load(tiny, device="cpu", cache=cache).generate("a cat", **KW)
    assert torch.equal(out.frames, baseline.frames)
    assert out.stats["computed"] == 2 * KW["num_inference_steps"] and out.stats["skipped"] == 0


def test_cache_large_threshold_skips(tiny, baseline):
    out = dit_rt.load(tiny, device="cpu", cache=dict(kind="fbcache", threshold=1e9)).generate("a cat", **KW)
    assert out.stats["skipped"] > 0
    assert out.stats["computed"] + out.stats["skipped"] == 2 * KW["num_inference_steps"]
    assert not torch.equal(out.frames, baseline.frames)


def test_teacache_without_coefficients_fails_before_loading(tiny):
    with pytest.raises(ValueError, match="no published coefficients"):
        dit_rt.load(tiny, device="cpu", cache=dict(kind="teacache"))
    with pytest.raises(ValueError, match="no published coefficients for model 'wan2.2-t2v-a14b'"):
        dit_rt.load("wan2.2-t2v-a14b", device="cpu", cache=dict(kind="teacache"))


@pytest.mark.parametrize("mode", ["block", "model"])
def test_offload_gives_the_same_output(tiny, baseline, mode):
    out = dit_rt.load(tiny, device="cpu", offload=mode).generate("a cat", **KW)
    assert torch.equal(out.frames, baseline.frames)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(offload="disk"), "offload='disk' is unknown; choose one of: block, model"),
        (dict(offload="block", park_experts=True), "park_experts=True and offload="),
        (dict(cache=dict(kind="magic")), "kind"),
        (dict(offload="block", parallel=dict(ulysses=1)), "cannot be combined with parallel="),
    ],
)
def test_option_errors(tiny, options, match):
    with pytest.raises(ValueError, match=match):
        dit_rt.load(tiny, device="cpu", **options)


def test_timings_split_the_generation_into_phases(tiny, baseline):
    t = baseline.timings
    assert list(t) == ["text", "steps", "decode"] and all(v > 0 for v in t.values())
    out = dit_rt.load(tiny, device="cpu").generate("a cat", output_type="latents", **KW)
    assert list(out.timings) == ["text", "steps"]  # no decode asked for
