"""NVIDIA Cosmos-1.0-Diffusion Text2World (`CosmosTextToWorldPipeline`): T5-11B prompt states, the Cosmos
DiT under the EDM preconditioning, Euler steps on Karras sigmas 80 -> 0.002 with Cosmos' guidance on x0
(x0_c + g (x0_c - x0_u)), and the Cosmos CV8x8x8 video tokenizer's decode.

Step for step the same computation as diffusers' `CosmosTextToWorldPipeline`, so both give the same frames
from the same `latents` (unit-variance noise, scaled by sigma_max here as there). The loop itself (batching,
dp, CFG and CFG parallel, step caches, output) is dit_rt.pipeline's.

Guardrail: NVIDIA's Cosmos safety checker (the `cosmos_guardrail` package, a separate set of models) is not
part of dit_rt and never runs; a `safety_checker` entry in model_index.json is ignored. The reference's frames
pass through it as 8-bit video (truncated to 1/255 steps); dit_rt's frames are the decoder's, unquantised.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dit_rt import checks, memory
from dit_rt.catalog import COSMOS_NEGATIVE, Defaults, Entry
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


def constraints(folder: Path, index: dict) -> checks.Constraints:
    """What a Cosmos-1.0 Text2World checkpoint accepts, from its configs alone: sizes on the tokenizer x patch
    grid, frames 8k+1 (the tokenizer's time compression), no image."""
    from dit_rt import loaders
    from dit_rt.models.cosmos.tokenizer import CosmosVAEConfig

    vae = CosmosVAEConfig.from_config(loaders.read_config(folder / "vae"))
    patch = loaders.read_config(folder / "transformer").get("patch_size", (1, 2, 2))
    return checks.Constraints(
        spatial=vae.spatial_compression_ratio * patch[1],
        temporal=vae.temporal_compression_ratio,
        image="none",
    )


@register_pipeline("CosmosTextToWorldPipeline")
class CosmosTextToWorldPipeline(Pipeline):
    """Cosmos-1.0-Diffusion-7B / 14B Text2World: a 704x1280x121 clip at 30 fps per prompt."""

    auto_margin = memory.VIDEO_AUTO_MARGIN  # offload resident_gib='auto': a video's VAE decode

    guidance = "from_cond"
    metadata_notes = {"guardrail": "none"}
    folder_constraints = staticmethod(constraints)

    def __init__(self, folder: Path, index: dict, options: RuntimeOptions, entry: Entry | None = None):
        from dit_rt import loaders
        from dit_rt.models.text import T5Tokenizer
        from dit_rt.schedulers.edm import EDMEulerScheduler

        build = self.start(folder, index, options, entry)
        self.tokenizer = T5Tokenizer.from_folder(folder / "tokenizer")
        self.text_encoder = self.build_text_encoder(build, "text_encoder", "encoder.block")
        self.build_vae(build)
        self.build_transformer(build)
        self.offload_components(self.text_encoder, self.vae)
        self.scheduler = EDMEulerScheduler.from_config(loaders.read_config(folder / "scheduler"))
        # A folder outside the catalog: diffusers' call defaults.
        self.defaults = (
            entry.defaults if entry else Defaults(704, 1280, 121, 30, 36, 7.0, None, None, COSMOS_NEGATIVE)
        )
        self.constraints = constraints(folder, index)

    # ---------------------------------------------------------------------------------------------- inputs

    def check_inputs(self, height, width, num_frames, batch, latents) -> tuple[int, ...]:
        """Sizes and frames by the checkpoint's rules -> the initial noise shape of the whole batch."""
        c = self.constraints
        checks.check_multiple("height", height, c.spatial)
        checks.check_multiple("width", width, c.spatial)
        checks.check_frames(num_frames, c.temporal, default=self.defaults.num_frames)
        vae = self.vae.config
        shape = (
            batch,
            self.transformer.cfg.in_channels,
            (num_frames - 1) // vae.temporal_compression_ratio + 1,
            height // vae.spatial_compression_ratio,
            width // vae.spatial_compression_ratio,
        )
        checks.check_latents(latents, shape)
        return shape

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 512) -> torch.Tensor:
        """T5 states [B, max_sequence_length, d_model] with the rows past each prompt's tokens (incl. `</s>`)
        zeroed: Wan's recipe (models/text/tokenizer.py) without its prompt cleaning."""
        return self.t5_embeddings(prompts, max_sequence_length, clean=False)

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
        fps: float | None = None,
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        image=None,
        max_sequence_length: int = 512,
        progress_bar: bool = True,
        callback: StepCallback | None = None,
        output_type: str = "frames",
    ) -> GenerationOutput:
        """latents: the reference's initial noise [B, 16, 1 + (F-1)/8, H/8, W/8], unit variance (scaled by
        sigma_max here, as the reference does). fps: the frame rate the DiT is told (RoPE's time scale) and
        the output's. guidance_scale_2 and flow_shift (the CLI passes them) do not apply: one transformer, EDM
        sigmas."""
        d = self.defaults
        name = self.model_name("this Cosmos-1.0 checkpoint")
        checks.check_image_use(self.constraints, image is not None, name)
        checks.check_not_applicable(
            name,
            ("guidance_scale_2", guidance_scale_2, "it has one transformer"),
            ("flow_shift", flow_shift, "it samples on EDM sigmas, not flow sigmas"),
        )
        prompts = self.prompt_list(prompt)
        negative = d.negative_prompt if negative_prompt is None else negative_prompt
        negatives = matched(negative, prompts, "negative_prompt", "negative prompts")
        height, width, num_frames, steps, g = self.resolve(
            height, width, num_frames, num_inference_steps, guidance_scale
        )
        fps = d.fps if fps is None else fps
        checks.check_positive("fps", fps, d.fps)
        checks.check_max_sequence_length(max_sequence_length)
        checks.check_output_type(output_type)
        shape = self.check_inputs(height, width, num_frames, len(prompts), latents)
        request = Request(
            prompts=prompts,
            negatives=negatives,
            shape=shape,
            steps=steps,
            guidance=(g,),
            metadata=self.metadata(
                prompts,
                negative_prompt=negative_prompt,  # the default negative prompt is long and implied
                height=height,
                width=width,
                num_frames=num_frames,
                num_inference_steps=steps,
                guidance_scale=g,
                fps=fps,
            ),
            latents=latents,
            seed=seed,
            encode=dict(max_sequence_length=max_sequence_length),
            fps=fps,
            output_type=output_type,
            progress_bar=progress_bar,
            callback=callback,
        )
        return self.denoise(request)

    # -------------------------------------------------------------------------------------------- loop hooks

    def prepare_latents(self, latents: torch.Tensor, r: Request):
        """The noise scaled to sigma_max; what both branches share is the frame rate the DiT is told."""
        return latents * self.scheduler.init_noise_sigma, r.fps

    def make_scheduler(self, r: Request):
        self.scheduler.set_timesteps(r.steps, device=self.device)
        return self.scheduler

    def predict(self, model, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x0 (float32) = c_skip x + c_out DiT(c_in x, c_noise): the EDM preconditioning at step t."""
        i = self.scheduler.index(self.schedule_index(t))
        x_in = self.scheduler.precondition_inputs(x, i).to(self.dtype)
        out = model(x_in, t.expand(x.shape[0]).to(self.dtype), cond.prompt, fps=cond.shared)
        return self.scheduler.precondition_outputs(x, out, i)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """DiT latents [B, Z, T, h, w] -> float32 frames [B, T', H, W, 3] in [0, 1] on the device. Under
        parallel=, the ranks of a dp group decode together (dit_rt.parallel.vae)."""
        # De-normalised in float32 (per channel and latent frame), then in the tokenizer's dtype.
        z = self.vae.denormalize_latents(latents.float(), self.scheduler.config.sigma_data).to(self.vae_dtype)
        return self.vae_frames(z)
