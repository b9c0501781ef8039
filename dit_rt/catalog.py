"""The model catalog: short aliases -> Hub repo, family, task and the authors' published generation defaults.

Defaults follow each model's authors (original repo configs and model cards) where they publish one, and
the diffusers pipeline's `__call__` defaults otherwise; `flow_shift` overrides the scheduler config's value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dit_rt.checks import Constraints

# Wan's own default negative prompt (Wan2.1 / Wan2.2 `sample_neg_prompt`).
WAN_NEGATIVE = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
COSMOS_NEGATIVE = (
    "The video captures a series of frames showing ugly scenes, static with no motion, motion blur, "
    "over-saturation, shaky footage, low resolution, grainy texture, pixelated images, poorly lit areas, "
    "underexposed and overexposed scenes, poor color balance, washed out colors, choppy sequences, jerky "
    "movements, low frame rate, artifacting, color banding, unnatural transitions, outdated special effects, "
    "fake elements, unconvincing visuals, poorly edited content, jump cuts, visual noise, and flickering. "
    "Overall, the video is of poor quality."
)


# What each model's generation arguments must satisfy (dit_rt.checks), known before anything is downloaded:
# height / width multiples of the VAE's downsampling x the transformer's patch, the frame rule of the VAE's
# time compression, and whether a conditioning image is taken (from the model specs: wan-cosmos.md B, C.1,
# C.4-C.6; flux-encoders-schedulers.md).
WAN_T2V = Constraints(spatial=16, temporal=4, image="none")  # VAE 8 x patch 2; frames 4k+1
WAN_I2V = Constraints(spatial=16, temporal=4, image="required")
FLUX1 = Constraints(spatial=16, single_frame=True, image="none")  # VAE 8 x 2x2 packing
FLUX2 = Constraints(spatial=16, single_frame=True, image="optional")  # optional reference images
COSMOS1 = Constraints(spatial=16, temporal=8, image="none")  # CV8x8x8 tokenizer x patch (1, 2, 2): 8k+1
COSMOS2_T2I = Constraints(spatial=16, single_frame=True, image="none")  # Wan 2.1 VAE x patch (1, 2, 2)
COSMOS2_V2W = Constraints(spatial=16, temporal=4, image="required")  # conditioned on an image or a video
COSMOS25 = Constraints(spatial=16, temporal=4, image="optional")  # text-, image- or video-to-world


@dataclass(frozen=True)
class Defaults:
    height: int
    width: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    guidance_scale_2: float | None = None  # Wan 2.2 A14B: the low-noise expert's guidance
    flow_shift: float | None = None
    negative_prompt: str = ""


@dataclass(frozen=True)
class Entry:
    alias: str
    repo: str
    family: str  # "wan" | "flux" | "flux2" | "cosmos"
    task: str  # "t2v" | "i2v" | "t2i" | "v2w" (video-to-world) | "t2w" (text-to-world)
    defaults: Defaults
    revision: str | None = None
    notes: str = ""
    implemented: bool = field(default=False, compare=False)
    constraints: Constraints = Constraints()


def _wan(alias, repo, task, h, w, steps, g, shift, g2=None):
    d = Defaults(h, w, 81, 16, steps, g, g2, shift, WAN_NEGATIVE)
    constraints = WAN_I2V if task == "i2v" else WAN_T2V
    return Entry(alias, repo, "wan", task, d, implemented=True, constraints=constraints)


CATALOG: dict[str, Entry] = {
    e.alias: e
    for e in [
        _wan("wan2.1-t2v-1.3b", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "t2v", 480, 832, 50, 5.0, 3.0),
        _wan("wan2.1-t2v-14b", "Wan-AI/Wan2.1-T2V-14B-Diffusers", "t2v", 720, 1280, 50, 5.0, 5.0),
        _wan("wan2.1-i2v-14b-480p", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "i2v", 480, 832, 40, 5.0, 3.0),
        _wan("wan2.1-i2v-14b-720p", "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers", "i2v", 720, 1280, 40, 5.0, 5.0),
        # Wan 2.2 A14B: guidance_scale drives the high-noise expert, guidance_scale_2 the low-noise one.
        _wan("wan2.2-t2v-a14b", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "t2v", 720, 1280, 40, 4.0, 12.0, g2=3.0),
        _wan("wan2.2-i2v-a14b", "Wan-AI/Wan2.2-I2V-A14B-Diffusers", "i2v", 720, 1280, 40, 3.5, 5.0, g2=3.5),
        Entry(
            "flux.1-dev",
            "black-forest-labs/FLUX.1-dev",
            "flux",
            "t2i",
            Defaults(1024, 1024, 1, 1, 28, 3.5),
            implemented=True,
            constraints=FLUX1,
        ),
        Entry(
            "flux.2-dev",
            "black-forest-labs/FLUX.2-dev",
            "flux2",
            "t2i",
            Defaults(1024, 1024, 1, 1, 50, 4.0),
            implemented=True,
            constraints=FLUX2,
        ),
        Entry(
            "cosmos-predict2.5-2b",
            "nvidia/Cosmos-Predict2.5-2B",
            "cosmos",
            "v2w",
            Defaults(704, 1280, 93, 16, 36, 7.0, negative_prompt=COSMOS_NEGATIVE),
            revision="diffusers/base/post-trained",
            implemented=True,
            constraints=COSMOS25,
        ),
        Entry(
            "cosmos-predict2-2b-video2world",
            "nvidia/Cosmos-Predict2-2B-Video2World",
            "cosmos",
            "v2w",
            Defaults(704, 1280, 93, 16, 35, 7.0, negative_prompt=COSMOS_NEGATIVE),
            implemented=True,
            constraints=COSMOS2_V2W,
        ),
        Entry(
            "cosmos-predict2-14b-video2world",
            "nvidia/Cosmos-Predict2-14B-Video2World",
            "cosmos",
            "v2w",
            Defaults(704, 1280, 93, 16, 35, 7.0, negative_prompt=COSMOS_NEGATIVE),
            implemented=True,
            constraints=COSMOS2_V2W,
        ),
        Entry(
            "cosmos-predict2-2b-text2image",
            "nvidia/Cosmos-Predict2-2B-Text2Image",
            "cosmos",
            "t2i",
            Defaults(768, 1360, 1, 1, 35, 7.0, negative_prompt=COSMOS_NEGATIVE),
            implemented=True,
            constraints=COSMOS2_T2I,
        ),
        Entry(
            "cosmos-predict2-14b-text2image",
            "nvidia/Cosmos-Predict2-14B-Text2Image",
            "cosmos",
            "t2i",
            Defaults(768, 1360, 1, 1, 35, 7.0, negative_prompt=COSMOS_NEGATIVE),
            implemented=True,
            constraints=COSMOS2_T2I,
        ),
        Entry(
            "cosmos-1.0-diffusion-7b-text2world",
            "nvidia/Cosmos-1.0-Diffusion-7B-Text2World",
            "cosmos",
            "t2w",
            Defaults(704, 1280, 121, 30, 36, 7.0, negative_prompt=COSMOS_NEGATIVE),
            implemented=True,
            constraints=COSMOS1,
        ),
    ]
}
_BY_REPO = {e.repo.lower(): e for e in CATALOG.values()}


def lookup(ref: str) -> Entry | None:
    """The catalog entry for an alias or a catalogued Hub repo id (case-insensitive), else None."""
    return CATALOG.get(ref.lower()) or _BY_REPO.get(ref.lower())


def list_models() -> list[Entry]:
    """Every catalog entry, in catalog order."""
    return list(CATALOG.values())
