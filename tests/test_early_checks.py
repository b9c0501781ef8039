"""Issue 17: every generation argument is checked before a model is resolved, downloaded or loaded; an
alias with no network and no cache gets dit_rt's own one-line message; an attention backend that cannot run
here is a one-line error before loading, saying what is actually wrong.

Network: the Hub endpoint is always http://127.0.0.1:9 (a closed local port); nothing else is contacted.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dit_rt
from dit_rt import checks, loaders
from dit_rt.catalog import CATALOG
from dit_rt.checks import Constraints, check_generation, check_output_path, model_constraints
from dit_rt.cli import main
from dit_rt.demo import INDEX, TRANSFORMER, VAE, write_tiny_wan
from dit_rt.ops.attention import available_attention, fa3, registry, resolve_attention, sage, unusable_reason
from dit_rt.runtime import RuntimeOptions

CLOSED_PORT = "http://127.0.0.1:9"
PROXIES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dit-rt: error: "), err
    return lines[0]


def _never(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} was reached")

    return fail


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No Hub: offline, a closed endpoint, an empty cache; and any step past the checks fails the test."""
    home = tmp_path / "hf"
    for name, value in dict(
        HF_HUB_OFFLINE="1", HF_ENDPOINT=CLOSED_PORT, HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub")
    ).items():
        monkeypatch.setenv(name, value)
    for name in PROXIES:
        monkeypatch.delenv(name, raising=False)
    import huggingface_hub

    monkeypatch.setattr(loaders, "resolve", _never("loaders.resolve"))
    monkeypatch.setattr(loaders.hub, "_snapshot", _never("a Hub download"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _never("huggingface_hub.snapshot_download"))
    monkeypatch.setattr(loaders, "load_weights", _never("loaders.load_weights"))
    monkeypatch.setattr(dit_rt, "load", _never("dit_rt.load"))
    return home


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_wan(tmp_path_factory.mktemp("tiny") / "wan")


def _configs_only(folder: Path, index=INDEX, transformer=TRANSFORMER, vae=VAE) -> Path:
    """A Hub-layout folder with the configs and no weight file at all."""
    for name, config in (("transformer", transformer), ("vae", vae)):
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps(config))
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _generate(model, *args, output=None, tmp_path):
    out = output if output is not None else str(tmp_path / "out" / "x.gif")
    return main(["generate", "--model", str(model), "--prompt", "a cat", "--device", "cpu", "-o", out, *args])


# -------------------------------------------------------------------------- A: arguments before the model


@pytest.mark.parametrize(
    "model,args,match",
    [
        ("wan2.1-t2v-1.3b", ["--height", "479"], r"height=479 must be a positive multiple of 16 .*; try 480"),
        ("wan2.1-t2v-1.3b", ["--width", "833"], r"width=833 must be a positive multiple of 16 .*; try 832"),
        ("wan2.1-t2v-1.3b", ["--height", "0"], r"height=0 must be a positive multiple of 16 .*; try 16"),
        ("wan2.1-t2v-1.3b", ["--frames", "80"], r"num_frames=80 must be 4k\+1 .*; try 77"),
        ("wan2.1-t2v-1.3b", ["--steps", "0"], r"num_inference_steps must be a positive int, got 0; try 1"),
        ("wan2.1-t2v-1.3b", ["--guidance", "-1"], r"guidance_scale=-1.0 must be a finite number >= 0; try 0"),
        ("wan2.1-t2v-1.3b", ["--guidance", "nan"], r"guidance_scale=nan must be a finite number >= 0"),
        ("wan2.2-t2v-a14b", ["--guidance-2", "-3"], r"guidance_scale_2=-3.0 .*default 3.0"),
        ("wan2.1-t2v-1.3b", ["--flow-shift", "0"], r"flow_shift=0.0 must be a finite number > 0"),
        ("wan2.1-t2v-1.3b", ["--fps", "0"], r"fps=0 must be a finite number > 0.*default 16"),
        ("wan2.1-t2v-1.3b", ["--image", "{png}"], r"wan2.1-t2v-1.3b takes no image.*image-to-video model"),
        ("wan2.1-i2v-14b-480p", [], r"wan2.1-i2v-14b-480p is image-to-video: pass image="),
        ("wan2.1-i2v-14b-480p", ["--image", "{tmp}/missing.png"], r"image .*missing.png: no such file"),
        ("wan2.1-i2v-14b-480p", ["--image", "{tmp}"], r"image .* is a directory"),
        ("wan2.1-i2v-14b-480p", ["--image", "{txt}"], r"\.txt is not an image extension"),
        ("flux.1-dev", ["--frames", "5"], r"num_frames=5: this model makes single images; try 1"),
        ("flux.1-dev", ["--height", "1000"], r"height=1000 must be a positive multiple of 16"),
        ("cosmos-1.0-diffusion-7b-text2world", ["--frames", "93"], r"num_frames=93 must be 8k\+1 .*; try 89"),
    ],
)
def test_catalog_arguments_fail_before_anything_is_resolved(offline, tmp_path, capsys, model, args, match):
    (tmp_path / "cat.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "notes.txt").write_text("not an image")
    paths = dict(png=tmp_path / "cat.png", txt=tmp_path / "notes.txt", tmp=tmp_path)
    args = [a.format(**paths) for a in args]
    assert _generate(model, *args, tmp_path=tmp_path) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert re.search(match, line), line
    assert not (tmp_path / "out").exists()  # the output's folder is not created by the check
    assert not offline.exists() or not any(offline.rglob("*.json"))  # nothing came into the cache


@pytest.mark.parametrize(
    "output,match",
    [
        ("{tmp}/x.avi", "extension must be one of"),
        ("{tmp}/somedir.mp4", r"somedir.mp4 is a directory; name a file in it"),
        ("{tmp}/afile/x.gif", r"afile is a file, not a folder"),
        ("/proc/out.gif", r"cannot create files in /proc"),
    ],
)
def test_bad_output_fails_before_anything_is_resolved(offline, tmp_path, capsys, output, match):
    if output.startswith("/proc") and not Path("/proc/self").exists():
        pytest.skip("no /proc here")
    (tmp_path / "somedir.mp4").mkdir()
    (tmp_path / "afile").write_text("")
    before = sorted(tmp_path.rglob("*"))
    assert _generate("wan2.1-t2v-1.3b", output=output.format(tmp=tmp_path), tmp_path=tmp_path) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert re.search(match, line), line
    assert sorted(tmp_path.rglob("*")) == before  # no probe file or folder left behind


def test_output_check_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b" / "x.gif"
    assert check_output_path(target) == target
    assert check_output_path(tmp_path / "y.png") == tmp_path / "y.png"
    assert list(tmp_path.iterdir()) == []


def test_good_arguments_go_on_to_load(offline, tmp_path, capsys, monkeypatch):
    def load(*args, **kwargs):
        raise NotImplementedError("load reached")

    monkeypatch.setattr(dit_rt, "load", load)
    args = ["--height", "480", "--width", "832", "--frames", "81", "--steps", "2", "--guidance", "0"]
    assert _generate("wan2.1-t2v-1.3b", *args, "--fps", "8", "--flow-shift", "3", tmp_path=tmp_path) == 2
    assert "load reached" in capsys.readouterr().err


def test_local_folder_is_checked_from_its_configs_without_reading_weights(
    tiny, offline, tmp_path, capsys, monkeypatch
):
    import safetensors
    import safetensors.torch

    for owner, name in [
        (safetensors, "safe_open"),
        (safetensors.torch, "load_file"),
        (safetensors.torch, "safe_open"),
        (loaders, "scan"),
        (loaders, "read_header"),
        (loaders.safetensors_io, "read_header"),
        (loaders.safetensors_io, "scan"),
        (loaders.load, "load_weights"),
    ]:
        monkeypatch.setattr(owner, name, _never(f"{owner.__name__}.{name}"), raising=False)
    assert _generate(tiny, "--height", "40", tmp_path=tmp_path) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert re.search(r"height=40 must be a positive multiple of 16 \(VAE x patch\); try 32", line), line
    assert _generate(tiny, "--frames", "6", tmp_path=tmp_path) == 2
    assert "num_frames=6 must be 4k+1" in capsys.readouterr().err
    # The rules the catalog states for Wan are the ones Wan's configs give.
    assert model_constraints(tiny) == CATALOG["wan2.1-t2v-1.3b"].constraints
    assert model_constraints(str(tiny)) == Constraints(spatial=16, temporal=4, image="none")


def test_folder_rules_follow_the_config_files(tmp_path):
    # Configs only: there is no weight file to read.
    wide = _configs_only(tmp_path / "wide", transformer=TRANSFORMER | dict(patch_size=[1, 4, 4]))
    assert model_constraints(wide).spatial == 32
    with pytest.raises(ValueError, match=r"height=48 must be a positive multiple of 32 .*; try 64"):
        check_generation(wide, height=48)
    coarse = _configs_only(
        tmp_path / "coarse", vae=VAE | dict(scale_factor_spatial=16, scale_factor_temporal=8)
    )
    with pytest.raises(ValueError, match=r"num_frames=5 must be 8k\+1"):
        check_generation(coarse, num_frames=5)
    check_generation(coarse, height=64, width=96, num_frames=9)
    i2v = _configs_only(tmp_path / "i2v", index=INDEX | dict(_class_name="WanImageToVideoPipeline"))
    with pytest.raises(ValueError, match="is image-to-video: pass image="):
        check_generation(i2v)
    other = _configs_only(tmp_path / "other", index=INDEX | dict(_class_name="SomeFuturePipeline"))
    assert model_constraints(other) == Constraints()  # unknown: `load` says it is not supported
    with pytest.raises(ValueError, match="model_index.json"):
        check_generation(tmp_path / "nothing-here", height=480)


def test_unknown_models_get_the_generic_checks(offline):
    assert model_constraints("someone/some-model") == Constraints()
    check_generation("someone/some-model", height=100, num_frames=7)  # not knowable yet: `load` checks
    with pytest.raises(ValueError, match="num_inference_steps must be a positive int"):
        check_generation("someone/some-model", num_inference_steps=-2)
    with pytest.raises(ValueError, match="guidance_scale=-0.5"):
        check_generation("someone/some-model", guidance_scale=-0.5)


def test_pipeline_rejects_negative_guidance(tiny):
    pipe = dit_rt.load(str(tiny), device="cpu", dtype=torch.float32)
    kw = dict(height=32, width=32, num_frames=1, num_inference_steps=1, progress_bar=False)
    with pytest.raises(ValueError, match=r"guidance_scale=-2.0 must be a finite number >= 0"):
        pipe.generate("a cat", guidance_scale=-2.0, **kw)
    with pytest.raises(ValueError, match=r"flow_shift=-1.0 must be a finite number > 0"):
        pipe.generate("a cat", flow_shift=-1.0, **kw)
    assert pipe.constraints == checks.folder_constraints(tiny)


# ------------------------------------------------------------------- B: no network, no cache: one line


@pytest.mark.parametrize("hub_offline", [True, False], ids=["HF_HUB_OFFLINE", "closed-port"])
def test_uncached_alias_without_network_is_one_line(tmp_path, hub_offline):
    home = tmp_path / "hf"
    env = {k: v for k, v in os.environ.items() if k not in PROXIES and not k.startswith("HF_")}
    env |= dict(
        HF_HOME=str(home),
        HF_HUB_CACHE=str(home / "hub"),
        HF_ENDPOINT=CLOSED_PORT,
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="*",
        no_proxy="*",
    )
    if hub_offline:
        env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run(
        [sys.executable, "-m", "dit_rt", "generate", "--model", "wan2.1-t2v-1.3b", "--prompt", "x"]
        + ["--device", "cpu", "-o", str(tmp_path / "x.gif")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 2
    line = _one_line_error(out.stderr)
    repo = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert f"{repo} is not (completely) in the local Hub cache ({home / 'hub'}" in line, line
    assert ("HF_HUB_OFFLINE=1" if hub_offline else f"{CLOSED_PORT} could not be reached") in line, line
    assert f"`hf download {repo}`" in line and "pass a local folder" in line, line
    assert "Traceback" not in out.stderr and not (tmp_path / "x.gif").exists()


# ------------------------------------------------------------- C: attention backends checked up front

BROKEN = "libc10_cuda.so: cannot open shared object file: No such file or directory"


@pytest.fixture
def fresh_imports(monkeypatch):
    """Forget which optional packages imported, before and after the test."""
    names = ("flash_attn_interface", "fa3_fwd_interface", "sageattention")

    def forget():
        fa3.fa3_module.cache_clear()
        sage.sage_module.cache_clear()
        registry._RESOLVED.clear()

    monkeypatch.setattr(registry, "_IMPORTS", {})
    for name in names:
        monkeypatch.delitem(sys.modules, name, raising=False)
    forget()
    yield monkeypatch
    forget()
    for name in names:  # the fakes must not outlive the test
        sys.modules.pop(name, None)


@pytest.fixture
def broken_fa3(fresh_imports, tmp_path):
    """fa3-fwd installed under a CPU-only torch: its import fails loading a CUDA library."""
    (tmp_path / "fa3_fwd_interface.py").write_text(f"raise ImportError({BROKEN!r})\n")
    (tmp_path / "flash_attn_interface.py").write_text(f"raise OSError({BROKEN!r})\n")
    fresh_imports.syspath_prepend(str(tmp_path))


@pytest.fixture
def installed_kernels(fresh_imports, tmp_path):
    """sageattention and fa3-fwd that import fine (on a machine without CUDA); CUDA calls fail the test."""
    (tmp_path / "sageattention").mkdir()
    (tmp_path / "sageattention" / "__init__.py").write_text("def sageattn(*args, **kwargs):\n    raise\n")
    (tmp_path / "fa3_fwd_interface.py").write_text("def flash_attn_func(*args, **kwargs):\n    raise\n")
    fresh_imports.syspath_prepend(str(tmp_path))
    fresh_imports.setattr(torch.cuda, "get_device_capability", _never("torch.cuda.get_device_capability"))
    fresh_imports.setattr(torch.cuda, "is_available", lambda: False)
    return fresh_imports


@pytest.mark.parametrize("name", ["fa3", "fa3-fp8"])
def test_broken_fa3_says_how_it_fails(broken_fa3, name):
    with pytest.raises(ValueError) as e:
        RuntimeOptions.create(device="cpu", attention=name)
    msg = str(e.value)
    assert "\n" not in msg and "not installed" not in msg, msg
    assert f"attention='{name}' cannot run with device=cpu, dtype=float32" in msg, msg
    assert re.search(rf"installed but fails to import: (ImportError|OSError): {BROKEN}", msg), msg
    assert msg.endswith("; usable there: auto, sdpa"), msg
    with pytest.raises(RuntimeError, match="installed but fails to import"):
        resolve_attention(name, device="cpu", dtype=torch.float32, head_dim=64)
    with pytest.raises(RuntimeError, match="installed but fails to import"):
        fa3.call_fa3(*(torch.zeros(1, 4, 2, 8),) * 3, 0.1)
    assert "fa3" not in available_attention("cpu") and "fa3" not in available_attention()
    assert resolve_attention("auto", device="cpu", dtype=torch.float32, head_dim=64).name == "sdpa"


def test_broken_package_fails_the_cli_before_loading(broken_fa3, tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loaders, "resolve", _never("loaders.resolve"))
    monkeypatch.setattr(loaders, "load_weights", _never("loaders.load_weights"))
    assert _generate(tiny, "--attention", "fa3", tmp_path=tmp_path) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "attention='fa3' cannot run" in line and "libc10_cuda.so" in line, line


def test_installed_kernels_on_a_machine_without_cuda(installed_kernels):
    cuda = torch.device("cuda")
    assert (
        unusable_reason("sage", device="cpu", dtype=torch.float16) == "needs a CUDA device (got device=cpu)"
    )
    assert "this torch has none usable" in unusable_reason("sage", device=cuda, dtype=torch.float16)
    assert "this torch has none usable" in unusable_reason("fa3", device=cuda, dtype=torch.bfloat16)
    assert available_attention(cuda, torch.bfloat16, 128) == ["sdpa"]
    assert resolve_attention("auto", device=cuda, dtype=torch.bfloat16, head_dim=128).name == "sdpa"
    for name in ("sage", "fa3", "fa3-fp8"):
        with pytest.raises(ValueError, match=rf"attention='{name}' cannot run .*needs a CUDA device"):
            RuntimeOptions.create(device="cpu", attention=name)
    # What test_attention's "auto prefers fa3" does, now with sageattention installed: fa3 on an sm90 GPU.
    installed_kernels.setattr(fa3, "_capability", lambda device: (9, 0))
    registry._RESOLVED.clear()
    assert resolve_attention("auto", device=cuda, dtype=torch.bfloat16, head_dim=128).name == "fa3"
    assert available_attention(cuda, torch.bfloat16, 128) == ["sdpa", "fa3", "fa3-fp8"]


def test_named_backend_on_the_wrong_gpu(installed_kernels):
    installed_kernels.setattr(torch.cuda, "is_available", lambda: True)
    installed_kernels.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(
        ValueError, match=r"attention='fa3-fp8' cannot run .*needs an sm90 \(Hopper\) GPU.*sm80"
    ):
        RuntimeOptions.create(device="cuda", dtype="bfloat16", attention="fa3-fp8")
    installed_kernels.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(ValueError, match=r"attention='sage' cannot run .*needs sm80 or newer"):
        RuntimeOptions.create(device="cuda", dtype="bfloat16", attention="sage")
    with pytest.raises(ValueError, match=r"attention='fa3' .*dtype=float16: .*needs sm80"):
        RuntimeOptions.create(device="cuda", dtype="float16", attention="fa3")
