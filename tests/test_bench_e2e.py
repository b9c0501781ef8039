"""tools/bench_e2e.py at the demo's tiny configurations on the CPU: the checkpoint it writes loads on both
sides, runs accumulate across calls, and its error columns measure what they claim (float32 everywhere
here, so dit_rt sits at rounding distance from the reference and diffusers' own run at zero)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_e2e  # noqa: E402


@pytest.mark.parametrize("model", ["wan2.1-t2v-1.3b", "wan2.1-i2v-14b-480p"])
def test_bench_e2e_tiny(tmp_path, model):
    common = ["--tiny", "--device", "cpu", "--model", model, "--steps", "2", "--workdir", str(tmp_path)]
    bench_e2e.main([*common, "--runs", "ref,exact", "--seeds", "0,1"])
    out = tmp_path / "e2e.json"
    rows = bench_e2e.main([*common, "--runs", "diffusers", "--seeds", "0,1", "--out", str(out)])
    by_run = {r["run"]: r for r in rows}
    assert set(by_run) == {"ref", "diffusers", "exact"}  # the first call's runs are still in the table
    assert by_run["diffusers"]["rel_l2"] == 0 and math.isinf(by_run["diffusers"]["psnr_db"])
    assert 0 < by_run["exact"]["rel_l2"] < 1e-4 and by_run["exact"]["psnr_db"] > 80
    assert len(by_run["exact"]["rel_l2_per_seed"]) == 2
    assert by_run["ref"]["rel_l2"] is None and by_run["exact"]["median_s"] > 0
    phases = by_run["exact"]["phases_s"]  # dit_rt's generate, split: diffusers' has no such split
    assert set(phases) == {"text", "steps", "decode"} and by_run["diffusers"]["phases_s"] is None
    assert 0 < sum(phases.values()) <= by_run["exact"]["median_s"]
    assert json.loads(out.read_text())["runs"][0]["run"] == "ref"


@pytest.mark.parametrize("model", ["wan2.1-t2v-1.3b", "cosmos-predict2-2b-video2world"])
def test_bench_e2e_diagnose(tmp_path, capsys, model):
    from tiny_cosmos_pipelines import reference_stand_ins  # no CPU torchvision: its two calls stood in

    args = ["--tiny", "--device", "cpu", "--model", model, "--runs", "", "--workdir", str(tmp_path)]
    with reference_stand_ins():
        bench_e2e.main([*args, "--out", str(tmp_path / "d.json"), "--diagnose"])
    diag = json.loads((tmp_path / "d.json").read_text())["diagnose"]
    assert len(diag) == 8 and all(0 < v < 0.1 for v in diag.values())  # bf16 rounding, not a mismatch
    assert "transformer: dit_rt bf16" in capsys.readouterr().out


def test_bench_e2e_cpu_bf16_wan_rounds_no_more_than_diffusers(tmp_path):
    """--cpu-bf16: both sides in bf16 beside the float32 reference, each seed with its own prompt. Wan's VAE
    runs in float32 by default, as in diffusers' run (with it in bf16 dit_rt's frames were ~17% further from
    float32 on every seed), and the UMT5 encoder rounds as transformers' does bit for bit (its fused GELU and
    prompt-length pass left the frames ~5% further on most prompts): dit_rt's frames are then as far from
    float32 as diffusers' on every seed, to the transformer's and VAE's own last bits."""
    common = ["--tiny", "--device", "cpu", "--model", "wan2.1-t2v-1.3b", "--steps", "4", "--cpu-bf16"]
    rows = bench_e2e.main(
        [*common, "--runs", "ref,diffusers,exact", "--seeds", "0,1,2,3", "--workdir", str(tmp_path)]
    )
    by_run = {r["run"]: r for r in rows}
    assert 0 < by_run["diffusers"]["rel_l2"] < 0.1  # bf16 rounding on both sides, not float32's zero
    lo, hi = by_run["exact"]["rel_l2_vs_diffusers_range"]
    assert 0.98 <= lo <= by_run["exact"]["rel_l2_vs_diffusers"] <= hi <= 1.02, (lo, hi)
    assert by_run["diffusers"]["rel_l2_vs_diffusers_range"] == [1.0, 1.0]


def test_bench_e2e_seeds_have_their_own_prompts(tmp_path, monkeypatch):
    """Each seed's generate gets its own prompt (so the seeds sample the text encoder's rounding too), the
    warm-up another one."""
    seen = []
    original = bench_e2e.RUNS["exact"]

    def recording(job, name):
        pipe, generate = original(job, name)

        def spy(latents, steps, prompt):
            seen.append(prompt)
            return generate(latents, steps, prompt)

        return pipe, spy

    monkeypatch.setitem(bench_e2e.RUNS, "exact", recording)
    common = ["--tiny", "--device", "cpu", "--model", "wan2.1-t2v-1.3b", "--steps", "1"]
    bench_e2e.main([*common, "--runs", "exact", "--seeds", "0,1,2", "--workdir", str(tmp_path)])
    assert seen[1:] == [bench_e2e.prompt_of(s) for s in (0, 1, 2)] and len(set(seen[1:])) == 3


def test_vae_dtype_defaults(tmp_path):
    """Wan: the VAE in float32 unless vae_dtype= says otherwise; other families: the model dtype."""
    import dit_rt
    from dit_rt.demo import write_tiny_wan

    folder = write_tiny_wan(tmp_path / "wan")
    assert dit_rt.load(str(folder), device="cpu", dtype=torch.bfloat16).vae_dtype == torch.float32
    pipe = dit_rt.load(str(folder), device="cpu", dtype=torch.bfloat16, vae_dtype="bfloat16")
    assert pipe.vae_dtype == torch.bfloat16 and next(pipe.vae.parameters()).dtype == torch.bfloat16
    from dit_rt.pipeline import Pipeline
    from dit_rt.pipelines.flux import FluxPipeline

    assert Pipeline.vae_default_dtype is None and FluxPipeline.vae_default_dtype is None


def test_bench_e2e_rejects_unknown_runs(tmp_path):
    with pytest.raises(SystemExit, match="unknown"):
        bench_e2e.main(["--tiny", "--device", "cpu", "--runs", "nope", "--workdir", str(tmp_path)])


def test_bench_e2e_flux_tiny(tmp_path):
    """FLUX.1: packed latents [1, (H/16)(W/16), 64] go to both sides, the image comes back as one frame."""
    rows = bench_e2e.main(
        ["--tiny", "--device", "cpu", "--model", "flux.1-dev", "--steps", "2", "--workdir", str(tmp_path)]
        + ["--runs", "ref,exact", "--seeds", "0"]
    )
    by_run = {r["run"]: r for r in rows}
    assert set(by_run) == {"ref", "exact"}
    assert 0 < by_run["exact"]["rel_l2"] < 1e-4 and by_run["exact"]["psnr_db"] > 80
    frames = torch.load(next(tmp_path.glob("flux.1-dev-tiny/results-2steps/exact.seed0.pt")))
    assert frames.shape == (1, 64, 96, 3)  # T = 1 at the tiny default 64 x 96
    assert bench_e2e.FAMILIES["flux-t2i"].latent_shape(1024, 1024, 1) == (1, 4096, 64)


def test_random_weights_follow_module_types():
    """Norm scales 1, everything else random: adaLN modulation Linears (`norm1.linear`, named like norms)
    must stay random, and the Wan VAE's [C, 1, 1, 1] RMS scales must be 1."""
    import diffusers
    import torch
    from bench_wan import randomize_

    flux = diffusers.FluxTransformer2DModel(
        num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=[4, 6, 6], in_channels=16,
    )  # fmt: skip
    p = dict(randomize_(flux, 0).named_parameters())
    assert p["transformer_blocks.0.norm1.linear.weight"].std() > 0.1
    assert p["transformer_blocks.0.norm1.linear.bias"].abs().max() < 0.2
    assert torch.equal(p["transformer_blocks.0.attn.norm_q.weight"], torch.ones(16))
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1)
    gammas = [t for n, t in randomize_(vae, 0).named_parameters() if n.endswith("gamma")]
    assert gammas and all(bool((t == 1).all()) for t in gammas)


@pytest.mark.parametrize(
    "model, frames",
    [
        ("cosmos-predict2-2b-text2image", 1),
        ("cosmos-predict2-2b-video2world", 9),
        ("cosmos-1.0-diffusion-7b-text2world", 9),
        ("cosmos-predict2.5-2b", 9),
    ],
)
def test_bench_e2e_cosmos_tiny(tmp_path, model, frames):
    """Cosmos: the checkpoint has no safety checker component, diffusers runs with a pass-through checker
    (whose path rounds Predict2's and 1.0's frames to 8 bits) and dit_rt's frames take the same rounding, so
    exact sits at a few flipped 8-bit levels from the float32 reference (Predict2.5: at float32 rounding)."""
    from tiny_cosmos_pipelines import reference_stand_ins  # no CPU torchvision: its two calls stood in

    common = ["--tiny", "--device", "cpu", "--model", model, "--steps", "2", "--workdir", str(tmp_path)]
    with reference_stand_ins():
        rows = bench_e2e.main([*common, "--runs", "ref,exact", "--seeds", "0"])
    by_run = {r["run"]: r for r in rows}
    assert set(by_run) == {"ref", "exact"}
    assert 0 <= by_run["exact"]["rel_l2"] < 1e-3 and by_run["exact"]["psnr_db"] > 50
    folder = next(tmp_path.glob("*/checkpoint"))
    index = json.loads((folder / "model_index.json").read_text())
    assert "safety_checker" not in index and not (folder / "safety_checker").exists()
    clip = torch.load(next(tmp_path.glob("*/results-2steps/exact.seed0.pt")))
    assert clip.shape == (frames, 64, 96, 3)
    # 8-bit levels where diffusers' safety-checker path rounds (Predict2, 1.0), float where it does not
    assert torch.equal(clip * 255, (clip * 255).round()) == bench_e2e.family_of(model).eight_bit
