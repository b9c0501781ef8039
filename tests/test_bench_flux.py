"""tools/bench_flux.py at tiny configurations on the CPU: its argument parsing, both transformers built from
one set of weights (float32 here, so dit_rt sits at rounding distance from diffusers), a fast variant's code
path with what runs on the CPU, the VAE decode, and the JSON it writes."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_flux  # noqa: E402


def test_bench_flux_tiny(tmp_path, capsys):
    out = tmp_path / "flux.json"
    args = ["--tiny", "--device", "cpu", "--height", "32", "--width", "48", "--text-len", "8"]
    args += ["--warmup", "0", "--iters", "1", "--fast", "bf16+sdpa", "--vae", "--fp32-ref"]
    rows = bench_flux.main([*args, "--out", str(out)])
    transformer, vae = rows
    assert transformer["tokens"] == "6+8" and transformer["ms"] > 0 and transformer["diffusers_ms"] > 0
    assert 0 <= transformer["rel_err_vs_diffusers"] < 1e-5 and transformer["rel_err_vs_fp32"] < 1e-5
    assert transformer["gflop"] > 0 and transformer["fast"][0]["rel_err_vs_exact"] < 1e-5
    assert vae["latent"] == "16x4x6" and vae["rel_err_vs_diffusers"] < 1e-5
    assert json.loads(out.read_text())["rows"][0]["model"] == "flux.1-dev-tiny"
    assert "| flux.1-dev-tiny fast bf16+sdpa |" in capsys.readouterr().out


def test_bench_flux_rejects_bad_arguments():
    with pytest.raises(SystemExit, match="fast"):
        bench_flux.main(["--tiny", "--device", "cpu", "--fast", "fp8-per-tensor+fa3-fp8+nope"])
    with pytest.raises(SystemExit, match="multiples of 16"):
        bench_flux.main(["--tiny", "--device", "cpu", "--height", "72"])
