"""NVIDIA Cosmos-Predict2 (Text2Image, Video2World) and Cosmos-Predict2.5 (Text2World, Image2World,
Video2World in one model): one Cosmos DiT, the Wan 2.1 VAE with Cosmos' latent normalisation, and
Cosmos' guidance x_c + g (x_c - x_u).

Predict2 (T5-11B prompts) denoises on Karras EDM sigmas 80 -> 0.002 (dit_rt.schedulers.cosmos): the DiT sees
x c_in at the flow time t = sigma / (sigma + 1), its output becomes x0 = c_skip x + c_out F, guidance acts on
x0 and the scheduler Euler-steps in EDM space. Video2World keeps its conditioning latent frames (a VAE
posterior sample of the image or clip, padded with its last frame) fixed: they go in as they are with their
own small timestep and replace x0 on those frames after every pass.
Predict2.5 (Qwen2.5-VL prompt stack) runs UniPC on Karras flow sigmas; the DiT predicts a velocity at the
flow sigma itself; conditioning frames (the VAE posterior mean) go in as they are and their velocity is the
fixed one that leads from the initial noise to them.

Step for step the same computation as diffusers' `Cosmos2TextToImagePipeline`,
`Cosmos2VideoToWorldPipeline` and `Cosmos2_5_PredictBasePipeline`, so both give the same frames from the same
`latents`, with one saving: only the conditioning frames are VAE-encoded. The Wan VAE is causal in time, so
their latents equal those of the whole padded clip the references encode, and every other latent frame of
that encoding is masked out of the computation.

Guardrail: NVIDIA's Cosmos safety checker (the `cosmos_guardrail` package, a separate set of models) is not
part of dit_rt and never runs; a `safety_checker` component in model_index.json is never loaded. The loop
itself (batching, dp, CFG and CFG parallel, step caches, output) is dit_rt.pipeline's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dit_rt import checks, memory
from dit_rt.catalog import COSMOS_NEGATIVE, Defaults, Entry
from dit_rt.pipeline import (
    Conditioning,
    GenerationOutput,
    Pipeline,
    Request,
    StepCallback,
    make_generator,
    matched,
    register_pipeline,
    shared_seed,
)
from dit_rt.runtime import RuntimeOptions

VAE_SCALE_TEMPORAL = 4
T2I, V2W, PREDICT25 = (
    "Cosmos2TextToImagePipeline",
    "Cosmos2VideoToWorldPipeline",
    "Cosmos2_5_PredictBasePipeline",
)


def constraints(folder: Path, index: dict) -> checks.Constraints:
    """What a Cosmos-Predict2 / 2.5 checkpoint accepts, from its configs alone: sizes on the VAE x patch grid;
    Text2Image makes single images; the video models take 4k+1 frames and an image or clip (required for
    Predict2 Video2World, optional for Predict2.5)."""
    from dit_rt import loaders
    from dit_rt.models.wan import WanVAEConfig

    vae = WanVAEConfig.from_config(loaders.read_config(folder / "vae"))
    patch = loaders.read_config(folder / "transformer").get("patch_size", (1, 2, 2))
    spatial = vae.scale_factor_spatial * patch[1]
    name = index.get("_class_name")
    if name == T2I:
        return checks.Constraints(spatial=spatial, single_frame=True, image="none")
    image = "required" if name == V2W else "optional"
    return checks.Constraints(spatial=spatial, temporal=vae.scale_factor_temporal, image=image)


def _is_clip(image) -> bool:
    """A clip is a list or tuple of frames; anything else is one picture."""
    return isinstance(image, (list, tuple))


def _frame_bilinear(frame, height: int, width: int) -> torch.Tensor:
    """One frame as diffusers' VideoProcessor(resample="bilinear") makes it (Predict2.5 clips): PIL images and
    files by PIL bilinear resize, tensors and arrays by nearest `F.interpolate` -> [3, H, W] in [-1, 1]."""
    from dit_rt.image import load_image

    if isinstance(frame, (str, os.PathLike)) or type(frame).__module__.startswith("PIL."):
        import PIL.Image

        img = PIL.Image.open(frame) if isinstance(frame, (str, os.PathLike)) else frame
        img = img.convert("RGB").resize((width, height), resample=PIL.Image.Resampling.BILINEAR)
        return 2.0 * load_image(img) - 1.0
    x = F.interpolate(load_image(frame)[None], size=(height, width))[0]
    return 2.0 * x - 1.0


class Shared(NamedTuple):
    """What both guidance branches share in `predict`: the conditioning latent frames (VAE latents on them,
    zeros elsewhere: float32 [1 or B, C, T, h, w]), the indicator [B, 1, T, 1, 1] (1 on conditioning
    frames), the DiT's condition mask [B, 1, T, h, w] (model dtype), and Predict2.5's velocity on the
    conditioning frames (float32, from the initial noise). Text2Image has none (its `shared` is None)."""

    latents: torch.Tensor
    indicator: torch.Tensor
    mask: torch.Tensor
    velocity: torch.Tensor | None = None  # Predict2.5
    fps: float | None = None  # Predict2 Video2World: scales RoPE's time positions
    cond_timestep: torch.Tensor | float | None = None  # the conditioning frames' DiT timestep


class CosmosPipeline(Pipeline):
    """What the three Cosmos pipelines share: loading, prompts, the request, decode. Subclasses provide
    `prepare_latents`, `predict`, the scheduler and their extra `generate` options (`options`)."""

    auto_margin = memory.VIDEO_AUTO_MARGIN  # offload resident_gib='auto': a video's VAE decode

    guidance = "from_cond"
    metadata_notes = {"guardrail": "none"}
    folder_constraints = staticmethod(constraints)
    fallback_defaults: Defaults  # diffusers' call defaults, for folders outside the catalog
    options_defaults: dict = {}  # family-specific generate() options and their defaults

    def __init__(self, folder: Path, index: dict, options: RuntimeOptions, entry: Entry | None = None):
        from dit_rt import loaders
        from dit_rt.components import component_class

        build = self.start(folder, index, options, entry)
        self.class_name = index.get("_class_name")
        self.qwen = component_class(index, "text_encoder") == "Qwen2_5_VLForConditionalGeneration"
        if self.qwen:
            from dit_rt.models.text.qwen import QwenPromptTokenizer

            self.tokenizer = QwenPromptTokenizer.from_folder(folder / "tokenizer")
        else:
            from dit_rt.models.text import T5Tokenizer

            self.tokenizer = T5Tokenizer.from_folder(folder / "tokenizer")
        blocks = "model.layers" if self.qwen else "encoder.block"
        self.text_encoder = self.build_text_encoder(build, "text_encoder", blocks)
        self.build_vae(build)
        self.build_transformer(build)
        self.offload_components(self.text_encoder, self.vae)
        self.scheduler = self.make_schedule(loaders.read_config(folder / "scheduler"))
        self.defaults = entry.defaults if entry else self.fallback_defaults
        self.constraints = constraints(folder, index)

    # ---------------------------------------------------------------------------------------------- prompts

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 512) -> torch.Tensor:
        """Predict2: T5 states [B, L, 1024] with the rows past each prompt's tokens zeroed. Predict2.5: the
        Qwen2.5-VL hidden-state stack [B, L, 28 * 3584] of the chat-templated prompt, run without a mask."""
        if not self.qwen:  # Wan's recipe without its prompt cleaning
            return self.t5_embeddings(prompts, max_sequence_length, clean=False)
        ids, _ = self.tokenizer.encode(prompts, max_length=max_sequence_length)
        with self.offload.use(self.text_encoder):
            states = self.text_encoder(ids.to(next(self.text_encoder.parameters()).device))
        return states.to(self.device, self.dtype)

    # ---------------------------------------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(
        self,
        prompt=None,
        negative_prompt=None,
        *,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_scale_2: float | None = None,
        flow_shift: float | None = None,
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        image=None,
        max_sequence_length: int = 512,
        progress_bar: bool = True,
        callback: StepCallback | None = None,
        output_type: str = "frames",
        **options,
    ) -> GenerationOutput:
        """image: a picture, or a clip (a list of frames) for Video2World. latents: the reference's initial
        noise [B, 16, T, H/8, W/8] (unit variance; Predict2 scales it by sigma_max as the reference does).
        `options`: the pipeline's own (`options_defaults`): fps and sigma_conditioning (Predict2
        Video2World); conditional_frame_timestep and num_latent_conditional_frames (Predict2.5).
        guidance_scale_2 and flow_shift do not apply (one transformer; a fixed Karras schedule)."""
        d = self.defaults
        name = self.model_name(f"this {self.class_name} checkpoint")
        checks.check_image_use(self.constraints, image is not None, name)
        checks.check_not_applicable(
            name,
            ("guidance_scale_2", guidance_scale_2, "Cosmos has one transformer"),
            ("flow_shift", flow_shift, "Cosmos samples a fixed Karras schedule"),
        )
        unknown = set(options) - set(self.options_defaults)
        if unknown:
            known = ", ".join(self.options_defaults) or "none"
            raise TypeError(f"{name}: unknown generate() option(s) {sorted(unknown)}; its own: {known}")
        extra = {**self.options_defaults, **{k: v for k, v in options.items() if v is not None}}
        prompts = self.prompt_list(prompt)
        negative = d.negative_prompt if negative_prompt is None else negative_prompt
        negatives = matched(negative, prompts, "negative_prompt", "negative prompts")
        height, width, num_frames, steps, g = self.resolve(
            height, width, num_frames, num_inference_steps, guidance_scale
        )
        checks.check_max_sequence_length(max_sequence_length)
        checks.check_output_type(output_type)
        shape = self.check_inputs(height, width, num_frames, len(prompts), latents)
        frames = self.check_conditioning(image, num_frames, extra)
        request = Request(
            prompts=prompts,
            negatives=negatives,
            shape=shape,
            steps=steps,
            guidance=(g,),
            metadata=self.metadata(
                prompts,
                negative_prompt=negative_prompt,  # the default negative prompt is long and implied
                image=str(image) if isinstance(image, (str, Path)) else None,
                height=height,
                width=width,
                num_frames=num_frames,
                num_inference_steps=steps,
                guidance_scale=g,
            ),
            latents=latents,
            seed=seed,
            encode=dict(max_sequence_length=max_sequence_length),
            extra=dict(frames=frames, clip=_is_clip(image), height=height, width=width, num_frames=num_frames)
            | extra,
            fps=extra.get("fps", d.fps),
            output_type=output_type,
            progress_bar=progress_bar,
            callback=callback,
        )
        return self.denoise(request)

    def check_inputs(self, height, width, num_frames, batch, latents) -> tuple[int, ...]:
        """Sizes and frames by the checkpoint's rules -> the initial noise shape of the whole batch."""
        c = self.constraints
        checks.check_multiple("height", height, c.spatial)
        checks.check_multiple("width", width, c.spatial)
        checks.check_frames(num_frames, c.temporal, c.single_frame, self.defaults.num_frames)
        s = self.vae.config.scale_factor_spatial
        shape = (
            batch,
            self.vae.config.z_dim,
            (num_frames - 1) // VAE_SCALE_TEMPORAL + 1,
            height // s,
            width // s,
        )
        checks.check_latents(latents, shape)
        return shape

    def check_conditioning(self, image, num_frames: int, extra: dict) -> list | None:
        """The pipeline's own options (`extra`) and the conditioning input, checked before any work -> the
        input as a list of frames (each loaded once here to validate it), or None without one."""
        from dit_rt.image import load_image

        if image is None:
            return None
        frames = list(image) if _is_clip(image) else [image]
        if not frames:
            raise ValueError("image= is an empty clip; pass a picture or a list of frames")
        for frame in frames:
            load_image(frame)
        return frames

    # -------------------------------------------------------------------------------------------- loop hooks

    def make_scheduler(self, r: Request):
        self.scheduler.set_timesteps(r.steps, device=self.device)
        return self.scheduler

    @torch.no_grad()
    def encode_frames(self, video: torch.Tensor):
        """Pixel frames [1, 3, F, H, W] in [-1, 1] -> the VAE posterior over [1, Z, (F-1)/4+1, h, w]."""
        with self.offload.use(self.vae):
            return self.vae.encode(video.to(self.device, self.vae_dtype))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, Z, T, h, w] -> float32 frames [B, T', H, W, 3] in [0, 1] on the device.
        Under parallel=, the ranks of a dp group decode together (dit_rt.parallel.vae)."""
        return self.vae_frames(self.vae.denormalize_latents(latents.to(self.vae_dtype)))  # sigma_data is 1


# ------------------------------------------------------------------------------------------------ Predict2


class _Predict2(CosmosPipeline):
    """Cosmos-Predict2: EDM preconditioning around the DiT, x0 guidance, Euler on Karras EDM sigmas."""

    def make_schedule(self, config: dict):
        from dit_rt.schedulers.cosmos import Predict2EulerScheduler

        return Predict2EulerScheduler.from_config(config)

    def preconditioning(self, t: torch.Tensor):
        """(sigma, flow time t, c_in, c_skip, c_out) of a step: float32 scalars, as the reference pipeline."""
        sigma = self.scheduler.sigma_at(self.schedule_index(t))
        flow_t = sigma / (sigma + 1)
        return sigma, flow_t, 1 - flow_t, 1 - flow_t, -flow_t


@register_pipeline(T2I)
class Cosmos2TextToImagePipeline(_Predict2):
    """Cosmos-Predict2 Text2Image (2B / 14B): one 768x1360 image per prompt."""

    fallback_defaults = Defaults(768, 1360, 1, 1, 35, 7.0, negative_prompt=COSMOS_NEGATIVE)

    def prepare_latents(self, latents: torch.Tensor, r: Request):
        return latents * self.scheduler.sigma_max, None

    def predict(self, model, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x0 in the model dtype (the reference casts it before guidance)."""
        _, flow_t, c_in, c_skip, c_out = self.preconditioning(t)
        timestep = self.on_device(flow_t, self.dtype).expand(x.shape[0])  # [B]
        out = model((x * c_in).to(self.dtype), timestep, cond.prompt)
        return (c_skip * x + c_out * out.float()).to(self.dtype)


@register_pipeline(V2W)
class Cosmos2VideoToWorldPipeline(_Predict2):
    """Cosmos-Predict2 Video2World (2B / 14B): a 704x1280x93 clip continuing an image or a clip."""

    fallback_defaults = Defaults(704, 1280, 93, 16, 35, 7.0, negative_prompt=COSMOS_NEGATIVE)
    options_defaults = {"fps": 16, "sigma_conditioning": 1e-4}

    def check_conditioning(self, image, num_frames, extra) -> list | None:
        checks.check_positive("fps", extra["fps"], self.defaults.fps)
        checks.check_positive("sigma_conditioning", extra["sigma_conditioning"], 1e-4)
        return super().check_conditioning(image, num_frames, extra)

    def prepare_latents(self, latents: torch.Tensor, r: Request):
        """The noise scaled to sigma_max, and the conditioning: the image or clip (Lanczos for PIL input, as
        the reference), cut to its last num_frames frames or padded with its last frame; its first
        k = (F-1)//4+1 latent frames (all when the clip is as long as the output) are a VAE posterior sample,
        normalised. The sample's noise is the reference's first draw from a generator on the device seeded
        with the request's seed (drawn for the whole padded clip, of which the first k frames are used)."""
        from dit_rt.image import resize_for_video

        x = r.extra
        B, _, T = latents.shape[:3]
        frames = [resize_for_video(f, x["height"], x["width"])[0] for f in x["frames"]]
        video = torch.stack(frames, dim=1)[None]  # [1, 3, F, H, W] in [-1, 1]
        n = video.shape[2]
        k = T if n >= x["num_frames"] else (n - 1) // VAE_SCALE_TEMPORAL + 1
        video = video[:, :, -x["num_frames"] :]
        if n < x["num_frames"]:
            video = torch.cat([video, video[:, :, -1:].expand(-1, -1, x["num_frames"] - n, -1, -1)], dim=2)
        posterior = self.encode_frames(video[:, :, : VAE_SCALE_TEMPORAL * (k - 1) + 1])
        seed = shared_seed(r.metadata.get("seed", r.seed), self.device)  # the same noise on every rank
        shape = (1, posterior.mean.shape[1], T, *posterior.mean.shape[3:])
        g = make_generator(seed, self.device)
        eps = torch.randn(shape, generator=g, device=self.device, dtype=self.vae_dtype)[:, :, :k]
        z = (posterior.mean + posterior.std * eps).float()
        mean, std = latent_stats(self.vae, z)
        cond = z.new_zeros(shape)
        cond[:, :, :k] = (z - mean) / std * self.scheduler.sigma_data
        indicator = z.new_zeros(1, 1, T, 1, 1)
        indicator[:, :, :k] = 1.0
        mask = indicator.expand(B, 1, T, *latents.shape[3:]).to(self.dtype)
        sc = torch.tensor(x["sigma_conditioning"], dtype=torch.float32)
        shared = Shared(cond, indicator, mask, fps=x["fps"], cond_timestep=(sc / (sc + 1)).to(self.device))
        return latents * self.scheduler.sigma_max, shared

    def predict(self, model, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x0 (float32): the DiT's on the generated frames, the conditioning latents on the others, which
        enter at their own noise level (sigma_conditioning)."""
        s: Shared = cond.shared
        _, flow_t, c_in, c_skip, c_out = self.preconditioning(t)
        B, _, T = x.shape[:3]
        timestep = self.on_device(flow_t).view(1, 1, 1, 1, 1).expand(B, -1, T, -1, -1)  # [B, 1, T, 1, 1]
        ind = s.indicator
        x_in = (ind * s.latents + (1 - ind) * (x * c_in)).to(self.dtype)
        timestep = (ind * s.cond_timestep + (1 - ind) * timestep).to(self.dtype)
        out = model(x_in, timestep, cond.prompt, fps=s.fps, condition_mask=s.mask)
        x0 = (c_skip * x + c_out * out.float()).to(self.dtype)
        return ind * s.latents + (1 - ind) * x0


# ---------------------------------------------------------------------------------------------- Predict2.5


@register_pipeline(PREDICT25)
class Cosmos2_5_PredictBasePipeline(CosmosPipeline):
    """Cosmos-Predict2.5 (2B): Text2World without image=, Image2World with a picture, Video2World with a
    clip (its last 4(k-1)+1 frames condition k = num_latent_conditional_frames latent frames)."""

    fallback_defaults = Defaults(704, 1280, 93, 16, 36, 7.0, negative_prompt=COSMOS_NEGATIVE)
    options_defaults = {"conditional_frame_timestep": 1e-4, "num_latent_conditional_frames": 2}

    def make_schedule(self, config: dict):
        from dit_rt.schedulers.cosmos import KarrasFlowUniPCScheduler

        return KarrasFlowUniPCScheduler.from_config(config)

    def check_conditioning(self, image, num_frames, extra) -> list | None:
        t = extra["conditional_frame_timestep"]
        if not isinstance(t, (int, float)) or isinstance(t, bool):
            raise ValueError(f"conditional_frame_timestep must be a number (< 0: none of its own), got {t!r}")
        k = extra["num_latent_conditional_frames"]
        if _is_clip(image):
            if k not in (1, 2):
                raise ValueError(f"num_latent_conditional_frames must be 1 or 2, got {k!r}")
            need = VAE_SCALE_TEMPORAL * (k - 1) + 1
            if len(image) < need:
                raise ValueError(
                    f"a clip conditions {k} latent frames from its last {need} frames, but it has "
                    f"{len(image)}; pass a longer clip or num_latent_conditional_frames=1"
                )
            if num_frames < need:
                raise ValueError(f"num_frames={num_frames} is shorter than the {need} conditioning frames")
        return super().check_conditioning(image, num_frames, extra)

    def prepare_latents(self, latents: torch.Tensor, r: Request):
        """The noise as it is (flow sigma ~1), and the conditioning: none for Text2World; the picture as frame
        0 (nearest resize of its [0, 1] pixels, as the reference) -> 1 latent frame; a clip's last 4(k-1)+1
        frames (PIL bilinear) -> k latent frames; the VAE posterior mean, normalised. The conditioning frames'
        velocity is fixed from the initial noise: (x_init - z_cond) on them."""
        from dit_rt.image import load_image

        x = r.extra
        B, _, T = latents.shape[:3]
        cond = torch.zeros_like(latents[:1])
        k = 0
        if x["frames"] is not None:
            H, W = x["height"], x["width"]
            if not x["clip"]:
                video = 2.0 * F.interpolate(load_image(x["frames"][0])[None], size=(H, W)) - 1.0
                video, k = video[:, :, None], 1  # [1, 3, 1, H, W]
            else:
                k = x["num_latent_conditional_frames"]
                frames = x["frames"][-(VAE_SCALE_TEMPORAL * (k - 1) + 1) :]
                video = torch.stack([_frame_bilinear(f, H, W) for f in frames], dim=1)[None]
            z = self.encode_frames(video).mean.float()
            cond[:, :, :k] = self.vae.normalize_latents(z)
        indicator = latents.new_zeros(B, 1, T, 1, 1)
        indicator[:, :, :k] = 1.0
        mask = indicator.expand(-1, -1, -1, *latents.shape[3:]).to(self.dtype)
        velocity = (latents - cond) * mask
        t_cond = x["conditional_frame_timestep"]
        # Text2World (no conditioning frame): every frame at the step's sigma, so one [B] timestep, not T
        # equal ones (the DiT then modulates per item: the same numbers without the per-frame rows)
        t_cond = t_cond if t_cond >= 0 and k > 0 else None
        shared = Shared(cond, indicator, mask, velocity, cond_timestep=t_cond)
        return latents, shared

    def predict(self, model, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The flow velocity (float32): the DiT's on the generated frames, the fixed one on the others."""
        s: Shared = cond.shared
        B = x.shape[0]
        sigma = self.on_device(self.scheduler.sigma_at(self.schedule_index(t))).expand(B)
        if s.cond_timestep is None:  # no conditioning frame, or conditional_frame_timestep < 0
            timestep = sigma  # [B]
        else:  # [B, 1, T, 1, 1] float32
            timestep = s.indicator * s.cond_timestep + (1 - s.indicator) * sigma.view(B, 1, 1, 1, 1)
        x_in = (s.mask * s.latents + (1 - s.mask) * x).to(self.dtype)
        out = model(x_in, timestep, cond.prompt, condition_mask=s.mask)
        return s.velocity + out * (1 - s.mask)


def latent_stats(vae, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE config's per-channel latent mean and std, [1, Z, 1, 1, 1] in z's dtype and device."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
    return mean, std
