"""FLUX.2 image VAE (diffusers `AutoencoderKLFlux2`, 32 latent channels) and its latent normalizer.

The conv net is FLUX.1's AutoencoderKL (models/flux/vae.py) with both 1x1 quant convs and 32 latent
channels, so `Flux2VAE` is `FluxVAE` built from that config. What FLUX.2 adds is how the transformer sees
the latents (spec flux-encoders-schedulers.md B.5): 2x2 patches of the [B, 32, h, w] latent become 128
channels (index c*4 + dy*2 + dx) at half the resolution, normalized per channel by the stored statistics of
an affine-free BatchNorm (`bn.running_mean` / `bn.running_var`, eps `batch_norm_eps`) that is never run
as a layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dit_rt.models.flux.vae import FluxVAE, FluxVAEConfig

PATCH = 2  # 2x2 latent patches per transformer channel group


@dataclass(frozen=True)
class Flux2VAEConfig(FluxVAEConfig):
    """The Hub `vae/config.json` of `AutoencoderKLFlux2` (FLUX.2-dev values are the defaults)."""

    latent_channels: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 1.0  # unused by FLUX.2: the batch-norm statistics normalize instead
    shift_factor: float | None = None
    batch_norm_eps: float = 1e-4
    patch_size: tuple[int, ...] = (PATCH, PATCH)
    decoder_block_out_channels: tuple[int, ...] | None = None  # None: block_out_channels

    def __post_init__(self):
        super().__post_init__()
        if tuple(self.patch_size) != (PATCH, PATCH):
            raise ValueError(f"patch_size {self.patch_size}: FLUX.2 latents are patchified 2x2")
        if self.decoder_block_out_channels not in (None, self.block_out_channels):
            raise ValueError(
                f"decoder_block_out_channels {self.decoder_block_out_channels} differ from "
                f"block_out_channels {self.block_out_channels}; dit_rt builds the decoder from the latter"
            )

    @property
    def patch_channels(self) -> int:
        """Channels of a patchified latent (128 for FLUX.2)."""
        return math.prod(self.patch_size) * self.latent_channels


class Flux2VAE(FluxVAE):
    """AutoencoderKLFlux2: images [B, 3, H, W] in [-1, 1] <-> latents [B, 32, H/8, W/8], plus the
    patchified, normalized form [B, 128, H/16, W/16] the transformer reads (`to_transformer` /
    `from_transformer`)."""

    def __init__(self, config: Flux2VAEConfig | None = None):
        super().__init__(config or Flux2VAEConfig())
        c = self.config
        # Holds the checkpoint's `bn.*` statistics only; never called.
        self.bn = nn.BatchNorm2d(c.patch_channels, eps=c.batch_norm_eps, affine=False)

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) [1, 128, 1, 1] in z's dtype, std = sqrt(running_var + eps) computed in the buffers'
        dtype first (the reference's order)."""
        mean = self.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.config.batch_norm_eps)
        return mean.to(z.device, z.dtype), std.to(z.device, z.dtype)

    @staticmethod
    def patchify(z: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, 4C, h/2, w/2], channel index c*4 + dy*2 + dx."""
        B, C, h, w = z.shape
        z = z.view(B, C, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 1, 3, 5, 2, 4)
        return z.reshape(B, C * PATCH * PATCH, h // PATCH, w // PATCH)

    @staticmethod
    def unpatchify(z: torch.Tensor) -> torch.Tensor:
        """Inverse of `patchify`: [B, 4C, h/2, w/2] -> [B, C, h, w]."""
        B, C4, h2, w2 = z.shape
        z = z.view(B, C4 // (PATCH * PATCH), PATCH, PATCH, h2, w2).permute(0, 1, 4, 2, 5, 3)
        return z.reshape(B, C4 // (PATCH * PATCH), h2 * PATCH, w2 * PATCH)

    def to_transformer(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents [B, 32, h, w] -> the transformer's [B, 128, h/2, w/2]: patchify, then normalize."""
        z = self.patchify(z)
        mean, std = self._stats(z)
        return (z - mean) / std

    def from_transformer(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_transformer`: [B, 128, h/2, w/2] -> VAE latents [B, 32, h, w]."""
        mean, std = self._stats(z)
        return self.unpatchify(z * std + mean)


__all__ = ["Flux2VAE", "Flux2VAEConfig"]
