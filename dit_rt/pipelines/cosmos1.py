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

from dit_rt import checks
from dit_rt.catalog import COSMOS_NEGATIVE, Defaults, Entry
from dit_rt.offload import ComponentOffload
from dit_rt.parallel.vae import parallel_decode
from dit_rt.pipeline import (
    Conditioning,
    GenerationOutput,
    Pipeline,
    Request,
    StepCallback,
    as_prompt_list,
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

    guidance = "from_cond"
    folder_constraints = staticmethod(constraints)

    def __init__(self, folder: Path, index: dict, options: RuntimeOptions, entry: Entry | None = None):
        from dit_rt import loaders
        from dit_rt.models.text import T5Tokenizer
        from dit_rt.schedulers.edm import EDMEulerScheduler

        build = self.start(folder, index, options, entry)
        dtype, sharded = self.dtype, self.sharded
        self.tokenizer = T5Tokenizer.from_folder(folder / "tokenizer")
        self.text_encoder = build("text_encoder", dtype, to=sharded)
        if self.fsdp:
            options.shard(self.text_encoder, "encoder.block")
        self.vae_dtype = options.vae_dtype or dtype
        self.vae = build("vae", self.vae_dtype)
        self.transformers = [build("transformer", dtype, options.linear_format, to=sharded)]
        options.install(self.transformers[0], entry.alias if entry else None)
        self.offload = ComponentOffload(self.device)
        if options.offload:
            self.offload.add(self.text_encoder)
            self.offload.add(self.vae)
            if options.offload == "model":
                self.offload.add(self.transformers[0])
        self.scheduler = EDMEulerScheduler.from_config(loaders.read_config(folder / "scheduler"))
        # A folder outside the catalog: diffusers' call defaults.
        self.defaults = (
            entry.defaults if entry else Defaults(704, 1280, 121, 30, 36, 7.0, None, None, COSMOS_NEGATIVE)
        )
        self.constraints = constraints(folder, index)

    @property
    def transformer(self):
        return self.transformers[0]

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
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this request, got {tuple(latents.shape)}")
        return shape

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 512) -> torch.Tensor:
        """T5 states [B, max_sequence_length, d_model] with the rows past each prompt's tokens (incl. `</s>`)
        zeroed. The encoder sees only the longest prompt's tokens: with the padding keys masked the real rows
        do not depend on the padding columns, and the rows past the length are zeroed anyway."""
        ids, mask = self.tokenizer.encode(prompts, max_length=max_sequence_length)
        n = int(mask.sum(dim=1).max())
        with self.offload.use(self.text_encoder):
            device = next(self.text_encoder.parameters()).device
            states = self.text_encoder(ids[:, :n].to(device), mask[:, :n].to(device))  # [B, n, d_model]
        out = states.new_zeros(len(prompts), ids.shape[1], states.shape[-1])
        out[:, :n] = states * mask[:, :n, None].to(states)
        return out.to(self.device, self.dtype)

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
        name = self.entry.alias if self.entry else "this Cosmos-1.0 checkpoint"
        checks.check_image_use(self.constraints, image is not None, name)
        for arg, value, why in (
            ("guidance_scale_2", guidance_scale_2, "it has one transformer"),
            ("flow_shift", flow_shift, "it samples on EDM sigmas, not flow sigmas"),
        ):
            if value is not None:
                raise ValueError(f"{arg}={value!r} does not apply to {name}: {why}; leave it unset")
        if prompt is None:
            raise ValueError("generate() needs a prompt")
        prompts = as_prompt_list(prompt)
        negatives = as_prompt_list(
            d.negative_prompt if negative_prompt is None else negative_prompt, "negative_prompt"
        )
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        height = d.height if height is None else height
        width = d.width if width is None else width
        num_frames = d.num_frames if num_frames is None else num_frames
        steps = d.num_inference_steps if num_inference_steps is None else num_inference_steps
        checks.check_positive_int("num_inference_steps", steps, d.num_inference_steps)
        g = d.guidance_scale if guidance_scale is None else guidance_scale
        checks.check_guidance("guidance_scale", g, d.guidance_scale)
        fps = d.fps if fps is None else fps
        checks.check_positive("fps", fps, d.fps)
        if not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be a positive int, got {max_sequence_length!r}")
        if output_type not in ("frames", "latents"):
            raise ValueError(f"output_type must be 'frames' or 'latents', got {output_type!r}")
        shape = self.check_inputs(height, width, num_frames, len(prompts), latents)
        request = Request(
            prompts=prompts,
            negatives=negatives,
            shape=shape,
            steps=steps,
            guidance=(g,),
            metadata=self._metadata(prompts, negative_prompt, height, width, num_frames, steps, g, fps),
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
        i = self.scheduler.index(t)
        x_in = self.scheduler.precondition_inputs(x, i).to(self.dtype)
        out = model(x_in, t.expand(x.shape[0]).to(self.dtype), cond.prompt, fps=cond.shared)
        return self.scheduler.precondition_outputs(x, out, i)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """DiT latents [B, Z, T, h, w] -> float32 frames [B, T', H, W, 3] in [0, 1] on the device. Under
        parallel=, the ranks of a dp group decode together (dit_rt.parallel.vae)."""
        # De-normalised in float32 (per channel and latent frame), then in the tokenizer's dtype.
        z = self.vae.denormalize_latents(latents.float(), self.scheduler.config.sigma_data).to(self.vae_dtype)
        with self.offload.use(self.vae):
            video = parallel_decode(self.vae, z, self.mesh.group("replica"))  # [B, C, T, H, W] ~[-1, 1]
        frames = (video.float() / 2 + 0.5).clamp(0, 1)
        return frames.permute(0, 2, 3, 4, 1)

    def _metadata(self, prompts, negative_prompt, height, width, num_frames, steps, g, fps) -> dict:
        """What produced this output, for GenerationOutput.metadata and the saved file's comment."""
        from dit_rt import __version__

        o = self.options
        meta = dict(
            model=self.entry.alias if self.entry else str(self.folder),
            prompt=prompts[0] if len(prompts) == 1 else list(prompts),
        )
        if negative_prompt is not None:  # the default negative prompt is long and implied
            meta["negative_prompt"] = negative_prompt
        meta.update(height=height, width=width, num_frames=num_frames, num_inference_steps=steps)
        meta.update(guidance_scale=g, fps=fps)
        meta["options"] = {
            "dtype": str(o.dtype).removeprefix("torch."),
            "attention": o.attention,
            "linear": o.linear,
            **{k: v for k, v in (("cache", o.cache), ("offload", o.offload)) if v},
        }
        meta["guardrail"] = "none"
        meta["software"] = f"dit_rt {__version__}"
        return meta
