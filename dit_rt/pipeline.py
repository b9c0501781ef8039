"""Pieces every pipeline shares: the output container, seeded noise, guidance, step-loop progress."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class GenerationOutput:
    """What `generate` returns.

    frames:   float32 (B, T, H, W, C) in [0, 1] on the CPU; T == 1 for image models. Empty (0 elements)
              when generated with output_type="latents".
    latents:  the final denoised latents, before the VAE, in the reference pipeline's latent layout.
    stats:    counters such as transformer evaluations computed / skipped by a step cache.
    seed:     the seed the initial noise was drawn from (drawn at random when none was given), or None when
              the caller passed `latents`.
    metadata: what produced the output (prompt, seed, model, sizes, steps, guidance, runtime options);
              `save` writes it into the file.
    """

    frames: torch.Tensor
    latents: torch.Tensor
    fps: int = 16
    stats: dict = field(default_factory=dict)
    seed: int | None = None
    metadata: dict = field(default_factory=dict)

    def save(
        self, path: str | Path, *, index: int = 0, fps: int | None = None, metadata: dict | None = None
    ) -> list[Path]:
        """Write batch item `index` to `path` (.mp4 / .gif / .png / .webp by extension); returns the files.

        fps: None uses the model's frame rate. metadata: None writes `self.metadata` (batch lists narrowed to
        item `index`); {} writes none.
        """
        from dit_rt import media

        if self.frames.numel() == 0:
            raise ValueError(
                "this output holds latents only (output_type='latents'): decode them with "
                "pipe.decode(out.latents) and save the frames with dit_rt.media.save, or generate with "
                "output_type='frames'"
            )
        if not 0 <= index < len(self.frames):
            raise IndexError(f"index {index} is outside the batch of {len(self.frames)}")
        if metadata is None:
            metadata = {
                k: v[index] if isinstance(v, list) and len(v) == len(self.frames) else v
                for k, v in self.metadata.items()
            }
        return media.save(self.frames[index], path, fps=self.fps if fps is None else fps, metadata=metadata)


def as_prompt_list(prompt, name: str = "prompt") -> list[str]:
    """A str or a list of str -> list of str; anything else is a clear error."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{name} must be a string or a non-empty list of strings, got {type(prompt).__name__}")


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator on `device`; the same seed gives the same noise on the same device."""
    if seed is not None and not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance as Wan and FLUX apply it: uncond + s * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def progress(steps: Iterable, enabled: bool, desc: str = "denoising") -> Iterable:
    if not enabled:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc=desc, leave=False)


StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
"""callback(step_index, timestep, latents) called after each denoising step."""
