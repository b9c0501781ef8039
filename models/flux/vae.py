"""FLUX.1 image VAE (diffusers `AutoencoderKL`, 16 latent channels): 8x spatial, images <-> latents.

Module names equal the Hub checkpoint keys (spec flux-encoders-schedulers.md A.8.4); the original Black
Forest Labs `ae.safetensors` loads through `loaders.mapping.FLUX_VAE_ORIGINAL`.

Why the code looks like this:
- The same 2-D conv net serves other AutoencoderKL checkpoints (SD-style 4-channel, with quant convs): the
  config decides widths, depth, latent channels and whether `quant_conv` / `post_quant_conv` exist.
- GroupNorm statistics span the whole image, so a parallel stripe decode needs them reduced over the
  ranks: `row_split` declares the GroupNorms as `frame_stats` (dit_rt.parallel.vae), the 3x3 convs as halo
  convs and the mid-block attention as frame-global. Downsampling convs (stride 2) are encoder-only.
- Activations may run channels-last (cuDNN's preferred conv layout on CUDA); the mid-block attention's
  q/k/v are GEMMs over [B, H, W, C] pixel rows, a free view of a channels-last tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dit_rt.models.posterior import DiagonalGaussian
from dit_rt.ops.attention import attention
from dit_rt.ops.group_norm import GroupNorm
from dit_rt.parallel.vae import RowSplit

GN_EPS = 1e-6


@dataclass(frozen=True)
class FluxVAEConfig:
    """The Hub `vae/config.json` of `AutoencoderKL` (FLUX.1 values are the defaults, spec A.8.1)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # the decoder has one more resnet per up block
    latent_channels: int = 16
    norm_num_groups: int = 32
    act_fn: str = "silu"
    scaling_factor: float = 0.3611
    shift_factor: float | None = 0.1159
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4

    def __post_init__(self):
        n = len(self.block_out_channels)
        if self.act_fn != "silu":
            raise ValueError(f"FluxVAE implements act_fn='silu'; got {self.act_fn!r}")
        if set(self.down_block_types) - {"DownEncoderBlock2D"} or len(self.down_block_types) != n:
            raise ValueError(
                f"down_block_types must be {n} x DownEncoderBlock2D; got {self.down_block_types}"
            )
        if set(self.up_block_types) - {"UpDecoderBlock2D"} or len(self.up_block_types) != n:
            raise ValueError(f"up_block_types must be {n} x UpDecoderBlock2D; got {self.up_block_types}")

    @classmethod
    def from_config(cls, config: dict) -> FluxVAEConfig:
        """Read a Hub `vae/config.json` dict; bookkeeping and unused keys ('_class_name', 'sample_size',
        'force_upcast', 'latents_mean', ...) are ignored; lists become tuples."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in known})

    @property
    def spatial_scale(self) -> int:
        """Pixels per latent along each side (8 for FLUX.1)."""
        return 2 ** (len(self.block_out_channels) - 1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return GroupNorm(groups, channels, eps=GN_EPS, affine=True)  # Triton channels-last path on CUDA


class ResnetBlock2D(nn.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1x1 conv shortcut when channels change."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, Cin, H, W] -> [B, Cout, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of an image, residual around it."""

    def __init__(self, dim: int, groups: int):
        super().__init__()
        self.group_norm = _norm(dim, groups)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        rows = self.group_norm(x).permute(0, 2, 3, 1).reshape(b, h * w, 1, c)  # [B, HW, 1, C]
        q, k, v = self.to_q(rows), self.to_k(rows), self.to_v(rows)
        o = attention(q, k, v).reshape(b, h, w, c)  # through the seam; head_dim = C (512 at real size)
        return x + self.to_out[0](o).permute(0, 3, 1, 2)


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the bottleneck width."""

    def __init__(self, dim: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(dim, dim, groups), ResnetBlock2D(dim, dim, groups)])
        self.attentions = nn.ModuleList([AttnBlock(dim, groups)]) if add_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample2D(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 conv: [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Nearest 2x (an exact copy in any dtype), then a 3x3 conv: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EncoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(cin if j == 0 else cout, cout, groups) for j in range(layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(cout)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(cin if j == 0 else cout, cout, groups) for j in range(layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    def __init__(self, cfg: FluxVAEConfig):
        super().__init__()
        dims, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, dims[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(dims[max(i - 1, 0)], dims[i], cfg.layers_per_block, g, downsample=i < n - 1)
            for i in range(n)
        )
        self.mid_block = MidBlock(dims[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = _norm(dims[-1], g)
        self.conv_out = nn.Conv2d(dims[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, 3, H, W] -> [B, 2Z, H/8, W/8] (mean and log-variance halves)
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: FluxVAEConfig):
        super().__init__()
        dims, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(dims[max(i - 1, 0)], dims[i], cfg.layers_per_block + 1, g, upsample=i < n - 1)
            for i in range(n)
        )
        self.conv_norm_out = _norm(dims[-1], g)
        self.conv_out = nn.Conv2d(dims[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # [B, Z, h, w] -> [B, 3, 8h, 8w]
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class FluxVAE(nn.Module):
    """AutoencoderKL: images [B, 3, H, W] in [-1, 1] <-> latents [B, Z, H/8, W/8] (Z = 16 for FLUX.1)."""

    # Parallel decode over latent row stripes (dit_rt.parallel.vae): stride-1 3x3 convs take a halo of
    # neighbouring rows, GroupNorm statistics are reduced over the ranks, and the mid-block attention over
    # all H*W positions sees the whole image.
    row_split: ClassVar[RowSplit] = RowSplit(
        halo=(nn.Conv2d,), frame_global=(AttnBlock,), frame_stats=(nn.GroupNorm,)
    )

    def __init__(self, config: FluxVAEConfig | None = None):
        super().__init__()
        self.config = config = config or FluxVAEConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        z2 = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(z2, z2, 1) if config.use_quant_conv else None
        self.post_quant_conv = (
            nn.Conv2d(config.latent_channels, config.latent_channels, 1)
            if config.use_post_quant_conv
            else None
        )

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.config.shift_factor or 0.0

    # ---- latent normalisation (FluxPipeline's formulas) ----

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> DiT latents: (z - shift_factor) * scaling_factor."""
        return (z - self.shift_factor) * self.scaling_factor

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """DiT latents -> VAE latents: z / scaling_factor + shift_factor."""
        return z / self.scaling_factor + self.shift_factor

    # ---- encode / decode ----

    @staticmethod
    def _layout(x: torch.Tensor, channels_last: bool | None) -> torch.Tensor:
        if channels_last if channels_last is not None else x.is_cuda:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()

    @torch.no_grad()
    def encode(self, x: torch.Tensor, *, channels_last: bool | None = None) -> DiagonalGaussian:
        """Images [B, 3, H, W] in [-1, 1] -> posterior over latents [B, Z, H/8, W/8] (VAE scale; see
        `normalize_latents`). channels_last: activation layout; None picks channels-last on CUDA."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"encode needs images [B, {self.config.in_channels}, H, W]; got {list(x.shape)}")
        moments = self.encoder(self._layout(x, channels_last))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)  # [B, Z, h, w] each
        return DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))

    @torch.no_grad()
    def decode(
        self, z: torch.Tensor, *, chunk: int | None = None, channels_last: bool | None = None
    ) -> torch.Tensor:
        """Latents [B, Z, h, w] (VAE scale, see `denormalize_latents`) -> images [B, 3, 8h, 8w], unclamped.

        chunk: images per decoder pass (memory grows linearly with it); None = the whole batch at once.
        channels_last: activation layout; None picks channels-last on CUDA.
        """
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"decode needs latents [B, {self.config.latent_channels}, h, w]; got {list(z.shape)}"
            )
        z = self._layout(z, channels_last)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        if chunk is None or chunk >= z.shape[0]:
            return self.decoder(z)
        return torch.cat([self.decoder(part) for part in z.split(chunk)])

    def decode_flops(self, latent_shape: tuple[int, int, int, int]) -> int:
        """Multiply-add FLOPs (2 per MAC) of `decode` for latents [B, Z, h, w]: convs, the attention's
        projections and its QK^T / PV products (norms and activations are not counted)."""
        flops = 0

        def conv(module, args, out):
            nonlocal flops
            flops += 2 * out.numel() * module.weight[0].numel()

        def attn(module, args, out):
            nonlocal flops
            b, c, h, w = out.shape
            n = b * h * w
            flops += 2 * n * c * 4 * c + 4 * n * h * w * c  # q, k, v, out GEMMs, then QK^T and PV

        with torch.device("meta"):
            meta = FluxVAE(self.config)
        handles = [m.register_forward_hook(conv) for m in meta.modules() if isinstance(m, nn.Conv2d)]
        handles += [m.register_forward_hook(attn) for m in meta.modules() if isinstance(m, AttnBlock)]
        try:
            meta.decode(torch.empty(latent_shape, device="meta"), channels_last=False)
        finally:
            for handle in handles:
                handle.remove()
        return flops


__all__ = ["DiagonalGaussian", "FluxVAE", "FluxVAEConfig"]
