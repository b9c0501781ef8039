"""FLUX.1 text-to-image (FLUX.1-dev, FLUX.1-schnell): CLIP-L pooled text + T5 v1.1 states, flow-match Euler
with the resolution-dependent shift, embedded guidance (one transformer pass per step) and, as diffusers has
it, optional true CFG (`true_cfg_scale` > 1 with a negative prompt), then the 16-channel AutoencoderKL.

Step for step the same computation as diffusers' `FluxPipeline`, so both give the same image from the same
`latents`. Latents live packed, as there: the VAE latent [B, 16, h, w] (h = H/8) cut into 2x2 patches, one
64-wide token per patch, [B, (h/2)(w/2), 64], row-major over the patch grid. The initial noise is drawn
unpacked ([B, 16, h, w], the reference's draw order, for seed parity) and packed in `prepare_latents`.
The loop itself (batching, dp, CFG and CFG parallel, step caches, output) is dit_rt.pipeline's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import torch

from dit_rt import checks
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

PACK = 2  # 2x2 latent patches per token
MAX_T5_TOKENS = 512  # the T5 sequence cap of FluxPipeline


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """VAE latents [B, C, h, w] -> tokens [B, (h/2)(w/2), 4C]; channel index c*4 + dy*2 + dx."""
    B, C, h, w = z.shape
    z = z.view(B, C, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)  # [B, h/2, w/2, C, 2, 2]
    return z.reshape(B, (h // PACK) * (w // PACK), C * PACK * PACK)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_latents`: tokens [B, (h/2)(w/2), 4C] -> [B, C, h, w]."""
    B, _, D = x.shape
    C = D // (PACK * PACK)
    x = x.view(B, h // PACK, w // PACK, C, PACK, PACK).permute(0, 3, 1, 4, 2, 5)  # [B, C, h/2, 2, w/2, 2]
    return x.reshape(B, C, h, w)


def image_ids(rows: int, cols: int, device=None, dtype=None) -> torch.Tensor:
    """RoPE positions of the image tokens: (0, row, col) row-major over the patch grid -> [rows*cols, 3]."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


def calculate_shift(seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float):
    """FLUX's mu: linear in the image token count, base_shift at base_seq_len, max_shift at max_seq_len."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + base_shift - m * base_seq_len


def constraints(folder: Path, index: dict) -> checks.Constraints:
    """What a FLUX.1 checkpoint accepts, from its VAE config alone: sizes on the VAE x 2x2-packing grid,
    single images, no input image."""
    from dit_rt import loaders
    from dit_rt.models.flux.vae import FluxVAEConfig

    vae = FluxVAEConfig.from_config(loaders.read_config(folder / "vae"))
    return checks.Constraints(spatial=vae.spatial_scale * PACK, single_frame=True, image="none")


class Shared(NamedTuple):
    """What both guidance branches share in `predict`."""

    img_ids: torch.Tensor  # [L, 3] RoPE positions of the image tokens
    guidance: float  # the embedded guidance scale


@register_pipeline("FluxPipeline")
class FluxPipeline(Pipeline):
    """Text-to-image for FLUX.1 checkpoints in the Hub Diffusers layout (FLUX.1-dev, FLUX.1-schnell)."""

    folder_constraints = staticmethod(constraints)

    def __init__(self, folder: Path, index: dict, options: RuntimeOptions, entry: Entry | None = None):
        from dit_rt import loaders
        from dit_rt.models.text import CLIPTokenizer, T5Tokenizer
        from dit_rt.schedulers import FlowMatchEulerScheduler

        build = self.start(folder, index, options, entry)
        self.tokenizer = CLIPTokenizer.from_folder(folder / "tokenizer")
        self.tokenizer_2 = T5Tokenizer.from_folder(folder / "tokenizer_2")
        self.text_encoder = build("text_encoder", self.dtype)
        self.text_encoder_2 = self.build_text_encoder(build, "text_encoder_2", "encoder.block")
        self.build_vae(build)
        self.build_transformer(build)
        self.offload_components(self.text_encoder, self.text_encoder_2, self.vae)
        self.scheduler_config = loaders.read_config(folder / "scheduler")
        self.scheduler = FlowMatchEulerScheduler.from_config(self.scheduler_config)
        self.vae_scale = self.vae.config.spatial_scale
        self.defaults = entry.defaults if entry else Defaults(1024, 1024, 1, 1, 28, 3.5)
        self.constraints = constraints(folder, index)
        self._grid_hw: tuple[int, int] | None = None  # (h, w) of the latest request's VAE latents

    # ---------------------------------------------------------------------------------------------- inputs

    def check_inputs(self, height, width, batch, latents):
        """Sizes on the VAE x packing grid; `latents`, when given, in the packed layout -> the unpacked
        noise shape of the whole batch (what the shared loop draws)."""
        c = self.constraints
        checks.check_multiple("height", height, c.spatial)
        checks.check_multiple("width", width, c.spatial)
        h, w = height // self.vae_scale, width // self.vae_scale
        channels = self.transformer.cfg.in_channels // (PACK * PACK)
        packed = (batch, (h // PACK) * (w // PACK), channels * PACK * PACK)
        layout = f"FluxPipeline's packed shape {packed} (batch, (H/16)*(W/16), 64)"
        checks.check_latents(latents, packed, layout)
        return (batch, channels, h, w)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[tuple[str, str]], max_sequence_length: int = MAX_T5_TOKENS):
        """(CLIP prompt, T5 prompt) pairs -> (T5 states [B, Lt, 4096], CLIP pooled [B, 768], txt_ids [Lt, 3]),
        as FluxPipeline.encode_prompt: CLIP padded to its 77 positions, T5 to max_sequence_length, neither
        encoder given a padding mask (the padding rows are kept)."""
        clip_ids = self.tokenizer.encode([p for p, _ in prompts])[0]
        t5_ids = self.tokenizer_2.encode([p for _, p in prompts], max_sequence_length)[0]
        with self.offload.use(self.text_encoder):
            pooled = self.text_encoder(clip_ids.to(self.device)).pooled
        with self.offload.use(self.text_encoder_2):
            states = self.text_encoder_2(t5_ids.to(self.device))
        txt_ids = torch.zeros(states.shape[1], 3, device=self.device, dtype=self.dtype)
        return states.to(self.dtype), pooled.to(self.dtype), txt_ids

    # ---------------------------------------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(
        self,
        prompt=None,
        negative_prompt=None,
        *,
        prompt_2=None,
        negative_prompt_2=None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        true_cfg_scale: float = 1.0,
        guidance_scale_2: float | None = None,
        flow_shift: float | None = None,
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        image=None,
        max_sequence_length: int = MAX_T5_TOKENS,
        progress_bar: bool = True,
        callback: StepCallback | None = None,
        output_type: str = "frames",
    ) -> GenerationOutput:
        """One image per prompt. guidance_scale: the embedded (distilled) guidance, one transformer pass per
        step; true_cfg_scale > 1 with a negative prompt adds an unconditional pass per step (v = v_neg +
        s (v_pos - v_neg)). prompt_2 / negative_prompt_2: the T5 prompts (default: prompt / negative_prompt).
        latents: FluxPipeline's packed layout [B, (H/16)(W/16), 64]. num_frames must be 1 (or None);
        guidance_scale_2 and flow_shift do not apply to FLUX (the shift follows the image size)."""
        name = self.model_name("this FLUX checkpoint")
        checks.check_image_use(self.constraints, image is not None, name)
        checks.check_not_applicable(
            name,
            ("guidance_scale_2", guidance_scale_2, "FLUX has one transformer"),
            ("flow_shift", flow_shift, "FLUX shifts its schedule by the image size (mu)"),
        )
        if num_frames is not None:
            checks.check_frames(num_frames, None, single_frame=True)
        prompts = self.prompt_list(prompt)
        prompts_2 = self._paired(prompt_2, prompts, "prompt_2")
        height, width, _, steps, g = self.resolve(height, width, 1, num_inference_steps, guidance_scale)
        checks.check_guidance("true_cfg_scale", true_cfg_scale, 1.0)
        checks.check_max_sequence_length(max_sequence_length, MAX_T5_TOKENS)
        checks.check_output_type(output_type)
        shape = self.check_inputs(height, width, len(prompts), latents)
        negatives = None
        if negative_prompt is not None and true_cfg_scale > 1:  # diffusers' rule for true CFG
            negs = self._paired(negative_prompt, prompts, "negative_prompt")
            negs_2 = self._paired(negative_prompt_2, negs, "negative_prompt_2")
            negatives = list(zip(negs, negs_2))
        elif negative_prompt is not None:
            log.warning(
                "dit_rt: negative_prompt is used only with true_cfg_scale > 1 (FLUX's true CFG); ignored"
            )
        self._grid_hw = shape[2:]  # the packed tokens do not record the aspect ratio: decode reads it
        if latents is not None:  # the loop and prepare_latents work on the unpacked draw
            latents = unpack_latents(latents, shape[2], shape[3])
        request = Request(
            prompts=list(zip(prompts, prompts_2)),
            negatives=negatives,
            shape=shape,
            steps=steps,
            guidance=(true_cfg_scale,),
            metadata=self.metadata(
                prompts,
                prompt_2=prompt_2,
                negative_prompt=negative_prompt,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=g,
                true_cfg_scale=true_cfg_scale if true_cfg_scale != 1.0 else None,
            ),
            latents=latents,
            seed=seed,
            encode=dict(max_sequence_length=max_sequence_length),
            extra=dict(guidance_scale=g),
            fps=self.defaults.fps,
            output_type=output_type,
            progress_bar=progress_bar,
            callback=callback,
        )
        return self.denoise(request)

    @staticmethod
    def _paired(value, prompts: list[str], name: str) -> list[str]:
        """A second prompt list matched to `prompts`: None -> prompts, one string -> repeated."""
        return list(prompts) if value is None else matched(value, prompts, name)

    # -------------------------------------------------------------------------------------------- loop hooks

    def prepare_latents(self, latents: torch.Tensor, r: Request):
        """The unpacked noise [B, 16, h, w] -> packed tokens [B, L, 64], and the image RoPE ids + guidance."""
        _, _, h, w = latents.shape
        ids = image_ids(h // PACK, w // PACK, self.device, self.dtype)
        return pack_latents(latents), Shared(ids, r.extra["guidance_scale"])

    def make_scheduler(self, r: Request):
        """FluxPipeline's schedule: sigmas linspace(1, 1/N, N), shifted by mu from the image token count."""
        from dit_rt.schedulers.common import linspace64

        cfg = self.scheduler.config
        _, _, h, w = r.shape
        mu = calculate_shift(
            (h // PACK) * (w // PACK),
            cfg.base_image_seq_len,
            cfg.max_image_seq_len,
            cfg.base_shift,
            cfg.max_shift,
        )
        sigmas = linspace64(1.0, 1 / r.steps, r.steps)  # NumPy's float64 linspace, as the reference
        self.scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=self.device)
        r.metadata["mu"] = round(mu, 6)
        return self.scheduler

    def predict(self, model, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The flow velocity for packed latents, with the embedded guidance of the request."""
        states, pooled, txt_ids = cond.prompt
        x = latents.to(self.dtype)
        B = x.shape[0]
        timestep = t.expand(B).to(self.dtype) / 1000  # rounded in the latent dtype first, as the reference
        guidance = None
        if model.cfg.guidance_embeds:
            guidance = torch.full((B,), cond.shared.guidance, device=x.device, dtype=torch.float32)
        return model(x, states, pooled, timestep, cond.shared.img_ids, txt_ids, guidance)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int | None = None, width: int | None = None):
        """Packed latents [B, L, 64] -> float32 frames (B, 1, H, W, C) in [0, 1] on the CPU. The packed
        layout does not record the aspect ratio: height / width default to the last generate()'s."""
        return self.decode_sized(latents, height, width, self.vae_scale)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents [B, L, 64] -> float32 frames [B, 1, H, W, 3] in [0, 1] on the device, at the
        latent size of the current request. Under parallel=, the ranks of a dp group decode together, each
        its own latent rows (dit_rt.parallel.vae)."""
        z = unpack_latents(latents, *self._grid_hw).to(self.vae_dtype)
        return self.vae_frames(self.vae.denormalize_latents(z))  # from [B, 16, h, w]
