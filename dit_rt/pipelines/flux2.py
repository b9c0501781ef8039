"""FLUX.2 text-to-image with optional reference images (FLUX.2-dev): Mistral-Small text states, flow-match
Euler with the empirical mu, embedded guidance (one transformer pass per step), the 32-channel VAE.

Step for step the same computation as diffusers' `Flux2Pipeline`, so both give the same image from the same
`latents`. Latents are the VAE latent [B, 32, h, w] (h = H/8) patchified 2x2 into [B, 128, h/2, w/2] and
normalized by the VAE's batch-norm statistics (models/flux/vae2.py); `latents=` and the initial noise take
that shape (the reference's draw), and the loop runs on its tokens, [B, (h/2)(w/2), 128] row-major (what
`out.latents` holds, as the reference's output_type="latent"). Reference images are encoded once (posterior
mode), become tokens of the same form with RoPE ids (10 k, row, col, 0) for the k-th image, and ride after
the noisy tokens in every transformer call; their predictions are dropped. The loop itself (batching, dp,
step caches, output) is dit_rt.pipeline's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch

from dit_rt import checks
from dit_rt.catalog import Defaults, Entry
from dit_rt.offload import apply_offload
from dit_rt.pipeline import (
    Conditioning,
    GenerationOutput,
    Pipeline,
    Request,
    StepCallback,
    register_pipeline,
)
from dit_rt.runtime import RuntimeOptions

PATCH = 2  # 2x2 latent patches per token
MAX_TOKENS = 512  # Flux2Pipeline's max_sequence_length default
REF_T = 10  # RoPE time coordinate step between reference images: 10, 20, ...
REF_MIN_SIDE, REF_MAX_ASPECT, REF_MAX_AREA = 64, 8, 1024 * 1024  # Flux2ImageProcessor's limits


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's schedule shift: linear in the step count through the 10-step and 200-step fits of mu against
    the image token count; above 4300 tokens the 200-step fit alone."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    m200 = a2 * image_seq_len + b2
    if image_seq_len > 4300:
        return float(m200)
    m10 = a1 * image_seq_len + b1
    slope = (m200 - m10) / 190.0
    return float(slope * num_steps + (m200 - 200.0 * slope))


def pack(z: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> tokens [B, h*w, C], row-major."""
    return z.flatten(2).transpose(1, 2)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack`: [B, h*w, C] -> [B, C, h, w]."""
    return x.transpose(1, 2).unflatten(2, (h, w))


def grid_ids(rows: int, cols: int, t: int = 0) -> torch.Tensor:
    """RoPE positions (t, row, col, 0) of a token grid, row-major -> [rows*cols, 4]."""
    ids = torch.zeros(rows, cols, 4)
    ids[..., 0] = t
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 4)


def reference_image(image, multiple: int) -> torch.Tensor:
    """A reference image as Flux2Pipeline prepares it: float32 [1, 3, H, W] in [-1, 1], at most 1024^2
    pixels (larger ones are Lanczos-resized to that area), center-cropped to multiples of `multiple`.
    Any dit_rt image input is taken (PIL, path, array, tensor); sides under 64 px or an aspect ratio over
    8 are an error, as in the reference."""
    from dit_rt.image import load_image

    x = load_image(image)  # [3, H, W] in [0, 1]; PIL / file pixels exactly k / 255
    _, h, w = x.shape
    if min(h, w) < REF_MIN_SIDE:
        raise ValueError(f"reference image {w}x{h}: both sides must be at least {REF_MIN_SIDE} px")
    if max(w / h, h / w) > REF_MAX_ASPECT:
        raise ValueError(f"reference image {w}x{h}: the aspect ratio must be at most {REF_MAX_ASPECT}:1")
    if w * h > REF_MAX_AREA:
        scale = math.sqrt(REF_MAX_AREA / (w * h))
        x = _lanczos(x, int(w * scale), int(h * scale))
        _, h, w = x.shape
    ch, cw = h // multiple * multiple, w // multiple * multiple
    top, left = (h - ch) // 2, (w - cw) // 2
    return (2 * x[:, top : top + ch, left : left + cw] - 1)[None]


def _lanczos(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """float [3, H, W] in [0, 1] -> PIL Lanczos resize (the reference's) -> float [3, height, width]."""
    import PIL.Image

    hwc = (x * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    img = PIL.Image.frombytes("RGB", (hwc.shape[1], hwc.shape[0]), hwc.numpy().tobytes())
    img = img.resize((width, height), PIL.Image.Resampling.LANCZOS)
    out = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return out.permute(2, 0, 1).float() / 255


def constraints(folder: Path, index: dict) -> checks.Constraints:
    """What a FLUX.2 checkpoint accepts, from its VAE config alone: sizes on the VAE x 2x2-patch grid,
    single images, optional reference images."""
    from dit_rt import loaders
    from dit_rt.models.flux.vae2 import Flux2VAEConfig

    vae = Flux2VAEConfig.from_config(loaders.read_config(folder / "vae"))
    return checks.Constraints(spatial=vae.spatial_scale * PATCH, single_frame=True, image="optional")


class Shared(NamedTuple):
    """What `predict` needs beside the prompt: RoPE ids and tokens of the reference images, guidance."""

    img_ids: torch.Tensor  # [L + Lr, 4]: the noisy image's ids, then the reference images'
    ref_tokens: torch.Tensor | None  # [B, Lr, 128] normalized reference latents, or None
    guidance: float  # the embedded guidance scale


@register_pipeline("Flux2Pipeline")
class Flux2Pipeline(Pipeline):
    """Text-to-image with optional reference images for FLUX.2 checkpoints in the Hub Diffusers layout."""

    folder_constraints = staticmethod(constraints)
    # the 24B text encoder is quantized by linear= and streamed by offload="block" like the transformer
    quantized_components = ("transformer", "text_encoder")
    streamed_components = ("transformer", "text_encoder")

    def __init__(self, folder: Path, index: dict, options: RuntimeOptions, entry: Entry | None = None):
        from dit_rt import loaders
        from dit_rt.models.text.mistral import Flux2PromptTokenizer
        from dit_rt.schedulers import FlowMatchEulerScheduler

        build = self.start(folder, index, options, entry)
        self.tokenizer = Flux2PromptTokenizer.from_folder(folder / "tokenizer")
        # The 24B text stack takes the transformer's weight format and is sharded / block-offloaded like it:
        # FLUX.2-dev fits one GPU only with both quantized, or both streamed.
        self.text_encoder = self.build_text_encoder(build, "text_encoder", None, options.linear_format)
        self.build_vae(build)
        self.build_transformer(build)
        self.text_offload = None
        if options.offload == "block":  # the text encoder streams its blocks like the transformer
            self.text_offload = apply_offload(self.text_encoder, "block", device=self.device)
            self.offload_components(self.vae)
        else:
            self.offload_components(self.text_encoder, self.vae)
        self.scheduler = FlowMatchEulerScheduler.from_config(loaders.read_config(folder / "scheduler"))
        self.grid = self.vae.config.spatial_scale * PATCH  # pixels per token side (16)
        self.defaults = entry.defaults if entry else Defaults(1024, 1024, 1, 1, 50, 4.0)
        self.constraints = constraints(folder, index)
        self._grid_hw: tuple[int, int] | None = None  # (rows, cols) of the latest request's token grid

    # ---------------------------------------------------------------------------------------------- inputs

    def check_inputs(self, height, width, batch, latents):
        """Sizes on the 16-pixel token grid; `latents`, when given, in Flux2Pipeline's patchified layout ->
        the noise shape of the whole batch (what the shared loop draws)."""
        checks.check_multiple("height", height, self.grid)
        checks.check_multiple("width", width, self.grid)
        shape = (batch, self.transformer.cfg.in_channels, height // self.grid, width // self.grid)
        checks.check_latents(latents, shape, f"Flux2Pipeline's shape {shape} (batch, 128, H/16, W/16)")
        return shape

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], max_sequence_length: int = MAX_TOKENS):
        """Prompts -> (text states [B, Lt, 3 x hidden], txt_ids [Lt, 4]) as Flux2Pipeline: the chat-formatted
        prompt ("[IMG]" removed) padded to max_sequence_length, the hidden states of text layers 10, 20 and 30
        stacked per token; the padding rows are kept. txt_ids (0, 0, 0, l)."""
        ids, mask = self.tokenizer.encode([p.replace("[IMG]", "") for p in prompts], max_sequence_length)
        with self.offload.use(self.text_encoder):
            states = self.text_encoder(ids.to(self.device), mask.to(self.device))
        if self.text_offload is not None:  # its layer slots are not needed again until the next prompt
            self.text_offload.release()
        txt_ids = torch.zeros(states.shape[1], 4, device=self.device, dtype=self.dtype)
        txt_ids[:, 3] = torch.arange(states.shape[1], device=self.device)
        return states.to(self.dtype), txt_ids

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
        max_sequence_length: int = MAX_TOKENS,
        progress_bar: bool = True,
        callback: StepCallback | None = None,
        output_type: str = "frames",
    ) -> GenerationOutput:
        """One image per prompt. guidance_scale: the embedded guidance (one transformer pass per step).
        image: None, one reference image or a list of them (PIL, path, array, tensor), shared by the whole
        batch; height / width default to the first reference's (cropped) size, else the model's default.
        latents: Flux2Pipeline's layout [B, 128, H/16, W/16]. num_frames must be 1 (or None);
        negative_prompt, guidance_scale_2 and flow_shift do not apply to FLUX.2."""
        checks.check_not_applicable(
            self.model_name("this FLUX.2 checkpoint"),
            ("negative_prompt", negative_prompt, "FLUX.2 embeds its guidance: no unconditional pass"),
            ("guidance_scale_2", guidance_scale_2, "FLUX.2 has one transformer"),
            ("flow_shift", flow_shift, "FLUX.2 shifts its schedule by the image size and steps (mu)"),
        )
        if num_frames is not None:
            checks.check_frames(num_frames, None, single_frame=True)
        prompts = self.prompt_list(prompt)
        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        refs = [reference_image(im, self.grid) for im in images]  # [1, 3, H, W] each, in [-1, 1]
        if refs:
            height = refs[0].shape[2] if height is None else height
            width = refs[0].shape[3] if width is None else width
        height, width, _, steps, g = self.resolve(height, width, 1, num_inference_steps, guidance_scale)
        checks.check_positive_int("max_sequence_length", max_sequence_length, MAX_TOKENS)
        checks.check_output_type(output_type)
        shape = self.check_inputs(height, width, len(prompts), latents)
        self._grid_hw = shape[2:]  # the tokens do not record the aspect ratio: decode reads it
        metadata = self.metadata(
            prompts,
            reference_images=len(refs) or None,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=g,
        )
        request = Request(
            prompts=prompts,
            negatives=None,
            shape=shape,
            steps=steps,
            guidance=(1.0,),
            metadata=metadata,
            latents=latents,
            seed=seed,
            encode=dict(max_sequence_length=max_sequence_length),
            extra=dict(guidance_scale=g, references=refs),
            fps=self.defaults.fps,
            output_type=output_type,
            progress_bar=progress_bar,
            callback=callback,
        )
        return self.denoise(request)

    # -------------------------------------------------------------------------------------------- loop hooks

    def prepare_latents(self, latents: torch.Tensor, r: Request):
        """The noise [B, 128, h, w] -> tokens [B, h*w, 128]; the reference images encoded once into tokens
        after them (each image its own RoPE time coordinate), repeated over this group's batch."""
        B, _, h, w = latents.shape
        ids, tokens = [grid_ids(h, w)], []
        for k, image in enumerate(r.extra["references"]):
            with self.offload.use(self.vae):
                posterior = self.vae.encode(image.to(self.device, self.vae_dtype))
            z = self.vae.to_transformer(posterior.mode())  # [1, 128, h_k, w_k]
            ids.append(grid_ids(z.shape[2], z.shape[3], REF_T * (k + 1)))
            tokens.append(pack(z))
        refs = torch.cat(tokens, dim=1).expand(B, -1, -1) if tokens else None  # [B, Lr, 128]
        img_ids = torch.cat(ids).to(self.device, self.dtype)
        return pack(latents), Shared(img_ids, refs, r.extra["guidance_scale"])

    def make_scheduler(self, r: Request):
        """Flux2Pipeline's schedule: sigmas linspace(1, 1/N, N), shifted by the empirical mu."""
        from dit_rt.schedulers.common import linspace64

        _, _, h, w = r.shape
        mu = compute_empirical_mu(h * w, r.steps)
        sigmas = linspace64(1.0, 1 / r.steps, r.steps)  # NumPy's float64 linspace, as the reference
        self.scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=self.device)
        r.metadata["mu"] = round(mu, 6)
        return self.scheduler

    def predict(self, model, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The flow velocity of the noisy tokens (reference tokens join the call, their output is dropped)."""
        states, txt_ids = cond.prompt
        shared: Shared = cond.shared
        x = latents.to(self.dtype)
        B, L = x.shape[:2]
        if shared.ref_tokens is not None:
            x = torch.cat([x, shared.ref_tokens.to(self.dtype)], dim=1)
        timestep = t.expand(B).to(self.dtype) / 1000  # rounded in the latent dtype first, as the reference
        guidance = torch.full((B,), shared.guidance, device=x.device, dtype=torch.float32)
        return model(x, states, timestep, shared.img_ids, txt_ids, guidance)[:, :L]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int | None = None, width: int | None = None):
        """Tokens [B, L, 128] -> float32 frames (B, 1, H, W, C) in [0, 1] on the CPU. The tokens do not
        record the aspect ratio: height / width default to the last generate()'s."""
        return self.decode_sized(latents, height, width, self.grid)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Tokens [B, L, 128] -> float32 frames [B, 1, H, W, 3] in [0, 1] on the device, at the token grid
        of the current request. Under parallel=, the ranks of a dp group decode together
        (dit_rt.parallel.vae)."""
        z = self.vae.from_transformer(unpack(latents, *self._grid_hw).to(self.vae_dtype))  # [B, 32, h, w]
        return self.vae_frames(z)
