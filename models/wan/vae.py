"""Wan 2.1 video VAE (diffusers `AutoencoderKLWan`): causal 3-D conv encoder/decoder, 4x time, 8x space.

Used by Wan 2.1, Wan 2.2 A14B and Cosmos Predict2/2.5. Module names equal the Hub checkpoint keys.

Why the code looks like this:
- Causality is exact under any chunking. Every temporal-kernel-3 conv keeps the last two frames of its
  time-padded input in a `CausalCache`; the first call pads with zeros instead. A chunked pass therefore
  equals one pass over the whole clip, whatever the chunk sizes, and the reference's one-latent-frame chunks
  are one special case. Decoding a few latent frames per chunk bounds memory (the full 81x480x832 clip at
  96 channels is 6 GiB per activation in bf16) without a Python loop per frame.
- Activations stay channels-last (`torch.channels_last_3d`) on CUDA: cuDNN's implicit-GEMM convs want it,
  the channel RMS norm becomes a fused `F.rms_norm` over the innermost axis, and the per-frame 2-D ops are
  free views. Spatial zero padding is left to the conv itself, so a causal conv costs one concat, not two.
- Convs run in the model dtype as in the reference; the RMS norm reduces in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dit_rt.models.posterior import DiagonalGaussian as LatentDist
from dit_rt.ops.attention import attention
from dit_rt.ops.elementwise import rms_norm_silu_
from dit_rt.parallel.vae import RowSplit

LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class WanVAEConfig:
    """The Hub `vae/config.json` of `AutoencoderKLWan` (Wan 2.1 VAE values are the defaults)."""

    base_dim: int = 96
    decoder_base_dim: int | None = None  # None: base_dim
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()  # encoder only, as in the reference
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # (sic), the checkpoint's key
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int = 4
    scale_factor_spatial: int = 8

    def __post_init__(self):
        if self.is_residual or self.patch_size is not None:
            raise ValueError(
                "WanVAE implements the Wan 2.1 VAE; the Wan 2.2 TI2V-5B VAE (is_residual / patch_size) "
                "is not supported"
            )
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("temperal_downsample needs len(dim_mult) - 1 entries")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean / latents_std need z_dim={self.z_dim} values each")

    @classmethod
    def from_config(cls, config: dict) -> WanVAEConfig:
        """Read a Hub `vae/config.json` dict; diffusers' bookkeeping keys ('_class_name', ...) and keys
        this architecture has no use for are ignored; lists become tuples; null scale factors default."""
        known = {f.name for f in fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in known}
        for k in ("scale_factor_temporal", "scale_factor_spatial"):
            if kw.get(k, 0) is None:
                del kw[k]
        return cls(**kw)

    @property
    def decoder_dim(self) -> int:
        return self.decoder_base_dim or self.base_dim

    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        return self.temperal_downsample[::-1]


@dataclass(frozen=True)
class VAETiling:
    """Spatial tiling of the decode, in pixels; defaults are diffusers' (`enable_tiling()`)."""

    min_height: int = 256  # a latent wider/taller than min // 8 is tiled
    min_width: int = 256
    stride_height: int = 192  # overlap = min - stride, linearly blended
    stride_width: int = 192


@dataclass
class CausalCache:
    """Temporal state of one chunked encode/decode: per layer, the frames the next chunk needs."""

    frames: dict[nn.Module, torch.Tensor] = field(default_factory=dict)
    started: set[nn.Module] = field(default_factory=set)  # resamples that have seen clip frame 0


def frame_major(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W]; a view when x is channels-last (the Cosmos tokenizer's too)."""
    return x.transpose(1, 2).flatten(0, 1)


def channel_major(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[B*T, C, H, W] -> [B, C, T, H, W]; a view."""
    return x.unflatten(0, (batch, -1)).transpose(1, 2)


class CausalConv3d(nn.Module):
    """Conv3d causal in time: output frame t sees input frames t-2..t (kernel 3), zeros before the clip.

    Spatial padding is symmetric (k // 2). With a `CausalCache` the two history frames come from the
    previous chunk, so chunked calls equal one call on the concatenated clip.
    """

    def __init__(self, cin: int, cout: int, kernel=(3, 3, 3), stride=(1, 1, 1), causal: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, *kernel))
        self.bias = nn.Parameter(torch.empty(cout))
        self.stride = stride
        self.padding = (0, kernel[1] // 2, kernel[2] // 2)
        self.history = kernel[0] - 1 if causal else 0

    def forward(
        self,
        x: torch.Tensor,
        cache: CausalCache | None = None,
        silu: bool = False,
        norm: RMSNorm | None = None,
    ) -> torch.Tensor:
        # x [B, Cin, T, H, W] -> [B, Cout, T, H, W]; silu=True convolves silu(x), with `norm` silu(norm(x))
        fused = norm is not None and silu and self.history and not torch.is_grad_enabled()
        if norm is not None and not fused:
            x = norm(x)
        if not self.history:
            return F.conv3d(F.silu(x) if silu else x, self.weight, self.bias, self.stride, self.padding)
        n, (b, c, t, h, w) = self.history, x.shape
        fmt = torch.channels_last_3d if x.is_contiguous(memory_format=torch.channels_last_3d) else None
        padded = torch.empty(
            b, c, n + t, h, w, dtype=x.dtype, device=x.device, memory_format=fmt or torch.contiguous_format
        )
        prev = cache.frames.get(self) if cache is not None else None
        if prev is None:
            padded[:, :, :n].zero_()
        else:
            padded[:, :, :n].copy_(prev)
        # The activation writes straight into the time-padded buffer: one pass instead of silu + concat (and
        # with the norm, one pass instead of norm + silu + concat).
        if fused:
            norm.silu_into(padded[:, :, n:], x)
        elif silu and not torch.is_grad_enabled():
            torch.ops.aten.silu.out(x, out=padded[:, :, n:])
        else:  # out= has no autograd
            padded[:, :, n:].copy_(F.silu(x) if silu else x)
        if cache is not None:
            # The padded input's tail: real frames, or zeros while the clip is shorter than the kernel.
            cache.frames[self] = padded[:, :, -n:].clone()
        return F.conv3d(padded, self.weight, self.bias, self.stride, self.padding)


class RMSNorm(nn.Module):
    """y = x / ||x||_channels * sqrt(C) * gamma over dim 1 (`WanRMS_norm`); gamma [C, 1, 1(, 1)]."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x / ||x|| * sqrt(C) == x * rsqrt(mean(x^2)); the reference floors ||x|| at 1e-12, hence the eps.
        c = x.shape[1]
        y = F.rms_norm(x.movedim(1, -1), (c,), self.gamma.reshape(c).to(x.dtype), eps=1e-24 / c)
        return y.movedim(-1, 1)

    def silu_into(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out <- silu(self(x)) for videos [B, C, T, H, W], one fused pass on CUDA (`rms_norm_silu_`)."""
        return rms_norm_silu_(out, x, self.gamma, 1e-24 / x.shape[1])


class ResBlock(nn.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1x1x1 conv shortcut when channels change."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = RMSNorm(cin)
        self.conv1 = CausalConv3d(cin, cout)
        self.norm2 = RMSNorm(cout)
        self.conv2 = CausalConv3d(cout, cout)
        self.conv_shortcut = CausalConv3d(cin, cout, (1, 1, 1)) if cin != cout else None

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(x, cache, silu=True, norm=self.norm1)
        x = self.conv2(x, cache, silu=True, norm=self.norm2)
        return x.add_(h)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (no temporal mixing)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        # 1x1 convs as GEMMs over pixel rows: [B*T, H, W, C] is a view when x is channels-last.
        rows = self.norm(frame_major(x)).permute(0, 2, 3, 1)  # [B*T, H, W, C]
        qkv = F.linear(rows, self.to_qkv.weight.flatten(1), self.to_qkv.bias)  # [B*T, H, W, 3C]
        q, k, v = qkv.reshape(b * t, h * w, 3, 1, c).unbind(2)  # each [B*T, H*W, 1, C]
        o = attention(q, k, v).reshape(b * t, h, w, c)  # through the seam; head_dim = C (384 at real size)
        o = F.linear(o, self.proj.weight.flatten(1), self.proj.bias)  # [B*T, H, W, C]
        return x + channel_major(o.permute(0, 3, 1, 2), b)


class Resample(nn.Module):
    """Per-frame 2x spatial down/upsample, plus (3d modes) the causal 2x temporal one.

    downsample3d: frame 0 kept, then a stride-2 valid time conv over the clip's windows (0,1,2), (2,3,4), ...
    upsample3d: frame 0 kept, every later frame t becomes two (2t-1, 2t) from a causal time conv that sees
    only frames >= 1 (zero history); its 2C output channels are the two frames' C channels.
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                nn.Conv2d(dim, dim // 2, 3, padding=1),
            )
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), causal=False)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._upsample_time(x, cache)
        b = x.shape[0]
        # Nearest 2x is a copy, exact in any dtype (the reference's fp32 round trip changes nothing).
        x = channel_major(self.resample(frame_major(x)), b)
        if self.mode == "downsample3d":
            x = self._downsample_time(x, cache)
        return x

    def _upsample_time(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        # x [B, C, T, H, W] -> [B, C, 2T - 1, H, W] on the clip's first chunk, [B, C, 2T, H, W] after
        first = cache is None or self not in cache.started
        if cache is not None:
            cache.started.add(self)
        head, rest = (x[:, :, :1], x[:, :, 1:]) if first else (x[:, :, :0], x)
        n, c, tr = len(head[0, 0]), x.shape[1], rest.shape[2]
        out = x.new_empty(x.shape[0], c, n + 2 * tr, *x.shape[3:])
        if x.is_contiguous(memory_format=torch.channels_last_3d):
            out = out.contiguous(memory_format=torch.channels_last_3d)
        out[:, :, :n] = head
        if tr:
            y = self.time_conv(rest, cache)  # [B, 2C, Tr, H, W]; on the first chunk zero history
            out[:, :, n::2] = y[:, :c]
            out[:, :, n + 1 :: 2] = y[:, c:]
        return out

    def _downsample_time(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        # x [B, C, T, H, W]; first chunk T odd -> (T + 1) / 2 frames, later chunks T even -> T / 2
        prev = cache.frames.get(self) if cache is not None else None
        if cache is not None:
            cache.frames[self] = x[:, :, -1:].clone()
        if prev is not None:
            return self.time_conv(torch.cat([prev, x], dim=2))
        if x.shape[2] < 3:
            return x[:, :, :1]
        return torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(dim, dim), ResBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attentions[0](x), cache)


class Encoder(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0])
        blocks, scale = [], 1.0
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(cin, cout))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(cout))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                blocks.append(
                    Resample(cout, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d")
                )
                scale /= 2.0
        self.down_blocks = nn.ModuleList(blocks)  # flat, as the checkpoint's keys
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.z_dim * 2)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        # [B, 3, T, H, W] -> [B, 2Z, T', H/8, W/8]
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(x, cache, silu=True, norm=self.norm_out)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_res_blocks: int, mode: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResBlock(cin if j == 0 else cout, cout) for j in range(num_res_blocks + 1)]
        )
        self.upsamplers = nn.ModuleList([Resample(cout, mode)]) if mode else None

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        return self.upsamplers[0](x, cache) if self.upsamplers is not None else x


class Decoder(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.decoder_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0])
        self.mid_block = MidBlock(dims[0])
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(cfg.dim_mult) - 1
            mode = None if last else ("upsample3d" if cfg.temporal_upsample[i] else "upsample2d")
            # Every upsampler halves the channels, so blocks after the first take half of dims[i].
            blocks.append(UpBlock(cin // 2 if i > 0 else cin, cout, cfg.num_res_blocks, mode))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        # [B, Z, T, h, w] -> [B, 3, 1 + 4(T-1), 8h, 8w] (first chunk), [B, 3, 4T, 8h, 8w] (later chunks)
        x = self.mid_block(self.conv_in(x, cache), cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return self.conv_out(x, cache, silu=True, norm=self.norm_out)


class WanVAE(nn.Module):
    """Wan 2.1 VAE: video [B, 3, 1 + 4n, H, W] in [-1, 1] <-> latents [B, 16, 1 + n, H/8, W/8]."""

    keep_fp32: tuple[str, ...] = ()
    ckpt_key_map: tuple[tuple[str, str | None], ...] = ()
    # Parallel decode over latent row stripes (dit_rt.parallel.vae): the 3x3 spatial convs take a halo of
    # neighbouring rows; the mid block's attention over each frame's H*W positions sees the whole frame.
    row_split: ClassVar[RowSplit] = RowSplit(halo=(CausalConv3d, nn.Conv2d), frame_global=(AttentionBlock,))

    def __init__(self, config: WanVAEConfig | None = None):
        super().__init__()
        self.config = config = config or WanVAEConfig()
        self.encoder = Encoder(config)
        self.quant_conv = CausalConv3d(config.z_dim * 2, config.z_dim * 2, (1, 1, 1))
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, (1, 1, 1))
        self.decoder = Decoder(config)
        self.tiling: VAETiling | None = None

    # ---- latent normalisation (the pipelines' formulas, in the latents' dtype) ----

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.config.latents_mean).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
        inv_std = (1.0 / torch.tensor(self.config.latents_std)).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
        return mean, inv_std

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> DiT latents: (z - mean) * (1 / std), per channel of [B, Z, T, h, w]."""
        mean, inv_std = self._stats(z)
        return (z - mean) * inv_std

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """DiT latents -> VAE latents: z / (1 / std) + mean (as WanPipeline writes it)."""
        mean, inv_std = self._stats(z)
        return z / inv_std + mean

    # ---- encode / decode ----

    @staticmethod
    def _layout(x: torch.Tensor, channels_last: bool | None) -> torch.Tensor:
        if channels_last if channels_last is not None else x.is_cuda:
            return x.contiguous(memory_format=torch.channels_last_3d)
        return x.contiguous()

    @torch.no_grad()
    def encode(
        self, x: torch.Tensor, *, chunk: int | None = 1, channels_last: bool | None = None
    ) -> LatentDist:
        """Video [B, 3, 1 + 4n, H, W] in [-1, 1] (H, W multiples of 8) -> posterior, [B, Z, 1 + n, H/8, W/8].

        `chunk`: latent frames per encoder pass after the first frame (the reference uses 1); None = one pass.
        `channels_last`: activation layout; None picks channels-last on CUDA.
        """
        b, c, t, h, w = x.shape
        s = self.config.scale_factor_spatial
        if c != self.config.in_channels or (t - 1) % 4 or h % s or w % s:
            raise ValueError(
                f"encode needs [B, {self.config.in_channels}, 1 + 4n, H, W] with H, W multiples of {s}; "
                f"got {list(x.shape)}"
            )
        x = self._layout(x, channels_last)
        if chunk is None:
            h_enc = self.encoder(x)
        else:
            cache = CausalCache()
            bounds = [0, 1, *range(1 + 4 * chunk, t, 4 * chunk), t]
            parts = [self.encoder(x[:, :, i:j], cache) for i, j in zip(bounds[:-1], bounds[1:]) if j > i]
            h_enc = torch.cat(parts, dim=2)
        mean, logvar = self.quant_conv(h_enc).chunk(2, dim=1)  # [B, Z, T', h, w] each
        return LatentDist(mean, logvar.clamp(-30.0, 20.0))

    def enable_tiling(
        self,
        tile_sample_min_height: int | None = None,
        tile_sample_min_width: int | None = None,
        tile_sample_stride_height: int | None = None,
        tile_sample_stride_width: int | None = None,
    ) -> None:
        """Tile `decode` spatially; arguments and defaults as diffusers' `enable_tiling`."""
        d = VAETiling()
        self.tiling = VAETiling(
            tile_sample_min_height or d.min_height,
            tile_sample_min_width or d.min_width,
            tile_sample_stride_height or d.stride_height,
            tile_sample_stride_width or d.stride_width,
        )

    def disable_tiling(self) -> None:
        self.tiling = None

    @torch.no_grad()
    def decode(
        self,
        z: torch.Tensor,
        *,
        chunk: int | None = 2,
        tiling: VAETiling | None = None,
        channels_last: bool | None = None,
    ) -> torch.Tensor:
        """Latents [B, Z, T, h, w] (VAE scale, see `denormalize_latents`) -> video [B, 3, 1 + 4(T-1), 8h, 8w].

        Output is in the model dtype, clamped to [-1, 1]. `chunk`: latent frames per decoder pass (memory
        grows linearly with it; the reference uses 1); None = one pass. `tiling` (default: `self.tiling`,
        set by `enable_tiling`) decodes overlapping spatial tiles and blends them as diffusers does.
        """
        if z.ndim != 5 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"decode needs latents [B, {self.config.z_dim}, T, h, w]; got {list(z.shape)}")
        z = self._layout(z, channels_last)
        tiling = tiling or self.tiling
        s = self.config.scale_factor_spatial
        if tiling is not None and (z.shape[4] > tiling.min_width // s or z.shape[3] > tiling.min_height // s):
            out = self._decode_tiled(z, chunk, tiling)
        else:
            out = self._decode(z, chunk)
        return out.clamp_(-1.0, 1.0)

    def _decode(self, z: torch.Tensor, chunk: int | None) -> torch.Tensor:
        # [B, Z, T, h, w] -> [B, 3, 1 + 4(T-1), 8h, 8w], unclamped
        x = self.post_quant_conv(z)
        if chunk is None:
            return self.decoder(x)
        cache, out, t0 = CausalCache(), None, 0
        for i in range(0, x.shape[2], chunk):
            y = self.decoder(x[:, :, i : i + chunk], cache)
            if out is None:  # written in place: no growing concatenation
                out = y.new_empty(y.shape[0], y.shape[1], self._decoded_frames(x.shape[2]), *y.shape[3:])
            out[:, :, t0 : t0 + y.shape[2]] = y
            t0 += y.shape[2]
        return out

    def _decoded_frames(self, t: int) -> int:
        return 1 + (t - 1) * 2 ** sum(self.config.temporal_upsample)

    def _decode_tiled(self, z: torch.Tensor, chunk: int | None, tiling: VAETiling) -> torch.Tensor:
        s = self.config.scale_factor_spatial
        th, tw = tiling.min_height // s, tiling.min_width // s  # latent tile size
        sh, sw = tiling.stride_height // s, tiling.stride_width // s  # latent tile stride
        bh, bw = tiling.min_height - tiling.stride_height, tiling.min_width - tiling.stride_width  # blend, px
        rows = [
            [self._decode(z[:, :, :, i : i + th, j : j + tw], chunk) for j in range(0, z.shape[4], sw)]
            for i in range(0, z.shape[3], sh)
        ]
        # Blend in place, in diffusers' order: each tile with its (already blended) upper and left neighbours.
        for i, row in enumerate(rows):
            for j, tile in enumerate(row):
                if i > 0:
                    _blend(rows[i - 1][j], tile, bh, dim=3)
                if j > 0:
                    _blend(row[j - 1], tile, bw, dim=4)
        out = torch.cat(
            [
                torch.cat(
                    [tile[:, :, :, : tiling.stride_height, : tiling.stride_width] for tile in row], dim=4
                )
                for row in rows
            ],
            dim=3,
        )
        return out[:, :, :, : z.shape[3] * s, : z.shape[4] * s]

    def decode_flops(self, latent_shape: tuple[int, int, int, int, int]) -> int:
        """Multiply-add FLOPs (2 per MAC) of `decode` for latents [B, Z, T, h, w] (convs and attention)."""
        return _decode_flops(self, latent_shape)


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> None:
    """b's first `extent` rows along `dim` <- a's last rows * (1 - y/extent) + b's rows * (y/extent)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return
    shape = [1] * b.ndim
    shape[dim] = extent
    wb = (torch.arange(extent, dtype=torch.float64) / extent).to(b.device, b.dtype).view(shape)
    wa = (1.0 - torch.arange(extent, dtype=torch.float64) / extent).to(b.device, b.dtype).view(shape)
    head = b.narrow(dim, 0, extent)
    head.copy_(a.narrow(dim, a.shape[dim] - extent, extent) * wa + head * wb)


def _decode_flops(vae: WanVAE, latent_shape: tuple[int, int, int, int, int]) -> int:
    """Count conv / attention MACs by running the decoder on the meta device with forward hooks."""
    flops = 0

    def conv_hook(module, args, out):
        nonlocal flops
        w = module.weight
        flops += 2 * out.numel() * w[0].numel()

    def attn_hook(module, args, out):
        nonlocal flops
        b, c, t, h, w = out.shape
        n = b * t * h * w
        flops += 2 * n * c * 4 * c + 4 * n * h * w * c  # to_qkv + proj GEMMs, then QK^T and PV

    meta = WanVAE(vae.config).to("meta") if next(vae.parameters()).device.type != "meta" else vae
    handles = []
    for m in meta.modules():
        if isinstance(m, (CausalConv3d, nn.Conv2d)):
            handles.append(m.register_forward_hook(conv_hook))
        if isinstance(m, AttentionBlock):
            handles.append(m.register_forward_hook(attn_hook))
    try:
        with torch.no_grad():
            meta._decode(torch.empty(latent_shape, device="meta"), None)
    finally:
        for handle in handles:
            handle.remove()
    return flops


__all__ = ["CausalCache", "LatentDist", "VAETiling", "WanVAE", "WanVAEConfig"]
