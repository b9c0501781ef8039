"""The public API (issue 6): catalog, up-front validation, determinism, callbacks, the dit-rt command."""

import subprocess
import sys

import pytest
import torch
from tiny_checkpoints import make_wan_t2v

import dit_rt
from dit_rt.catalog import CATALOG, lookup

ALIASES = [
    "wan2.1-t2v-1.3b",
    "wan2.1-t2v-14b",
    "wan2.1-i2v-14b-480p",
    "wan2.1-i2v-14b-720p",
    "wan2.2-t2v-a14b",
    "wan2.2-i2v-a14b",
    "flux.1-dev",
    "flux.2-dev",
    "cosmos-predict2.5-2b",
    "cosmos-predict2-2b-video2world",
    "cosmos-predict2-14b-video2world",
    "cosmos-predict2-2b-text2image",
    "cosmos-predict2-14b-text2image",
    "cosmos-1.0-diffusion-7b-text2world",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan")
    make_wan_t2v(path)
    return path


@pytest.fixture(scope="module")
def pipe(tiny):
    return dit_rt.load(str(tiny), device="cpu", dtype=torch.float32)


def test_catalog_is_complete():
    assert [e.alias for e in dit_rt.list_models()] == ALIASES
    for e in CATALOG.values():
        d = e.defaults
        assert "/" in e.repo and e.family in ("wan", "flux", "flux2", "cosmos")
        assert d.height % 16 == 0 and d.width % 16 == 0 and d.num_inference_steps > 0 and d.fps > 0
        if e.family == "wan":
            assert (d.num_frames - 1) % 4 == 0 and d.negative_prompt and d.flow_shift > 0
    assert lookup("Wan-AI/Wan2.1-T2V-1.3B-Diffusers").alias == "wan2.1-t2v-1.3b"
    assert lookup("WAN2.2-T2V-A14B").defaults.guidance_scale_2 == 3.0


def test_every_catalog_entry_is_implemented():
    assert [a for a in ALIASES if not CATALOG[a].implemented] == []


def test_an_unimplemented_entry_says_so(monkeypatch):
    """A catalog entry marked not implemented (as a new family starts out) fails before any download."""
    from dataclasses import replace

    monkeypatch.setitem(CATALOG, "flux.2-dev", replace(CATALOG["flux.2-dev"], implemented=False))
    with pytest.raises(NotImplementedError, match="not supported by this version"):
        dit_rt.load("flux.2-dev", device="cpu")


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(attention="nope"), "attention='nope' is unknown; choose one of: .*sdpa"),
        (dict(linear="int3"), "linear='int3' is unknown; choose one of: .*fp8-per-tensor"),
        (dict(dtype="float64"), "dtype='float64' is not supported"),
        (dict(compile="yes"), "compile must be True or False"),
        (dict(cuda_graphs=True), "cuda_graphs=True needs device='cuda'"),
    ],
)
def test_bad_runtime_options_fail_before_loading(options, match):
    with pytest.raises(ValueError, match=match):
        dit_rt.load("/nonexistent/folder", device="cpu", **options)


def test_not_a_model_folder(tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match="model_index.json"):
        dit_rt.load(str(tmp_path), device="cpu")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(height=40), ValueError, r"height=40 must be a positive multiple of 16 \(VAE x patch\); try 32"),
        (dict(width=100), ValueError, "width=100 must be a positive multiple of 16"),
        (dict(num_frames=8), ValueError, "num_frames=8 must be 4k\\+1.*try 5"),
        (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
        (
            dict(latents=torch.zeros(1, 16, 2, 4, 4)),
            ValueError,
            "latents must have shape \\(1, 16, 1, 4, 4\\)",
        ),
        (dict(negative_prompt=["a", "b"]), ValueError, "2 negative prompts for 1 prompts"),
        (dict(seed="1"), TypeError, "seed must be an int"),
        (dict(image=torch.zeros(3, 32, 32)), ValueError, "image-to-video"),
    ],
)
def test_generate_validates_before_work(pipe, kwargs, error, match):
    args = dict(height=32, width=32, num_frames=1, num_inference_steps=1, progress_bar=False) | kwargs
    with pytest.raises(error, match=match):
        pipe.generate("a cat", **args)


def test_prompt_type_is_checked(pipe):
    with pytest.raises(TypeError, match="prompt must be a string or a non-empty list of strings"):
        pipe.generate(42, height=32, width=32, num_frames=1, num_inference_steps=1, progress_bar=False)


def test_seed_determinism_batch_and_callback(pipe):
    seen = []
    kw = dict(
        height=32, width=32, num_frames=5, num_inference_steps=3, guidance_scale=3.0, progress_bar=False
    )
    a = pipe.generate(["a cat", "a dog"], seed=7, callback=lambda i, t, x: seen.append((i, int(t))), **kw)
    b = pipe.generate(["a cat", "a dog"], seed=7, **kw)
    c = pipe.generate(["a cat", "a dog"], seed=8, **kw)
    assert a.frames.shape == (2, 5, 32, 32, 3) and a.latents.shape == (2, 16, 2, 4, 4)
    assert torch.equal(a.frames, b.frames) and not torch.equal(a.frames, c.frames)
    assert not torch.equal(a.frames[0], a.frames[1])  # the batch items got different prompts and noise
    assert [i for i, _ in seen] == [0, 1, 2] and seen[0][1] > seen[-1][1]
    assert a.frames.min() >= 0 and a.frames.max() <= 1


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dit_rt", *args], capture_output=True, text=True, env=env)


def test_cli_models_lists_every_entry():
    out = _cli("models")
    assert out.returncode == 0
    for alias in ALIASES:
        assert alias in out.stdout
    assert "wan2.1-t2v-1.3b" in out.stdout and "not yet" not in out.stdout  # all 14 run


def test_cli_generate_and_info(tiny, tmp_path):
    gif, mp4 = tmp_path / "x.gif", tmp_path / "x.mp4"
    common = [
        "--model",
        str(tiny),
        "--prompt",
        "a cat",
        "--height",
        "32",
        "--width",
        "48",
        "--frames",
        "5",
        "--steps",
        "2",
        "--seed",
        "1",
        "--device",
        "cpu",
    ]
    out = _cli("generate", *common, "-o", str(gif))
    assert out.returncode == 0, out.stderr
    assert gif.read_bytes()[:6] == b"GIF89a"
    out = _cli("generate", *common, "--guidance-2", "3", "--flow-shift", "4", "-o", str(mp4))
    assert out.returncode == 0, out.stderr
    assert mp4.read_bytes()[4:8] == b"ftyp"
    info = _cli("info", str(tiny))
    assert info.returncode == 0 and "WanPipeline" in info.stdout and "transformer" in info.stdout
    assert "F32" in info.stdout


@pytest.mark.parametrize(
    "args,match",
    [
        (
            ["generate", "--model", "wan2.1-t2v-1.3b", "--prompt", "x", "-o", "x.avi"],
            "extension must be one of",
        ),
        (
            ["generate", "--model", "wan9-t2v", "--prompt", "x", "-o", "x.png", "--device", "cpu"],
            "unknown model 'wan9-t2v': not a catalog alias",
        ),
        (
            ["generate", "--model", "x", "--prompt", "x", "-o", "x.png", "--attention", "zzz"],
            "attention='zzz'",
        ),
        (["info", "/nonexistent"], "no model_index.json"),
        (
            ["generate", "--model", "x", "--prompt", "x", "-o", "x.png", "--device", "cpu", "--cuda-graphs"],
            "cuda_graphs=True needs device='cuda'",
        ),
    ],
)
def test_cli_bad_input_is_one_line_error(args, match):
    out = _cli(*args)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dit-rt: error:")
    assert __import__("re").search(match, lines[0]), lines[0]


def test_cli_demo(tmp_path):
    env = dict(__import__("os").environ, DIT_RT_CACHE=str(tmp_path / "cache"))
    out = _cli("demo", "-o", str(tmp_path / "demo.gif"), env=env)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "demo.gif").read_bytes()[:6] == b"GIF89a"
    assert "check: pass" in out.stdout  # the shipped tiny model draws what the default prompt asks
    assert not (tmp_path / "cache").exists()  # the checkpoint ships with the package: nothing is written
    again = _cli("demo", "-o", str(tmp_path / "demo.mp4"), env=env)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "demo.mp4").read_bytes()[4:8] == b"ftyp"
