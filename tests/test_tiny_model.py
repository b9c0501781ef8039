"""The trained tiny shapes model: its dataset and prompt grammar, the clip check, the training script's smoke
mode, the shipped checkpoint (size, fp16, the normal loader) and what the demo makes of it, and the quality
harness's smoke mode."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import quality  # noqa: E402
import train_tiny  # noqa: E402

import dit_rt  # noqa: E402
from dit_rt.clipcheck import PALETTE, VOCABULARY, Scene, check_clip, describe, parse_prompt  # noqa: E402

# The default prompt and five others: every shape, colour changes, all four motions.
DEMO_PROMPTS = (
    "a red circle moving right on a blue background",
    "a yellow square moving left on a black background",
    "a white triangle moving up on a green background",
    "a green circle moving down on a white background",
    "a blue square growing on a yellow background",
    "a red triangle shrinking on a white background",
)


def _clip(prompt: str, seed: int = 0) -> torch.Tensor:
    return train_tiny.render(parse_prompt(prompt), torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- grammar


def test_parse_prompt_round_trip_and_errors():
    scene = parse_prompt("A red circle moving right on a blue background.")
    assert scene == Scene("red", "circle", "moving", "right", "blue")
    assert parse_prompt(scene.prompt) == scene
    assert parse_prompt("a green square turning red on a black background").target == "red"
    with pytest.raises(ValueError, match="unknown word.*'purple'.*'dog'.*knows only a, on, background"):
        parse_prompt("a purple dog moving right on a blue background")
    for bad in (
        "a red circle moving on a blue background",  # no direction
        "a red circle growing on a red background",  # shape and background alike
        "a red circle turning blue on a blue background",  # turns into the background
        "red circle moving right on a blue background",
    ):
        with pytest.raises(ValueError, match="does not follow the tiny model's grammar"):
            parse_prompt(bad)


# ---------------------------------------------------------------------------------------------- dataset


def test_render_draws_the_scene():
    clip = _clip("a red square moving right on a blue background")
    assert clip.shape == (train_tiny.FRAMES, train_tiny.SIZE, train_tiny.SIZE, 3)
    assert clip.min() >= 0 and clip.max() <= 1
    assert torch.allclose(clip[0, 0, 0], torch.tensor(PALETTE["blue"]))  # a corner is background
    red = (clip - torch.tensor(PALETTE["red"])).norm(dim=-1) < 0.05  # [T, H, W]
    xs = torch.arange(train_tiny.SIZE).float()
    cx = [float(xs.expand_as(m)[m].mean()) for m in red]
    assert all(b > a for a, b in zip(cx, cx[1:]))  # moves right every frame
    assert abs(int(red[0].sum()) - int(red[-1].sum())) <= 0.1 * int(red[0].sum())  # at a constant size
    grow = _clip("a red square growing on a blue background")
    assert (grow[-1] != grow[-1, 0, 0]).any(-1).sum() > 2 * (grow[0] != grow[0, 0, 0]).any(-1).sum()


def test_batches_are_reproducible_from_the_seed():
    p1, x1 = train_tiny.batch(torch.Generator().manual_seed(3), 4)
    p2, x2 = train_tiny.batch(torch.Generator().manual_seed(3), 4)
    p3, _ = train_tiny.batch(torch.Generator().manual_seed(4), 4)
    assert p1 == p2 and torch.equal(x1, x2) and p1 != p3
    assert x1.shape == (4, 3, train_tiny.FRAMES, train_tiny.SIZE, train_tiny.SIZE)
    assert all(set(p.split()) <= set(VOCABULARY) for p in p1)


# ---------------------------------------------------------------------------------------------- clip check


@pytest.mark.parametrize(
    "prompt",
    [
        *DEMO_PROMPTS,
        "a black circle shrinking on a green background",
        "a white square turning red on a blue background",
    ],
)
def test_check_passes_rendered_clips(prompt):
    result = check_clip(_clip(prompt, seed=len(prompt)), prompt, shape=True)
    assert result.ok, str(result)


@pytest.mark.parametrize(
    "shown, asked, failure",
    [
        (
            "a red circle moving right on a blue background",
            "a red circle moving left on a blue background",
            "moving right, wanted moving left",
        ),
        (
            "a red circle moving up on a blue background",
            "a red circle moving right on a blue background",
            "moving up, wanted moving right",
        ),
        (
            "a red circle moving right on a blue background",
            "a green circle moving right on a blue background",
            "colour red, wanted green",
        ),
        (
            "a red circle moving right on a blue background",
            "a red circle moving right on a white background",
            "background blue, wanted white",
        ),
        (
            "a red circle moving right on a blue background",
            "a red square moving right on a blue background",
            "shape circle, wanted square",
        ),
        (
            "a red triangle growing on a blue background",
            "a red triangle shrinking on a blue background",
            "growing, wanted shrinking",
        ),
        (
            "a white square turning red on a blue background",
            "a white square turning green on a blue background",
            "ending red, wanted turning green",
        ),
    ],
)
def test_check_fails_the_wrong_prompt(shown, asked, failure):
    result = check_clip(_clip(shown), asked, shape=True)
    assert not result.ok and failure in str(result), str(result)


def test_check_measures_shape_only_when_asked():
    clip = _clip("a red square moving right on a blue background")
    assert check_clip(clip, "a red circle moving right on a blue background").ok
    assert describe(clip).shape == "square"


def test_check_rejects_a_blank_or_noisy_clip():
    blank = torch.tensor(PALETTE["blue"]).expand(9, 32, 32, 3)
    assert describe(blank) is None
    assert not check_clip(blank, DEMO_PROMPTS[0]).ok
    noise = torch.rand(9, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    assert not check_clip(noise, DEMO_PROMPTS[0]).ok


# ---------------------------------------------------------------------------------------------- training


def test_training_smoke_writes_a_loadable_checkpoint(tmp_path):
    assert train_tiny.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    pipe = dit_rt.load(str(tmp_path), device="cpu", dtype="float32")
    out = pipe.generate(
        "a red circle growing on a blue background",
        negative_prompt="",
        height=32,
        width=32,
        num_frames=9,
        num_inference_steps=2,
        seed=0,
        progress_bar=False,
    )
    assert out.frames.shape == (1, 9, 32, 32, 3) and torch.isfinite(out.frames).all()


def test_text_tokens_pad_to_a_fixed_shape_without_changing_the_context(tmp_path):
    # the compiled step needs one shape; the padded positions are masked out of attention and the context
    from dit_rt.models.text import T5Tokenizer

    (tmp_path / "tokenizer.json").write_text(train_tiny.tokenizer_json(VOCABULARY))
    tok = T5Tokenizer.from_folder(tmp_path)
    _, _, text = train_tiny.build(0)
    prompts = [DEMO_PROMPTS[0], "", DEMO_PROMPTS[4]]
    ids, mask = train_tiny.text_tokens(tok, prompts, "cpu")
    assert ids.shape == mask.shape == (3, 16)
    n = int(mask.sum(1).max())
    assert n < 16 and mask[:, n:].sum() == 0
    padded = train_tiny.text_context(text, ids, mask, 64)
    tight = train_tiny.text_context(text, ids[:, :n], mask[:, :n], 64)
    assert padded.shape == (3, 64, train_tiny.TEXT_DIM)
    torch.testing.assert_close(padded, tight, rtol=1e-5, atol=1e-6)
    assert padded[1, 1:].abs().sum() == 0 and padded[0, n:].abs().sum() == 0


def test_latent_pool_refreshes_in_chunks_at_the_set_rate():
    vae, _, _ = train_tiny.build(0)
    vae.requires_grad_(False)
    pool = train_tiny.LatentPool(vae, torch.Generator().manual_seed(0), "cpu", 8, 2, 5, chunk=4)
    before = pool.latents.clone(), list(pool.prompts)
    pool.sample(3)
    assert torch.equal(pool.latents, before[0])  # 2 due, the chunk is 4
    prompts, x = pool.sample(3)
    assert x.shape == (3, *pool.latents.shape[1:]) and len(prompts) == 3
    changed = [i for i in range(8) if not torch.equal(pool.latents[i], before[0][i])]
    assert changed == [0, 1, 2, 3] and pool.next == 4 and pool.due == 0
    for _ in range(2):
        pool.sample(1)
    assert pool.next == 0  # wrapped round: rows 4-7 replaced next
    assert all(not torch.equal(pool.latents[i], before[0][i]) for i in range(4, 8))


def test_fit_steps_times_both_stages_and_refuses_a_budget_spent_on_timing(tmp_path):
    import argparse

    a = argparse.Namespace(
        seed=0, vae_batch=1, vae_frames=5, dit_batch=2, refresh=8, compile=False, out=str(tmp_path)
    )
    vae, transformer, text = train_tiny.build(0)
    logged = []
    a.fit_minutes = 2.0
    vae_steps, dit_steps = train_tiny.fit_steps(a, vae, transformer, text, torch.device("cpu"), logged.append)
    assert vae_steps > 0 and dit_steps > 0
    assert f"--vae-steps {vae_steps} --dit-steps {dit_steps}" in logged[-1]
    a.fit_minutes = 0.05  # 3 s: less than the timing itself takes
    with pytest.raises(SystemExit, match="leaves no time to train"):
        train_tiny.fit_steps(a, vae, transformer, text, torch.device("cpu"), logged.append)


def test_vae_loss_matches_its_noise_shape_and_trains():
    vae, _, _ = train_tiny.build(0)
    _, x = train_tiny.batch(torch.Generator().manual_seed(0), 2, 9)
    shape = train_tiny.latent_shape(vae, x)
    assert shape == tuple(train_tiny.vae_encode(vae, x)[0].shape)
    loss, rec, kl = train_tiny.vae_loss(vae, x, torch.randn(shape))
    assert loss.requires_grad and not rec.requires_grad and loss > rec > 0 and kl >= 0
    loss.backward()
    assert all(p.grad is not None for p in vae.encoder.parameters())


# ---------------------------------------------------------------------------------------------- harness


def test_quality_harness_smoke(capsys, tmp_path):
    # on a smoke-trained checkpoint: seconds (the shipped model's run is in BENCHMARKS.md)
    assert train_tiny.main(["--smoke", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert quality.main(["--smoke", "--model", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:-1]
        for line in out.splitlines()
        if line.startswith("| ")
    }
    # the smoke-trained model draws no shape yet: the check column reports, it need not pass
    assert rows["exact"][0].strip() == "exact" and rows["exact"][2].strip() in ("0/1", "1/1")
    fp8 = float(rows["fp8-per-tensor linears"][0])
    assert 15 < fp8 < 100  # emulated fp8 changes the frames, a little
    assert rows["fbcache 0.1"][2].strip() in ("0/1", "1/1")


def test_quality_parallel_rows_equal_one_process(tmp_path, monkeypatch):
    # the harness's Ulysses / Ring rows: two forked gloo processes, rank 0's clips against one process
    from dit_rt.demo import write_tiny_wan

    folder = str(write_tiny_wan(tmp_path / "m"))
    args = (["a red circle growing on a blue background"], 0, 2, 1.0)
    pipe = dit_rt.load(folder, device="cpu", dtype="float32")
    (ref,), _, _ = quality.generate(pipe, *args)
    for parallel in (dict(ulysses=2), dict(ring=2)):
        (clip,), seconds, _ = quality.launched(folder, "cpu", "float32", dict(parallel=parallel), *args)
        assert clip.shape == ref.shape and seconds > 0
        torch.testing.assert_close(clip, ref, rtol=0, atol=1e-4)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU: refused before any process starts
    with pytest.raises(RuntimeError, match="needs 2 GPUs"):
        quality.launched(folder, "cuda", "bfloat16", dict(parallel=dict(ulysses=2)), *args)


# ---------------------------------------------------------------------------------------------- shipped model


def test_shipped_checkpoint_is_small_fp16_and_loads_normally():
    from dit_rt.demo import tiny_model_folder
    from dit_rt.loaders import read_header

    folder = tiny_model_folder()
    files = sorted(folder.rglob("*.safetensors"))
    assert len(files) == 3 and sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) <= 4 * 2**20
    for f in files:
        header, _ = read_header(f)
        assert {t.dtype for t in header.values()} == {torch.float16}, f
    pipe = dit_rt.load(str(folder), device="cpu", dtype="float32")  # the normal loaders, no special path
    assert type(pipe).__name__ == "WanPipeline"


@pytest.mark.parametrize("prompt", DEMO_PROMPTS)
def test_demo_draws_what_the_prompt_says(prompt, tmp_path, capsys):
    import time

    from dit_rt.cli import main

    t0 = time.perf_counter()
    assert main(["demo", "--prompt", prompt, "-o", str(tmp_path / "d.gif")]) == 0
    assert time.perf_counter() - t0 < 60
    out = capsys.readouterr().out
    assert "check: pass" in out, out
    assert (tmp_path / "d.gif").read_bytes()[:6] == b"GIF89a"


def test_demo_refuses_unknown_words_before_loading(tmp_path, monkeypatch, capsys):
    from dit_rt.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model for a prompt it cannot draw")

    monkeypatch.setattr(dit_rt, "load", no_load)
    with pytest.raises(SystemExit, match="unknown word.*'purple'.*knows only a, on, background, red"):
        main(
            [
                "demo",
                "--prompt",
                "a purple circle moving right on a blue background",
                "-o",
                str(tmp_path / "d.gif"),
            ]
        )
    with pytest.raises(SystemExit, match="grammar"):
        main(["demo", "--prompt", "a red circle on a blue background", "-o", str(tmp_path / "d.gif")])
    assert list(tmp_path.iterdir()) == []


def test_quality_only_keeps_exact_and_the_named_modes():
    cuda = quality.modes("cuda", smoke=False, only="fa3,fast")
    assert list(cuda) == ["exact", "fa3 attention", "fa3-fp8 attention", "fast (fp8 linears + fa3-fp8)"]
    assert list(quality.modes("cpu", smoke=False, only="teacache 0.2")) == ["exact", "teacache 0.2"]
    assert len(quality.modes("cpu", smoke=False)) > 10  # no filter: every mode


def test_svg_heads_per_type_on_the_trained_model():
    """quality.svg_heads: every video self-attention head of the middle step is scored once per call and
    typed; at budget 1 svg is dense (rounding only), at 0.34 it drops pairs the trained model attends to."""
    from dit_rt.demo import DEMO_GUIDANCE, tiny_model_folder

    folder, prompts = str(tiny_model_folder()), quality.PROMPTS[:1]
    args = ("cpu", "float32", prompts, 0, 4, DEMO_GUIDANCE)
    dense = quality.svg_heads(folder, *args, dict(chunk=16, budget=1.0))
    sparse = quality.svg_heads(folder, *args, dict(chunk=16, budget=0.34))
    cfg = json.loads((Path(folder) / "transformer" / "config.json").read_text())
    calls = 2 * len(prompts)  # the conditional and unconditional passes of the middle step
    for heads in (dense, sparse):
        assert (
            sum(h["heads"] for h in heads.values()) == cfg["num_layers"] * cfg["num_attention_heads"] * calls
        )
    assert all(h["max_rel_err"] < 1e-5 for h in dense.values() if h["heads"])
    assert all(h["mean_rel_err"] > 1e-2 for h in sparse.values() if h["heads"])
