"""The Gaussian posterior a VAE's `encode` returns (diffusers' `latent_dist`), shared by the VAE families."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DiagonalGaussian:
    """mean and logvar ([B, Z, h, w] or [B, Z, T', h, w]); logvar clamped to [-30, 20] by the encoder."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps, eps ~ N(0, 1) of the mean's shape and dtype, drawn on the generator's device
        and moved to the mean's: the same draw as diffusers' `randn_tensor` for one generator."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)
