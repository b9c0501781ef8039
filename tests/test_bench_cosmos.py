"""tools/bench_cosmos.py at tiny configurations on the CPU: the first-step inputs of Video2World (condition
mask, per-frame timesteps, fps), Predict2.5 (the text projection) and Cosmos-1.0 (learnable position
embedding), both DiTs built from one set of weights (float32 here, so dit_rt sits at rounding distance from
diffusers), an fp8 variant's emulated path, both VAE decodes (Wan, Cosmos tokenizer), and the JSON.

diffusers' Cosmos DiT resizes the padding mask with torchvision, which has no CPU wheel here: the run is
wrapped in tests/tiny_cosmos.py's stand-in for that one call (the GPU image has torchvision)."""

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny_cosmos import torchvision_stand_in

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_cosmos  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def reference_resize():
    with torchvision_stand_in():
        yield


def test_bench_cosmos_tiny(tmp_path, capsys):
    out = tmp_path / "cosmos.json"
    args = ["--tiny", "--device", "cpu", "--model", "predict2-2b-v2w,predict2.5-2b,cosmos1-7b"]
    args += ["--text-len", "8", "--warmup", "0", "--fast", "fp8-per-tensor+sdpa", "--vae"]
    rows = bench_cosmos.main([*args, "--out", str(out)])
    v2w, p25, cosmos1, wan, tokenizer = rows
    # 9 frames of 32x48: 3 Wan latent frames (2 for the 8x tokenizer) of 4x6, 2x2 patches
    assert (v2w["size"], v2w["tokens"], cosmos1["tokens"]) == ("32x48x9", "18+8", "12+8")
    for r in (v2w, p25, cosmos1):
        assert r["ms"] > 0 and r["diffusers_ms"] > 0 and r["gflop"] > 0
        assert 0 <= r["rel_err_vs_diffusers"] < 1e-5  # (the --fp32-ref path: tests/test_bench_flux.py)
        assert 1e-4 < r["fast"][0]["rel_err_vs_exact"] < 0.1  # fp8 codes: near, not equal
    assert (wan["model"], wan["latent"]) == ("wan-vae-decode-float32", "16x3x4x6")
    assert (tokenizer["model"], tokenizer["latent"]) == ("cosmos-tokenizer-decode-float32", "16x2x4x6")
    assert wan["rel_err_vs_diffusers"] < 1e-5 and tokenizer["rel_err_vs_diffusers"] < 1e-5
    assert tokenizer["tflops"] is None  # the tokenizer counts no FLOPs
    assert json.loads(out.read_text())["rows"][1]["model"] == "predict2.5-2b-tiny"
    printed = capsys.readouterr().out
    assert "| predict2-2b-v2w-tiny fast fp8-per-tensor+sdpa |" in printed
    assert "| cosmos-tokenizer-decode-float32 16x2x4x6 |" in printed


def test_bench_cosmos_case_inputs():
    """Video2World conditions its first latent frame at its own timestep; Text2Image is one frame with one
    timestep; Cosmos-1.0 takes the EDM c_noise and fps 30."""
    a = argparse.Namespace(tiny=True, height=None, width=None, frames=None, text_len=8)
    cpu = torch.device("cpu")
    kw = bench_cosmos.cosmos_case("predict2-2b-v2w", a, cpu, torch.float32).kwargs
    assert kw["condition_mask"].shape == (1, 1, 3, 4, 6) and kw["fps"] == 16
    assert kw["condition_mask"][:, :, 0].eq(1).all() and kw["condition_mask"][:, :, 1:].eq(0).all()
    t = kw["timestep"].flatten()
    assert t[0] == pytest.approx(1e-4, rel=1e-3) and torch.allclose(t[1:], torch.tensor(80 / 81))
    kw = bench_cosmos.cosmos_case("predict2-14b-t2i", a, cpu, torch.float32).kwargs
    assert kw["hidden_states"].shape[2] == 1 and kw["timestep"].shape == (1,) and "condition_mask" not in kw
    kw = bench_cosmos.cosmos_case("cosmos1-7b", a, cpu, torch.float32).kwargs
    assert kw["fps"] == 30 and kw["hidden_states"].shape[2] == 2 and kw["timestep"].item() > 1
    kw = bench_cosmos.cosmos_case("predict2.5-2b", a, cpu, torch.float32).kwargs
    assert kw["fps"] is None and kw["encoder_hidden_states"].shape == (1, 8, 48)


def test_bench_cosmos_rejects_bad_arguments():
    with pytest.raises(SystemExit, match="unknown"):
        bench_cosmos.main(["--tiny", "--device", "cpu", "--model", "predict3"])
    with pytest.raises(SystemExit, match="1 \\+ 8k"):
        bench_cosmos.main(["--tiny", "--device", "cpu", "--model", "cosmos1-7b", "--frames", "13"])
    with pytest.raises(SystemExit, match="multiples of 16"):
        bench_cosmos.main(["--tiny", "--device", "cpu", "--height", "40"])
    with pytest.raises(SystemExit, match="fast"):
        bench_cosmos.main(["--tiny", "--device", "cpu", "--fast", "fp8-per-tensor+fa3-fp8+nope"])
