"""Wan 2.1 / 2.2 text-to-video and image-to-video: UMT5 prompt embeddings, the UniPC flow loop with
classifier-free guidance (two experts split at `boundary_ratio` for Wan 2.2 A14B), and the Wan VAE decode.
Image-to-video adds the VAE-encoded first frame + mask channels (36-channel input) and, for Wan 2.1 I2V,
the CLIP ViT-H/14 image tokens.

Step for step the same computation as diffusers' `WanPipeline` / `WanImageToVideoPipeline`, so both give the
same frames from the same `latents`.

Under torchrun with `parallel=` (see dit_rt.parallel) the same loop runs on every rank: data parallel splits
the prompt batch over the dp groups (the noise is drawn for the whole batch on every rank, then sliced, so
each item sees the noise it would in one process); CFG parallel runs the conditional pass on cfg rank 0 and
the unconditional one on rank 1 and exchanges the predictions; Ulysses / Ring run inside the transformer's
attention (installed by RuntimeOptions). Every rank then steps the scheduler identically, the ranks of a
dp group decode their items together (latent rows split across them), and every rank returns the whole
batch.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path

import torch

from dit_rt import checks
from dit_rt.cache import cache_branch, cache_reset, cache_stats, cache_step
from dit_rt.catalog import Defaults, Entry
from dit_rt.offload import ComponentOffload
from dit_rt.parallel import cfg_gather, cfg_select, gather_batch, split_batch
from dit_rt.parallel.vae import parallel_decode
from dit_rt.pipeline import GenerationOutput, StepCallback, as_prompt_list, guide, make_generator, progress
from dit_rt.runtime import RuntimeOptions

log = logging.getLogger("dit_rt")

VAE_SCALE_SPATIAL, VAE_SCALE_TEMPORAL, PATCH = 8, 4, 2


def _clip_branch_from_keys(config, component_dir: Path):
    """The weights decide whether a Wan transformer has the CLIP image branch (Wan 2.1 I2V) or not (Wan 2.2
    I2V): Hub configs of the same model have been published both ways (spec A.1)."""
    from dataclasses import replace

    from dit_rt.loaders import find_weight_files, scan

    keys = scan(*find_weight_files(component_dir))
    has_clip = any(".attn2.add_k_proj." in k for k in keys)
    if has_clip and config.image_dim is None:
        image_dim = keys["condition_embedder.image_embedder.norm1.weight"].shape[0]
        return replace(
            config,
            image_dim=image_dim,
            added_kv_proj_dim=config.num_attention_heads * config.attention_head_dim,
        )
    if not has_clip and config.image_dim is not None:
        return replace(config, image_dim=None, added_kv_proj_dim=None)
    return config


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


class WanPipeline:
    """Text-to-video for every Wan 2.1 / 2.2 A14B checkpoint in the Hub Diffusers layout."""

    def __init__(self, folder: Path, index: dict, options: RuntimeOptions, entry: Entry | None = None):
        from dit_rt import loaders
        from dit_rt.models.text import T5Tokenizer, UMT5Config, UMT5Encoder
        from dit_rt.models.wan import WanTransformer, WanTransformerConfig, WanVAE, WanVAEConfig
        from dit_rt.schedulers import UniPCFlowScheduler

        self.folder, self.options, self.entry = folder, options, entry
        self.i2v = index.get("_class_name") == "WanImageToVideoPipeline"
        self.mesh = options.mesh
        device, dtype = options.device, options.dtype
        self.device, self.dtype = device, dtype

        # With offload=, every component loads into host memory and visits the device only while used.
        host = torch.device("cpu") if options.offload else device
        # With FSDP, the transformers and the text encoder load into host memory and move to the GPU
        # block by block as they are sharded: a model larger than one GPU never sits on one whole.
        fsdp = options.parallel is not None and options.parallel.fsdp
        sharded = torch.device("cpu") if fsdp else host

        def build(cls, config_cls, component: str, dtype, linear_format=None, *, to=host):
            config = config_cls.from_config(loaders.read_config(folder / component))
            if cls is WanTransformer:
                config = _clip_branch_from_keys(config, folder / component)
            with torch.device("meta"):
                model = cls(config)
            loaders.load_weights(
                model,
                folder / component,
                device=to,
                dtype=dtype,
                linear_format=linear_format,
                component=component,
            )
            return model.eval().requires_grad_(False)

        self.tokenizer = T5Tokenizer.from_folder(folder / "tokenizer")
        self.text_encoder = build(UMT5Encoder, UMT5Config, "text_encoder", dtype, to=sharded)
        if fsdp:
            options.shard(self.text_encoder, "encoder.block")
        self.vae_dtype = options.vae_dtype or dtype
        self.vae = build(WanVAE, WanVAEConfig, "vae", self.vae_dtype)
        experts = ["transformer"] + (["transformer_2"] if index.get("transformer_2", [None])[0] else [])
        self.transformers = [
            build(WanTransformer, WanTransformerConfig, experts[0], dtype, options.linear_format, to=sharded)
        ]
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
            self.transformers.append(
                build(WanTransformer, WanTransformerConfig, experts[1], dtype, options.linear_format, to=to)
            )
            if self.park_experts:
                log.info(
                    "dit_rt: two experts do not fit on %s together; the inactive one waits on the CPU", device
                )
        alias = entry.alias if entry else None
        for model in self.transformers[1 if fsdp else 0 :]:
            options.install(model, alias)
        self.image_encoder = self.clip_config = None
        if self.i2v and self.transformers[0].cfg.image_dim is not None:  # Wan 2.1 I2V: CLIP image tokens
            from dit_rt.models.image import CLIPImageConfig
            from dit_rt.models.text import CLIPVisionConfig, CLIPVisionEncoder

            if not (index.get("image_encoder") or [None])[0]:
                raise ValueError(
                    f"{folder}: the transformer takes CLIP image tokens but there is no image_encoder"
                )
            self.image_encoder = build(CLIPVisionEncoder, CLIPVisionConfig, "image_encoder", dtype)
            self.clip_config = CLIPImageConfig.from_config(loaders.read_config(folder / "image_processor"))
        self.offload = ComponentOffload(device)
        if options.offload:
            for m in (self.text_encoder, self.vae, self.image_encoder):
                if m is not None:
                    self.offload.add(m)
            if options.offload == "model":
                for m in self.transformers:
                    self.offload.add(m)
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
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this request, got {tuple(latents.shape)}")
        return shape

    def latent_shape(self, batch, height, width, num_frames):
        z = self.vae.config.z_dim
        frames = (num_frames - 1) // VAE_SCALE_TEMPORAL + 1
        return (batch, z, frames, height // VAE_SCALE_SPATIAL, width // VAE_SCALE_SPATIAL)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], max_sequence_length: int = 512) -> torch.Tensor:
        from dit_rt.models.text import wan_text_embeddings

        with self.offload.use(self.text_encoder):
            return wan_text_embeddings(
                self.text_encoder,
                self.tokenizer,
                prompts,
                max_length=max_sequence_length,
                device=self.device,
                dtype=self.dtype,
            )

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
        checks.check_image_use(
            self.constraints, image is not None, self.entry.alias if self.entry else "this Wan checkpoint"
        )
        if prompt is None:
            raise ValueError("generate() needs a prompt")
        prompts = as_prompt_list(prompt)
        negative = negative_prompt if negative_prompt is not None else d.negative_prompt
        negatives = as_prompt_list(negative, "negative_prompt")
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if self.i2v:
            from dit_rt.models.image import derive_size, load_image

            # Validate early; the original object goes on to the resizers, whose filters depend on its type
            # (PIL: Lanczos, tensors: nearest) exactly as in the reference.
            pixels = load_image(image)
            if height is None and width is None:  # the image's aspect ratio at the model's pixel budget
                height, width = derive_size(pixels, d.height * d.width, VAE_SCALE_SPATIAL * PATCH)
        height = d.height if height is None else height
        width = d.width if width is None else width
        num_frames = d.num_frames if num_frames is None else num_frames
        steps = d.num_inference_steps if num_inference_steps is None else num_inference_steps
        checks.check_positive_int("num_inference_steps", steps, d.num_inference_steps)
        g1 = d.guidance_scale if guidance_scale is None else guidance_scale
        checks.check_guidance("guidance_scale", g1, d.guidance_scale)
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
        if output_type not in ("frames", "latents"):
            raise ValueError(f"output_type must be 'frames' or 'latents', got {output_type!r}")
        shape = self.check_inputs(height, width, num_frames, len(prompts), latents)

        do_cfg = g1 > 1.0  # as the reference: guidance is decided by the first expert's scale
        mesh, batch = self.mesh, len(prompts)
        dp_group, cfg_group = mesh.group("dp"), mesh.group("cfg")
        cfg_parallel = mesh.size("cfg") == 2
        if mesh.size("dp") > batch:
            raise ValueError(
                f"parallel dp={mesh.size('dp')} splits the prompt batch over {mesh.size('dp')} groups; "
                f"pass at least {mesh.size('dp')} prompts or lower dp"
            )
        if cfg_parallel and not do_cfg:
            raise ValueError(
                "parallel cfg=2 runs the conditional and unconditional passes on different ranks, but "
                f"guidance_scale={g1} <= 1 runs no unconditional pass; use guidance_scale > 1 or cfg=1"
            )
        metadata = self._metadata(prompts, negative_prompt, image, height, width, num_frames, steps, g1, g2)
        # Data parallel: this dp group's part of the batch (everything in one process).
        prompts, negatives = split_batch(prompts, dp_group), split_batch(negatives, dp_group)
        if cfg_parallel:  # this rank's pass only: cond on cfg rank 0, uncond on cfg rank 1
            cond = self.encode_prompt(cfg_select(prompts, negatives, cfg_group), max_sequence_length)
        else:
            cond = self.encode_prompt(prompts, max_sequence_length)
            uncond = self.encode_prompt(negatives, max_sequence_length) if do_cfg else None

        if latents is None:
            # The whole batch's noise, identical on every rank (one shared seed), then this group's slice.
            seed = self._shared_seed(seed)
            metadata["seed"] = seed
            latents = torch.randn(shape, generator=make_generator(seed, self.device), device=self.device)
        latents = split_batch(latents.to(self.device, torch.float32), dp_group)
        condition = image_tokens = None
        if self.i2v:
            condition, image_tokens = self.encode_image(image, len(prompts), height, width, num_frames)

        shift = flow_shift if flow_shift is not None else d.flow_shift
        scheduler = self.scheduler
        if shift is not None and shift != scheduler.config.flow_shift:
            from dit_rt.schedulers import UniPCFlowScheduler

            scheduler = UniPCFlowScheduler.from_config(self.scheduler_config, flow_shift=shift)
        scheduler.set_timesteps(steps, device=self.device)
        metadata["flow_shift"] = scheduler.config.flow_shift

        show = progress_bar and self.options.rank == 0
        # Step caches keep one state per expert and per guidance branch; under cfg parallel each rank runs
        # one branch.
        first_branch = "uncond" if cfg_parallel and self.mesh.rank("cfg") == 1 else "cond"
        cache_reset(self.transformers, steps)
        with (
            ExitStack() as on_device
        ):  # offload="model": the active expert's weights, swapped at the boundary
            active = None
            for i, t in enumerate(progress(scheduler.timesteps, show)):
                expert, scale = self._expert(t, g1, g2)
                if expert is not active:
                    on_device.close()
                    on_device.enter_context(self.offload.use(expert))
                    active = expert
                cache_step(expert, i)
                x = latents if condition is None else torch.cat([latents, condition], dim=1)
                x = x.to(self.dtype)
                timestep = t.expand(x.shape[0])
                with cache_branch(expert, first_branch):
                    noise = expert(x, timestep, cond, image_tokens)
                if cfg_parallel:
                    noise, noise_uncond = cfg_gather(noise, cfg_group)  # both ranks get both predictions
                    noise = guide(noise_uncond, noise, scale)
                elif do_cfg:
                    with cache_branch(expert, "uncond"):
                        noise = guide(expert(x, timestep, uncond, image_tokens), noise, scale)
                latents = scheduler.step(noise, t, latents)
                if callback is not None:
                    callback(i, t, latents)  # under data parallel: this dp group's part of the batch
        stats = cache_stats(self.transformers)

        out = dict(fps=d.fps, stats=stats, seed=metadata.get("seed"), metadata=metadata)
        if output_type == "latents":
            return GenerationOutput(torch.empty(0), gather_batch(latents, dp_group, batch), **out)
        frames = gather_batch(self._decode(latents), dp_group, batch).cpu()
        latents = gather_batch(latents, dp_group, batch)
        return GenerationOutput(frames=frames, latents=latents, **out)

    def _shared_seed(self, seed: int | None) -> int:
        """The seed of the initial noise: `seed`, or when None one drawn at random, so that the output can
        report it. With several processes rank 0 draws it for all: every rank must draw the same noise (each
        dp group then takes its slice; sequence and cfg ranks need identical inputs)."""
        import torch.distributed as dist

        if seed is not None:
            return seed
        drawn = torch.randint(0, 2**32, (1,), generator=make_generator(None, torch.device("cpu")))
        if dist.is_initialized() and dist.get_world_size() > 1:
            drawn = drawn.to(self.device)
            dist.broadcast(drawn, src=0)
        return int(drawn.item())

    def _metadata(self, prompts, negative_prompt, image, height, width, num_frames, steps, g1, g2) -> dict:
        """What produced this output, for GenerationOutput.metadata and the saved file's comment."""
        from dit_rt import __version__

        o = self.options
        meta = dict(
            model=self.entry.alias if self.entry else str(self.folder),
            prompt=prompts[0] if len(prompts) == 1 else list(prompts),
        )
        if negative_prompt is not None:  # the model's default negative prompt is long and implied
            meta["negative_prompt"] = negative_prompt
        if isinstance(image, (str, Path)):
            meta["image"] = str(image)
        meta.update(height=height, width=width, num_frames=num_frames, num_inference_steps=steps)
        meta.update(guidance_scale=g1, **({"guidance_scale_2": g2} if len(self.transformers) == 2 else {}))
        meta["options"] = {
            "dtype": str(o.dtype).removeprefix("torch."),
            "attention": o.attention,
            "linear": o.linear,
            **{k: v for k, v in (("cache", o.cache), ("offload", o.offload)) if v},
        }
        meta["software"] = f"dit_rt {__version__}"
        return meta

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, batch: int, height: int, width: int, num_frames: int):
        """The first frame as conditioning: (mask + normalised VAE latents [B, 4 + Z, T, h, w] fp32,
        CLIP penultimate tokens [B, 257, 1280] or None for Wan 2.2)."""
        from dit_rt.models.image import clip_preprocess, resize_for_video

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

    def _expert(self, t: torch.Tensor, g1: float, g2: float):
        i, scale = (0, g1) if self.boundary_timestep is None or t >= self.boundary_timestep else (1, g2)
        if self.park_experts:
            self._make_resident(i)
        return self.transformers[i], scale

    def _make_resident(self, i: int) -> None:
        """Move expert i to the compute device and the other one to host memory, if not already there."""
        active, parked = self.transformers[i], self.transformers[1 - i]
        if next(active.parameters()).device == self.device:
            return
        parked.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        active.to(self.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> float32 frames (B, T, H, W, C) in [0, 1] on the CPU.

        Under parallel=, the ranks of a dp group (cfg x ulysses x ring) decode together, each its own
        latent rows (dit_rt.parallel.vae); every rank of the group must call this with the same latents.
        """
        return self._decode(latents).cpu()

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        # [B, Z, T, h, w] -> [B, T', H, W, 3] float32 on the compute device
        z = self.vae.denormalize_latents(latents.to(self.vae_dtype))
        with self.offload.use(self.vae):
            video = parallel_decode(self.vae, z, self.mesh.group("replica"))  # [B, C, T, H, W] in [-1, 1]
        frames = (video.float() / 2 + 0.5).clamp(0, 1)
        return frames.permute(0, 2, 3, 4, 1)
