"""tools/bench_flux.py at tiny configurations on the CPU: its argument parsing, both transformers built from
one set of weights (float32 here, so dit_rt sits at rounding distance from diffusers), a fast variant's code
path with what runs on the CPU, the VAE decode, and the JSON it writes; for FLUX.1 and FLUX.2."""

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


def test_bench_flux2_tiny(capsys):
    """FLUX.2: the diffusers Flux2Transformer2DModel takes dit_rt's weights (fused projections split back)
    strictly, on `meta` with assign; an fp8 variant runs its emulated path and stays near the exact output."""
    args = ["--model", "flux.2-dev", "--tiny", "--device", "cpu", "--height", "32", "--width", "48"]
    args += ["--text-len", "8", "--warmup", "0", "--iters", "1", "--fast", "bf16+sdpa,fp8-per-tensor+sdpa"]
    transformer, vae = bench_flux.main([*args, "--vae", "--fp32-ref"])
    assert transformer["model"] == "flux.2-dev-tiny" and transformer["tokens"] == "6+8"
    assert 0 <= transformer["rel_err_vs_diffusers"] < 1e-5 and transformer["rel_err_vs_fp32"] < 1e-5
    exact, fp8 = transformer["fast"]
    assert exact["rel_err_vs_exact"] < 1e-6 and 1e-4 < fp8["rel_err_vs_exact"] < 0.1
    assert transformer["gflop"] > 0
    assert vae["model"] == "flux2-vae-decode-float32" and vae["latent"] == "32x4x6"
    assert vae["rel_err_vs_diffusers"] < 1e-5
    assert "| flux.2-dev-tiny fast fp8-per-tensor+sdpa |" in capsys.readouterr().out


def test_bench_flux_rejects_bad_arguments():
    with pytest.raises(SystemExit, match="fast"):
        bench_flux.main(["--tiny", "--device", "cpu", "--fast", "fp8-per-tensor+fa3-fp8+nope"])
    with pytest.raises(SystemExit, match="multiples of 16"):
        bench_flux.main(["--tiny", "--device", "cpu", "--height", "72"])
    with pytest.raises(SystemExit):
        bench_flux.main(["--tiny", "--device", "cpu", "--model", "flux.3"])
