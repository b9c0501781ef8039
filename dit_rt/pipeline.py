"""Pieces every pipeline shares: the output container, seeded noise, guidance, step-loop progress."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class GenerationOutput:
    """What `generate` returns.

    frames:  float32 (B, T, H, W, C) in [0, 1] on the CPU; T == 1 for image models.
    latents: the final denoised latents, before the VAE, in the reference pipeline's latent layout.
    stats:   counters such as transformer evaluations computed / skipped by a step cache.
    """

    frames: torch.Tensor
    latents: torch.Tensor
    fps: int = 16
    stats: dict = field(default_factory=dict)

    def save(self, path: str | Path, *, index: int = 0, fps: int | None = None) -> list[Path]:
        """Write batch item `index` to `path` (.mp4 / .gif / .png / .webp by extension)."""
        from dit_rt import media

        if not 0 <= index < len(self.frames):
            raise IndexError(f"index {index} is outside the batch of {len(self.frames)}")
        return media.save(self.frames[index], path, fps=fps or self.fps)


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
