"""Wan 2.1 / 2.2 text-to-video and image-to-video: UMT5 prompt embeddings, the UniPC flow loop with
classifier-free guidance (two experts split at `boundary_ratio` for Wan 2.2 A14B), and the Wan VAE decode.
Image-to-video adds the VAE-encoded first frame + mask channels (36-channel input) and, for Wan 2.1 I2V,
the CLIP ViT-H/14 image tokens.

Step for step the same computation as diffusers' `WanPipeline` / `WanImageToVideoPipeline`, so both give the
same frames from the same `latents`. The loop itself (batching, dp, CFG and CFG parallel, step caches, expert
switching, output) is dit_rt.pipeline's; this file holds what is Wan's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dit_rt import checks, memory
from dit_rt.catalog import Defaults, Entry
from dit_rt.pipeline import (
    Conditioning,
    GenerationOutput,
    Pipeline,
    Request,
    StepCallback,
    matched,
    register_pipeline,
)
from dit_rt.runtime import RuntimeOptions

log = logging.getLogger("dit_rt")

VAE_SCALE_SPATIAL, VAE_SCALE_TEMPORAL, PATCH = 8, 4, 2


def _fits_beside(model: torch.nn.Module, device: torch.device, headroom: float = 0.35) -> bool:
    """Whether a second copy of `model` fits in the device's free memory, keeping `headroom` of the card
    free for activations (a 14B forward at 720p needs about a third of an 80 GB card)."""
    if device.type != "cuda":
        return True
    free, total = torch.cuda.mem_get_info(device)
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return size + headroom * total <= free


def constraints(folder: Path, index: dict) -> checks.Constraints:
    """What a Wan checkpoint accepts, from its configs alone (dit_rt.checks asks before any weight is read):
    sizes on the VAE x patch grid, frames 4k+1 (the VAE's time compression), an image for image-to-video."""
    from dit_rt import loaders
    from dit_rt.models.wan import WanTransformerConfig, WanVAEConfig

    vae = WanVAEConfig.from_config(loaders.read_config(folder / "vae"))
    patch = WanTransformerConfig.from_config(loaders.read_config(folder / "transformer")).patch_size
    i2v = index.get("_class_name") == "WanImageToVideoPipeline"
    return checks.Constraints(
        spatial=vae.scale_factor_spatial * patch[1],
        temporal=vae.scale_factor_temporal * patch[0],
        image="required" if i2v else "none",
    )


@register_pipeline("WanPipeline", "WanImageToVideoPipeline")
class WanPipeline(Pipeline):
    """Text-to-video and image-to-video for every Wan 2.1 / 2.2 checkpoint in the Hub Diffusers layout."""

    auto_margin = memory.WAN_AUTO_MARGIN  # offload resident_gib='auto': a video's float32 VAE decode
    # The VAE in float32 whatever the model dtype, as Wan's own code and diffusers' Wan model cards run it: in
    # bf16 it was the one place dit_rt rounded where the reference does not (bench_e2e --cpu-bf16: frames
    # 17% further from float32 than diffusers'); vae_dtype="bfloat16" trades that for speed and memory.
    vae_default_dtype = torch.float32

    folder_constraints = staticmethod(constraints)

    def __init__(self, folder: Path, index: dict, options: RuntimeOptions, entry: Entry | None = None):
        from dit_rt import loaders
        from dit_rt.models.text import T5Tokenizer
        from dit_rt.schedulers import UniPCFlowScheduler

        self.i2v = index.get("_class_name") == "WanImageToVideoPipeline"
        build = self.start(folder, index, options, entry)
        device, dtype, fsdp, sharded = self.device, self.dtype, self.fsdp, self.sharded

        self.tokenizer = T5Tokenizer.from_folder(folder / "tokenizer")
        self.text_encoder = self.build_text_encoder(build, "text_encoder", "encoder.block")
        self.build_vae(build)
        experts = ["transformer"] + (["transformer_2"] if index.get("transformer_2", [None])[0] else [])
        self.transformers = [build(experts[0], dtype, options.linear_format, to=sharded)]
        if fsdp:  # shard the first expert before the second one is loaded beside it
            options.install(self.transformers[0], entry.alias if entry else None)
        self.park_experts = False
        if len(experts) == 2:
            # Wan 2.2 A14B: when the GPU cannot hold both experts with room to run, the low-noise expert waits
            # in host memory and the two swap at the boundary (one swap each way per generation). Under FSDP
            # each rank holds a shard of both instead.
            self.park_experts = options.park_experts and not fsdp
            if self.park_experts is None:
                self.park_experts = (
                    not fsdp and not options.offload and not _fits_beside(self.transformers[0], device)
                )
            to = torch.device("cpu") if self.park_experts else sharded
            self.transformers.append(build(experts[1], dtype, options.linear_format, to=to))
            if self.park_experts:
                log.info(
                    "dit_rt: two experts do not fit on %s together; the inactive one waits on the CPU", device
                )
        alias = entry.alias if entry else None
        for model in self.transformers[1 if fsdp else 0 :]:
            options.install(model, alias)
        self.image_encoder = self.clip_config = None
        if self.i2v and self.transformers[0].cfg.image_dim is not None:  # Wan 2.1 I2V: CLIP image tokens
            from dit_rt.image import CLIPImageConfig

            if not (index.get("image_encoder") or [None])[0]:
                raise ValueError(
                    f"{folder}: the transformer takes CLIP image tokens but there is no image_encoder"
                )
            self.image_encoder = build("image_encoder", dtype)
            self.clip_config = CLIPImageConfig.from_config(loaders.read_config(folder / "image_processor"))
        self.offload_components(self.text_encoder, self.vae, self.image_encoder)
        ratio = index.get("boundary_ratio")
        if len(self.transformers) == 2 and ratio is None:
            raise ValueError(f"{folder}: model_index.json lists transformer_2 but no boundary_ratio")
        self.scheduler_config = loaders.read_config(folder / "scheduler")
        self.scheduler = UniPCFlowScheduler.from_config(self.scheduler_config)
        self.boundary_timestep = None if ratio is None else ratio * self.scheduler.config.num_train_timesteps
        self.defaults = entry.defaults if entry else self._defaults_from_config()
        self.constraints = constraints(folder, index)

    def _defaults_from_config(self) -> Defaults:
        """A folder outside the catalog: diffusers' WanPipeline call defaults."""
        from dit_rt.catalog import WAN_NEGATIVE

        return Defaults(480, 832, 81, 16, 50, 5.0, None, None, WAN_NEGATIVE)

    # ---------------------------------------------------------------------------------------------- inputs

    def check_inputs(self, height, width, num_frames, batch, latents):
        c = self.constraints
        checks.check_multiple("height", height, c.spatial)
        checks.check_multiple("width", width, c.spatial)
        checks.check_frames(num_frames, c.temporal, default=self.defaults.num_frames)
        shape = self.latent_shape(batch, height, width, num_frames)
        checks.check_latents(latents, shape)
        return shape

    def latent_shape(self, batch, height, width, num_frames):
        z = self.vae.config.z_dim
        frames = (num_frames - 1) // VAE_SCALE_TEMPORAL + 1
        return (batch, z, frames, height // VAE_SCALE_SPATIAL, width // VAE_SCALE_SPATIAL)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 512) -> torch.Tensor:
        return self.t5_embeddings(prompts, max_sequence_length)

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
    ) -> GenerationOutput:
        d = self.defaults
        checks.check_image_use(self.constraints, image is not None, self.model_name("this Wan checkpoint"))
        prompts = self.prompt_list(prompt)
        negative = negative_prompt if negative_prompt is not None else d.negative_prompt
        negatives = matched(negative, prompts, "negative_prompt", "negative prompts")
        if self.i2v:
            from dit_rt.image import derive_size, load_image

            # Validate early; the original object goes on to the resizers, whose filters depend on its type
            # (PIL: Lanczos, tensors: nearest) exactly as in the reference.
            pixels = load_image(image)
            if height is None and width is None:  # the image's aspect ratio at the model's pixel budget
                height, width = derive_size(pixels, d.height * d.width, VAE_SCALE_SPATIAL * PATCH)
        height, width, num_frames, steps, g1 = self.resolve(
            height, width, num_frames, num_inference_steps, guidance_scale
        )
        if guidance_scale_2 is not None:
            checks.check_guidance(
                "guidance_scale_2", guidance_scale_2, d.guidance_scale_2 or d.guidance_scale
            )
        if flow_shift is not None:
            checks.check_positive("flow_shift", flow_shift, d.flow_shift)
        g2 = (
            guidance_scale_2
            if guidance_scale_2 is not None
            else (d.guidance_scale_2 if guidance_scale is None else None)
        )
        g2 = g1 if g2 is None else g2
        checks.check_output_type(output_type)
        shape = self.check_inputs(height, width, num_frames, len(prompts), latents)
        request = Request(
            prompts=prompts,
            negatives=negatives,
            shape=shape,
            steps=steps,
            guidance=(g1, g2),
            metadata=self.metadata(
                prompts,
                negative_prompt=negative_prompt,  # the model's default negative prompt is long and implied
                image=str(image) if isinstance(image, (str, Path)) else None,
                height=height,
                width=width,
                num_frames=num_frames,
                num_inference_steps=steps,
                guidance_scale=g1,
                guidance_scale_2=g2 if len(self.transformers) == 2 else None,
            ),
            latents=latents,
            seed=seed,
            encode=dict(max_sequence_length=max_sequence_length),
            extra=dict(image=image, height=height, width=width, num_frames=num_frames, flow_shift=flow_shift),
            fps=d.fps,
            output_type=output_type,
            progress_bar=progress_bar,
            callback=callback,
        )
        return self.denoise(request)

    # -------------------------------------------------------------------------------------------- loop hooks

    def prepare_latents(self, latents: torch.Tensor, r: Request):
        """The noise as it is (float32), and for image-to-video the first-frame conditioning of this batch."""
        if not self.i2v:
            return latents, None
        x = r.extra
        return latents, self.encode_image(x["image"], len(latents), x["height"], x["width"], x["num_frames"])

    def make_scheduler(self, r: Request):
        shift = r.extra["flow_shift"] if r.extra["flow_shift"] is not None else self.defaults.flow_shift
        scheduler = self.scheduler
        if shift is not None and shift != scheduler.config.flow_shift:
            from dit_rt.schedulers import UniPCFlowScheduler

            scheduler = UniPCFlowScheduler.from_config(self.scheduler_config, flow_shift=shift)
        scheduler.set_timesteps(r.steps, device=self.device)
        r.metadata["flow_shift"] = scheduler.config.flow_shift
        return scheduler

    def predict(self, model, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The flow velocity; image-to-video adds the mask + image latent channels and the CLIP tokens."""
        condition, image_tokens = cond.shared or (None, None)
        x = latents if condition is None else torch.cat([latents, condition], dim=1)
        x = x.to(self.dtype)
        return model(x, t.expand(x.shape[0]), cond.prompt, image_tokens)

    def expert_index(self, t: torch.Tensor) -> int:
        """Wan 2.2 A14B: the high-noise expert down to the boundary timestep, the low-noise one after."""
        return 0 if self.boundary_timestep is None or t >= self.boundary_timestep else 1

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, batch: int, height: int, width: int, num_frames: int):
        """The first frame as conditioning: (mask + normalised VAE latents [B, 4 + Z, T, h, w] fp32,
        CLIP penultimate tokens [B, 257, 1280] or None for Wan 2.2)."""
        from dit_rt.image import clip_preprocess, resize_for_video

        frame = resize_for_video(image, height, width).to(self.device)  # [1, 3, H, W] in [-1, 1]
        video = torch.cat([frame.unsqueeze(2), frame.new_zeros(1, 3, num_frames - 1, height, width)], dim=2)
        with self.offload.use(self.vae):
            z = self.vae.encode(video.to(self.vae_dtype)).mean.float()  # the posterior mode, as the reference
        z = self.vae.normalize_latents(z).repeat(batch, 1, 1, 1, 1)
        _, _, t, h, w = z.shape
        # Pixel-frame mask (1 on frame 0), frame 0 repeated 4x, folded into 4 channels per latent frame.
        mask = torch.zeros(batch, 4 * t, h, w, device=z.device)
        mask[:, :VAE_SCALE_TEMPORAL] = 1
        mask = mask.view(batch, t, VAE_SCALE_TEMPORAL, h, w).transpose(1, 2)
        condition = torch.cat([mask, z], dim=1)
        tokens = None
        if self.image_encoder is not None:
            pixels = clip_preprocess(image, self.clip_config).to(self.device, self.image_encoder_dtype)
            with self.offload.use(self.image_encoder):
                tokens = self.image_encoder(pixels).repeat(batch, 1, 1).to(self.dtype)
        return condition, tokens

    @property
    def image_encoder_dtype(self) -> torch.dtype:
        return next(self.image_encoder.parameters()).dtype

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, Z, T, h, w] -> float32 frames [B, T', H, W, 3] in [0, 1] on the device.
        Under parallel=, the ranks of a dp group (cfg x ulysses x ring) decode together, each its own
        latent rows (dit_rt.parallel.vae)."""
        return self.vae_frames(self.vae.denormalize_latents(latents.to(self.vae_dtype)))
