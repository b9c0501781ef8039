"""The whole FLUX.2 pipeline against diffusers' Flux2Pipeline on an identical tiny random checkpoint (31-layer
Mistral3 text stack, Mistral chat template), from the same initial latents or the same seed, with and
without reference images: images must agree to 1e-3."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dit_rt
from dit_rt.pipelines.flux2 import compute_empirical_mu
from dit_rt.runner import stack_runners
from tests.tiny_flux2 import FLUX2_TRANSFORMER, make_flux2

PROMPTS = ["a red cat baking a cake", "the dog on a photo"]
TOKENS = 64  # max_sequence_length of both sides: the chat-formatted prompt fits with room for padding
CHANNELS = FLUX2_TRANSFORMER["in_channels"]


@pytest.fixture(scope="module")
def flux2(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("flux2")
    ref = make_flux2(path)
    pipe = dit_rt.load(str(path), device="cpu", dtype=torch.float32)
    return path, ref, pipe


def _noise(batch, height, width, seed=0):
    """Flux2Pipeline's latent layout: [B, 4 x latent channels, H/16, W/16]."""
    shape = (batch, CHANNELS, height // 16, width // 16)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _image(width, height, seed):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return Image.frombytes("RGB", (width, height), pixels.numpy().tobytes())


def _run_both(ref, pipe, prompts, **kw):
    """(reference images [B, H, W, 3], dit_rt output, transformer calls) for the same request."""
    latents = kw.pop("latents", None)
    images = ref(
        prompt=prompts,
        latents=None if latents is None else latents.clone(),
        output_type="np",
        max_sequence_length=TOKENS,
        generator=torch.Generator().manual_seed(kw["seed"]) if "seed" in kw else None,
        **{k: v for k, v in kw.items() if k != "seed"},
    ).images
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = pipe.generate(
            prompts,
            latents=None if latents is None else latents.clone(),
            max_sequence_length=TOKENS,
            progress_bar=False,
            **kw,
        )
    finally:
        hook.remove()
    return images, out, len(calls)


@pytest.mark.parametrize(
    "prompts,height,width,steps,guidance",
    [
        (PROMPTS[:1], 32, 48, 3, 4.0),  # non-square
        (PROMPTS, 48, 32, 2, 2.5),  # batch of two
    ],
)
def test_text_to_image_matches_diffusers(flux2, prompts, height, width, steps, guidance):
    _, ref, pipe = flux2
    latents = _noise(len(prompts), height, width)
    kw = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=guidance)
    expected, out, calls = _run_both(ref, pipe, prompts, latents=latents, **kw)
    assert out.frames.shape == (len(prompts), 1, height, width, 3)
    assert np.abs(out.frames[:, 0].numpy() - expected).max() <= 1e-3
    # the loop's tokens, as Flux2Pipeline's output_type="latent": [B, (H/16)(W/16), 4 x latent channels]
    assert out.latents.shape == (len(prompts), (height // 16) * (width // 16), CHANNELS)
    assert calls == steps  # embedded guidance: one pass per step


def test_reference_image_matches_diffusers(flux2):
    """One reference image (cropped 72x90 -> 64x80, its own token grid and ids), another output size."""
    _, ref, pipe = flux2
    image = _image(90, 72, seed=1)
    kw = dict(image=image, height=32, width=32, num_inference_steps=2, guidance_scale=4.0)
    expected, out, _ = _run_both(ref, pipe, PROMPTS, latents=_noise(2, 32, 32, seed=2), **kw)
    assert np.abs(out.frames[:, 0].numpy() - expected).max() <= 1e-3
    assert out.metadata["reference_images"] == 1
    # the reference tokens take part: without them the same latents give another image
    kw.pop("image")
    plain = pipe.generate(
        PROMPTS, latents=_noise(2, 32, 32, seed=2), max_sequence_length=TOKENS, progress_bar=False, **kw
    )
    assert (plain.frames - out.frames).abs().max() > 1e-2


def test_two_reference_images_and_seed_match_diffusers(flux2):
    """Two references (t = 10, 20), the output size taken from the first one, noise drawn from the seed."""
    _, ref, pipe = flux2
    images = [_image(64, 80, seed=3), _image(96, 64, seed=4)]
    kw = dict(image=images, num_inference_steps=2, seed=7)
    expected, out, _ = _run_both(ref, pipe, PROMPTS[:1], **kw)
    assert out.frames.shape == (1, 1, 80, 64, 3)
    assert out.seed == 7
    assert np.abs(out.frames[:, 0].numpy() - expected).max() <= 1e-3


def test_latents_output_then_decode(flux2):
    _, ref, pipe = flux2
    latents = _noise(1, 32, 48, seed=5)
    kw = dict(height=32, width=48, num_inference_steps=2)
    full = pipe.generate(PROMPTS[0], latents=latents, max_sequence_length=TOKENS, progress_bar=False, **kw)
    out = pipe.generate(
        PROMPTS[0],
        latents=latents,
        max_sequence_length=TOKENS,
        progress_bar=False,
        output_type="latents",
        **kw,
    )
    assert out.frames.numel() == 0
    assert torch.equal(pipe.decode(out.latents), full.frames)


@pytest.mark.parametrize(
    "height,width,steps", [(1024, 1024, 50), (512, 768, 28), (2048, 2048, 50), (64, 64, 4)]
)
def test_schedule_matches_diffusers(flux2, height, width, steps):
    """Flux2Pipeline's mu (both branches of the empirical fit) and sigmas at real sizes."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu as reference_mu

    from dit_rt.pipeline import Request

    _, ref, pipe = flux2
    seq_len = (height // 16) * (width // 16)
    assert compute_empirical_mu(seq_len, steps) == reference_mu(seq_len, steps)
    shape = pipe.check_inputs(height, width, 1, None)
    request = Request(prompts=["x"], negatives=None, shape=shape, steps=steps, guidance=(1.0,), metadata={})
    scheduler = pipe.make_scheduler(request)
    ref.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=reference_mu(seq_len, steps))
    assert torch.equal(scheduler.timesteps, ref.scheduler.timesteps)
    assert torch.equal(scheduler.sigmas, ref.scheduler.sigmas)


def test_bad_inputs_fail_clearly(flux2):
    path, _, pipe = flux2
    # Before anything loads: the folder's configs and the catalog entry give the 16-pixel grid.
    with pytest.raises(ValueError, match="height=40 must be a positive multiple of 16"):
        dit_rt.checks.check_generation(str(path), height=40)
    with pytest.raises(ValueError, match="multiple of 16"):
        dit_rt.checks.check_generation("flux.2-dev", width=1000)
    dit_rt.checks.check_generation("flux.2-dev", image=_image(64, 64, 0))  # reference images are optional
    kw = dict(height=32, width=32, progress_bar=False)
    with pytest.raises(ValueError, match="multiple of 16"):
        pipe.generate(PROMPTS[0], height=40, width=32, progress_bar=False)
    with pytest.raises(ValueError, match=r"Flux2Pipeline's shape \(1, 32, 2, 2\)"):
        pipe.generate(PROMPTS[0], latents=torch.zeros(1, 4, 32), **kw)
    with pytest.raises(ValueError, match="negative_prompt"):
        pipe.generate(PROMPTS[0], negative_prompt="blurry", **kw)
    with pytest.raises(ValueError, match="at least 64 px"):
        pipe.generate(PROMPTS[0], image=_image(48, 64, 0), **kw)
    with pytest.raises(ValueError, match="aspect ratio"):
        pipe.generate(PROMPTS[0], image=_image(64 * 9, 64, 0), **kw)


FEATURES = dict(height=32, width=32, num_inference_steps=3, seed=5, max_sequence_length=TOKENS)


@pytest.mark.parametrize(
    "options",
    [
        dict(cache=dict(kind="fbcache", threshold=0.0)),
        dict(cache=dict(kind="teacache", threshold=0.0, model="flux.2-dev")),  # NVIDIA's FLUX.2 coefficients
        dict(offload="block"),
        dict(offload="model"),
    ],
)
def test_runtime_options_are_exact(flux2, options):
    path, _, pipe = flux2
    image = _image(64, 64, seed=6)
    baseline = pipe.generate(PROMPTS[0], image=image, progress_bar=False, **FEATURES)
    pipe2 = dit_rt.load(str(path), device="cpu", **options)
    out = pipe2.generate(PROMPTS[0], image=image, progress_bar=False, **FEATURES)
    assert torch.equal(out.frames, baseline.frames)
    if options.get("offload") == "block":  # the text encoder's layer slots freed once the prompt is encoded,
        assert all(slot.flat is None for slot in pipe2.text_offload.slots)  # the transformer's after the loop
        hooks = [h for r in stack_runners(pipe2.transformer) for h in r.block_hooks]
        assert hooks and all(slot.flat is None for h in hooks for slot in h.slots)
        again = pipe2.generate(PROMPTS[0], image=image, progress_bar=False, **FEATURES)
        assert torch.equal(again.frames, baseline.frames)  # slots allocated again
    if "cache" in options:
        assert (out.stats["computed"], out.stats["skipped"]) == (FEATURES["num_inference_steps"], 0)


def test_linear_format_quantizes_transformer_and_text_encoder(flux2):
    """linear= converts every block projection of the transformer and of the text stack at load (emulated
    fp8 on the CPU): the image stays close to the float32 one."""
    from dit_rt.ops import Linear

    path, _, pipe = flux2
    q = dit_rt.load(str(path), device="cpu", linear="fp8-per-tensor")
    for model in (q.transformer, q.text_encoder):
        formats = {m.fmt for m in model.modules() if isinstance(m, Linear)}
        assert formats == {"fp8-per-tensor"}, (type(model).__name__, formats)
    image = _image(64, 64, seed=6)
    out = q.generate(PROMPTS[0], image=image, progress_bar=False, **FEATURES)
    baseline = pipe.generate(PROMPTS[0], image=image, progress_bar=False, **FEATURES)
    assert ((out.frames - baseline.frames).norm() / baseline.frames.norm()).item() < 0.1


# ---------------------------------------------------------------------------------- parallel (gloo, 2 ranks)

PARALLEL_MODES = {"ulysses2": dict(ulysses=2), "ring2": dict(ring=2), "dp2": dict(dp=2)}
PARALLEL_REQUEST = dict(height=48, width=32, num_inference_steps=2, seed=0, max_sequence_length=TOKENS)


def _parallel_worker(rank: int, port: int, folder: str, reference, out_dir: str) -> None:
    import json
    import os
    from pathlib import Path

    import torch.distributed as dist

    from tests.test_parallel_pipeline import _error

    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    errors = {}
    for mode, parallel in PARALLEL_MODES.items():
        pipe = dit_rt.load(folder, device="cpu", dtype=torch.float32, parallel=parallel)
        out = pipe.generate(PROMPTS, image=_image(64, 80, seed=8), progress_bar=False, **PARALLEL_REQUEST)
        errors[mode] = max(_error(out.frames, reference[0]), _error(out.latents, reference[1]))
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(errors))
    dist.destroy_process_group()


def test_parallel_matches_one_process(flux2, tmp_path):
    """Ulysses / Ring (the joint [txt; noisy image; reference] sequence) and dp over 2 gloo processes give
    the one-process image and latents."""
    import json

    import torch.multiprocessing as mp

    from tests.test_parallel_pipeline import _free_port

    path, _, pipe = flux2
    ref = pipe.generate(PROMPTS, image=_image(64, 80, seed=8), progress_bar=False, **PARALLEL_REQUEST)
    mp.start_processes(
        _parallel_worker,
        args=(_free_port(), str(path), (ref.frames, ref.latents), str(tmp_path)),
        nprocs=2,
        start_method="fork",
    )
    for rank in range(2):
        errors = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert all(e <= 1e-5 for e in errors.values()), f"rank {rank}: {errors}"


def test_memory_check_counts_only_what_is_loaded(flux2):
    """The text encoder's file holds 31 layers, the vision tower and the projector; dit_rt builds layers 0-29
    only, and the memory check counts exactly the tensors the loader reads."""
    from dit_rt import memory
    from dit_rt.loaders.safetensors_io import find_weight_files, scan

    path, _, pipe = flux2
    read = sum(t.numel() * 4 for t in pipe.text_encoder.state_dict().values())
    stored = sum(math.prod(i.shape) * 4 for i in scan(*find_weight_files(path / "text_encoder")).values())
    _, sizes = memory.weights_on_gpu(path, ["text_encoder"], torch.float32)
    assert sizes["text_encoder"] == read < stored


def test_offload_resident_budget_spans_both_block_stacks(flux2):
    """resident_gib keeps the leading blocks in run order, double then single: a budget of every double block
    and one single block keeps exactly those; the image is unchanged."""
    from dit_rt.offload import BlockOffload
    from dit_rt.runner import stack_runners

    path, _, pipe = flux2
    double, single = pipe.transformer.transformer_blocks, pipe.transformer.single_transformer_blocks

    def nbytes(block):
        return sum(t.numel() * t.element_size() for t in [*block.parameters(), *block.buffers()])

    kept = sum(nbytes(b) for b in double) + nbytes(single[0])
    opts = dict(offload=dict(name="block", resident_gib=(kept + 1) / 2**30))
    q = dit_rt.load(str(path), device="cpu", **opts)
    hooks = {h for r in stack_runners(q.transformer) for h in r.block_hooks if isinstance(h, BlockOffload)}
    assert len(hooks) == 1 and next(iter(hooks)).resident == len(double) + 1
    image = _image(64, 64, seed=6)
    out = q.generate(PROMPTS[0], image=image, progress_bar=False, **FEATURES)
    assert torch.equal(
        out.frames, pipe.generate(PROMPTS[0], image=image, progress_bar=False, **FEATURES).frames
    )


def test_bf16_rounds_no_more_than_diffusers(flux2):
    """Both pipelines in bf16 against diffusers' float32 run, same latents: dit_rt's images are no further
    from float32 than diffusers' bf16 ones (0.99x here; 5% of slack for CPUs whose bf16
    kernels round differently). Catches a place where dit_rt rounds and the reference does not."""
    import diffusers

    path, ref32, _ = flux2
    ref16 = diffusers.Flux2Pipeline.from_pretrained(path, torch_dtype=torch.bfloat16)
    pipe = dit_rt.load(str(path), device="cpu", dtype=torch.bfloat16)
    kw = dict(height=64, width=64, num_inference_steps=4, guidance_scale=4.0, max_sequence_length=TOKENS)
    errors = []
    for i, prompt in enumerate(PROMPTS):
        latents = _noise(1, 64, 64, seed=i)
        want = ref32(prompt=[prompt], latents=latents.clone(), output_type="np", **kw).images[0]
        theirs = ref16(prompt=[prompt], latents=latents.bfloat16(), output_type="np", **kw).images[0]
        ours = pipe.generate(prompt, latents=latents.clone(), progress_bar=False, **kw).frames[0, 0].numpy()
        errors.append([np.linalg.norm(x - want) / np.linalg.norm(want) for x in (theirs, ours)])
    theirs, ours = np.mean(errors, axis=0)
    assert 0 < theirs < 0.1 and ours <= 1.05 * theirs, (ours, theirs)
