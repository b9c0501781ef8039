"""Cosmos continuous video tokenizer (diffusers `AutoencoderKLCosmos`, Cosmos-1.0-Tokenizer-CV8x8x8):
video [B, 3, 1 + 8k, H, W] <-> latents [B, 16, 1 + k, H/8, W/8]. Module names equal the Hub checkpoint keys.

Structure (spec wan-cosmos.md C.4.1): two levels of a 3-D Haar wavelet fold 4x4x4 pixels into 192 channels,
then a conv net with factorized ("ConvProjection": 1x3x3 then 3x1x1) causal convs, per-frame GroupNorm and,
at the bottleneck, per-frame spatial attention plus causal per-pixel temporal attention does the last 2x.

Why the code looks like this:
- Every part of the decoder is causal in time: temporal convs see only earlier frames (the clip's first frame
  replicated before it), norms and spatial attention act per frame, temporal attention is masked
  lower-triangular, the temporal upsample and the inverse wavelet map each frame to its own output frames.
  A `CausalCache` therefore carries what the next chunk needs (the last frames of each temporal conv's
  padded input, each temporal attention's keys and values), and a chunked decode equals one pass over the
  whole clip, whatever the chunk sizes: decoding a few latent frames at a time bounds memory.
- The wavelet transforms are written as sums and differences of even/odd samples (a 2-tap filter with stride
  2 is exactly that), not as the reference's grouped convolutions: one pass per axis, any dtype.
- Activations may run channels-last (`torch.channels_last_3d`, cuDNN's preferred conv layout on CUDA); the
  per-frame GroupNorm and the attentions' 1x1x1 projections then work on free views.
- A parallel decode splits latent rows over ranks (dit_rt.parallel.vae): `row_split` declares the 1x3x3
  convs as halo convs, the spatial attention as frame-global and the GroupNorms as frame statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dit_rt.models.wan.vae import channel_major, frame_major
from dit_rt.ops.attention import attention
from dit_rt.ops.group_norm import GroupNorm
from dit_rt.parallel.vae import RowSplit

# CV8x8x8-1.0's latent statistics (16 channels x 16 latent frames, channel-major), diffusers' defaults.
# fmt: off
LATENTS_MEAN = (
    0.11362758, -0.0171717, 0.03071163, 0.02046862, 0.01931456, 0.02138567, 0.01999342, 0.02189187,
    0.02011935, 0.01872694, 0.02168613, 0.02207148, 0.01986941, 0.01770413, 0.02067643, 0.02028245,
    0.19125476, 0.04556972, 0.0595558, 0.05315534, 0.05496629, 0.05356264, 0.04856596, 0.05327453,
    0.05410472, 0.05597149, 0.05524866, 0.05181874, 0.05071663, 0.05204537, 0.0564108, 0.05518042,
    0.01306714, 0.03341161, 0.03847246, 0.02810185, 0.02790166, 0.02920026, 0.02823597, 0.02631033,
    0.0278531, 0.02880507, 0.02977769, 0.03145441, 0.02888389, 0.03280773, 0.03484927, 0.03049198,
    -0.00197727, 0.07534957, 0.04963879, 0.05530893, 0.05410828, 0.05252541, 0.05029899, 0.05321025,
    0.05149245, 0.0511921, 0.04643495, 0.04604527, 0.04631618, 0.04404101, 0.04403536, 0.04499495,
    -0.02994183, -0.04787003, -0.01064558, -0.01779824, -0.01490502, -0.02157517, -0.0204778, -0.02180816,
    -0.01945375, -0.02062863, -0.02192209, -0.02520639, -0.02246656, -0.02427533, -0.02683363, -0.02762006,
    0.08019473, -0.13005368, -0.07568636, -0.06082374, -0.06036175, -0.05875364, -0.05921887, -0.05869788,
    -0.05273941, -0.052565, -0.05346428, -0.05456541, -0.053657, -0.05656897, -0.05728589, -0.05321847,
    0.16718403, -0.00390146, 0.0379406, 0.0356561, 0.03554131, 0.03924074, 0.03873615, 0.04187329,
    0.04226924, 0.04378717, 0.04684274, 0.05117614, 0.04547792, 0.05251586, 0.05048339, 0.04950784,
    0.09564418, 0.0547128, 0.08183969, 0.07978633, 0.08076023, 0.08108605, 0.08011818, 0.07965573,
    0.08187773, 0.08350263, 0.08101469, 0.0786941, 0.0774442, 0.07724521, 0.07830418, 0.07599796,
    -0.04987567, 0.05923908, -0.01058746, -0.01177603, -0.01116162, -0.01364149, -0.01546014, -0.0117213,
    -0.01780043, -0.01648314, -0.02100247, -0.02104417, -0.02482123, -0.02611689, -0.02561143, -0.02597336,
    -0.05364667, 0.08211684, 0.04686937, 0.04605641, 0.04304186, 0.0397355, 0.03686767, 0.04087112,
    0.03704741, 0.03706401, 0.03120073, 0.03349091, 0.03319963, 0.03205781, 0.03195127, 0.03180481,
    0.16427967, -0.11048453, -0.04595276, -0.04982893, -0.05213465, -0.04809378, -0.05080318, -0.04992863,
    -0.04493337, -0.0467619, -0.04884703, -0.04627892, -0.04913311, -0.04955709, -0.04533982, -0.04570218,
    -0.10612928, -0.05121198, -0.06761009, -0.07251801, -0.07265285, -0.07417855, -0.07202412, -0.07499027,
    -0.07625481, -0.07535747, -0.07638787, -0.07920305, -0.07596069, -0.07959418, -0.08265036, -0.07955471,
    -0.16888915, 0.0753242, 0.04062594, 0.03375093, 0.03337452, 0.03699376, 0.03651138, 0.03611023,
    0.03555622, 0.03378554, 0.0300498, 0.03395559, 0.02941847, 0.03156432, 0.03431173, 0.03016853,
    -0.03415358, -0.01699573, -0.04029295, -0.04912157, -0.0498858, -0.04917918, -0.04918056, -0.0525189,
    -0.05325506, -0.05341973, -0.04983329, -0.04883146, -0.04985548, -0.04736718, -0.0462027, -0.04836091,
    0.02055675, 0.03419799, -0.02907669, -0.04350509, -0.04156144, -0.04234421, -0.04446109, -0.04461774,
    -0.04882839, -0.04822346, -0.04502493, -0.0506244, -0.05146913, -0.04655267, -0.04862994, -0.04841615,
    0.20312774, -0.07208502, -0.03635615, -0.03556088, -0.04246174, -0.04195838, -0.04293778, -0.04071276,
    -0.04240569, -0.04125213, -0.04395144, -0.03959096, -0.04044993, -0.04015875, -0.04088107, -0.03885176,
)
LATENTS_STD = (
    0.56700271, 0.65488982, 0.65589428, 0.66524369, 0.66619784, 0.6666382, 0.6720838, 0.66955978,
    0.66928875, 0.67108786, 0.67092526, 0.67397463, 0.67894882, 0.67668313, 0.67769569, 0.67479557,
    0.85245121, 0.8688373, 0.87348086, 0.88459337, 0.89135885, 0.8910504, 0.89714909, 0.89947474,
    0.90201765, 0.90411824, 0.90692616, 0.90847772, 0.90648711, 0.91006982, 0.91033435, 0.90541548,
    0.84960359, 0.85863352, 0.86895317, 0.88460612, 0.89245003, 0.89451706, 0.89931005, 0.90647358,
    0.90338236, 0.90510076, 0.91008312, 0.90961218, 0.9123717, 0.91313171, 0.91435546, 0.91565102,
    0.91877103, 0.85155135, 0.857804, 0.86998034, 0.87365264, 0.88161767, 0.88151032, 0.88758916,
    0.89015514, 0.89245576, 0.89276224, 0.89450496, 0.90054202, 0.89994133, 0.90136105, 0.90114892,
    0.77755755, 0.81456852, 0.81911844, 0.83137071, 0.83820474, 0.83890373, 0.84401101, 0.84425181,
    0.84739357, 0.84798753, 0.85249585, 0.85114998, 0.85160935, 0.85626358, 0.85677862, 0.85641026,
    0.69903517, 0.71697885, 0.71696913, 0.72583169, 0.72931731, 0.73254126, 0.73586977, 0.73734969,
    0.73664582, 0.74084908, 0.74399322, 0.74471819, 0.74493188, 0.74824578, 0.75024873, 0.75274801,
    0.8187142, 0.82251883, 0.82616025, 0.83164483, 0.84072375, 0.8396467, 0.84143305, 0.84880769,
    0.8503468, 0.85196948, 0.85211051, 0.85386664, 0.85410017, 0.85439342, 0.85847849, 0.85385275,
    0.67583984, 0.68259847, 0.69198853, 0.69928843, 0.70194328, 0.70467001, 0.70755547, 0.70917857,
    0.71007699, 0.70963502, 0.71064079, 0.71027333, 0.71291167, 0.71537536, 0.71902508, 0.71604162,
    0.72450989, 0.71979928, 0.72057378, 0.73035461, 0.73329622, 0.73660028, 0.73891461, 0.74279994,
    0.74105692, 0.74002433, 0.74257588, 0.74416119, 0.74543899, 0.74694443, 0.74747062, 0.74586403,
    0.90176988, 0.90990674, 0.91106802, 0.92163783, 0.92390233, 0.93056196, 0.93482202, 0.93642414,
    0.93858379, 0.94064975, 0.94078934, 0.94325715, 0.94955301, 0.94814706, 0.95144123, 0.94923073,
    0.49853548, 0.64968109, 0.6427654, 0.64966393, 0.6487664, 0.65203559, 0.6584242, 0.65351611,
    0.65464371, 0.6574859, 0.65626335, 0.66123748, 0.66121179, 0.66077942, 0.66040152, 0.66474909,
    0.61986589, 0.69138134, 0.6884557, 0.6955843, 0.69765401, 0.70015347, 0.70529598, 0.70468754,
    0.70399523, 0.70479989, 0.70887572, 0.71126866, 0.7097227, 0.71249932, 0.71231949, 0.71175605,
    0.35586974, 0.68723857, 0.68973219, 0.69958478, 0.6943453, 0.6995818, 0.70980215, 0.69899458,
    0.70271689, 0.70095056, 0.69912851, 0.70522696, 0.70392174, 0.70916915, 0.70585734, 0.70373541,
    0.98101336, 0.89024764, 0.89607251, 0.90678179, 0.91308665, 0.91812348, 0.91980827, 0.92480654,
    0.92635667, 0.92887944, 0.93338072, 0.93468094, 0.93619436, 0.93906063, 0.94191772, 0.94471723,
    0.83202779, 0.84106231, 0.84463632, 0.85829508, 0.86319661, 0.86751342, 0.86914337, 0.87085921,
    0.87286359, 0.87537396, 0.87931138, 0.88054478, 0.8811838, 0.88872558, 0.88942474, 0.88934827,
    0.44025335, 0.63061613, 0.63110614, 0.63601959, 0.6395812, 0.64104342, 0.65019929, 0.6502797,
    0.64355946, 0.64657205, 0.64847094, 0.64728117, 0.64972943, 0.65162975, 0.65328044, 0.64914775,
)
# fmt: on


@dataclass(frozen=True)
class CosmosVAEConfig:
    """The Hub `vae/config.json` of `AutoencoderKLCosmos` (CV8x8x8-1.0 values are the defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decode_block_out_channels: tuple[int, ...] = (256, 512, 512, 512)
    attention_resolutions: tuple[int, ...] = (32,)
    resolution: int = 1024
    num_layers: int = 2
    patch_size: int = 4
    patch_type: str = "haar"
    scaling_factor: float = 1.0
    spatial_compression_ratio: int = 8
    temporal_compression_ratio: int = 8
    latents_mean: tuple[float, ...] | None = LATENTS_MEAN
    latents_std: tuple[float, ...] | None = LATENTS_STD

    def __post_init__(self):
        if self.patch_type not in ("haar", "rearrange"):
            raise ValueError(f"patch_type {self.patch_type!r}: expected 'haar' or 'rearrange'")
        for name in ("patch_size", "spatial_compression_ratio", "temporal_compression_ratio"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("latents_mean and latents_std are given together or not at all")
        if self.latents_mean is not None and len(self.latents_mean) % self.latent_channels:
            raise ValueError(
                f"latents_mean needs a multiple of latent_channels={self.latent_channels} values"
            )

    @classmethod
    def from_config(cls, config: dict) -> CosmosVAEConfig:
        """Read a Hub `vae/config.json` dict; bookkeeping keys ('_class_name', ...) are ignored; lists become
        tuples."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in known})

    @property
    def spatial_layers(self) -> int:
        """2x spatial resamplings in the conv net (the wavelet does log2(patch_size) of them)."""
        return int(math.log2(self.spatial_compression_ratio)) - int(math.log2(self.patch_size))

    @property
    def temporal_layers(self) -> int:
        return int(math.log2(self.temporal_compression_ratio)) - int(math.log2(self.patch_size))


@dataclass
class CausalCache:
    """Temporal state of one chunked decode: per layer, what the next chunk needs from the earlier ones."""

    frames: dict[nn.Module, torch.Tensor] = field(default_factory=dict)  # temporal convs' input tails
    keys_values: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    first: bool = True  # this chunk starts the clip


@dataclass
class IdentityPosterior:
    """What `encode` returns (diffusers' `IdentityDistribution`): the latents are deterministic."""

    mean: torch.Tensor  # [B, Z, T', h, w]

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean


def _layout_like(x: torch.Tensor) -> torch.memory_format:
    return (
        torch.channels_last_3d
        if x.is_contiguous(memory_format=torch.channels_last_3d)
        else torch.contiguous_format
    )


class CausalConv3d(nn.Module):
    """Conv3d causal in time (`CosmosCausalConv3d`): the input is preceded by (k_t - 1) + (1 - stride_t)
    copies of its first frame, or with a `CausalCache` (stride 1) by the previous chunk's last frames; the
    spatial padding is zeros."""

    def __init__(self, cin: int, cout: int, kernel=(1, 1, 1), stride=(1, 1, 1), padding: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, *kernel))
        self.bias = nn.Parameter(torch.empty(cout))
        self.stride = stride
        self.padding = (0, padding, padding)
        self.history = kernel[0] - 1 + 1 - stride[0]

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        # x [B, Cin, T, H, W] -> [B, Cout, T', H', W']
        n = self.history
        if n:
            prev = cache.frames.get(self) if cache is not None else None
            b, c, t, h, w = x.shape
            padded = torch.empty(
                b, c, n + t, h, w, dtype=x.dtype, device=x.device, memory_format=_layout_like(x)
            )
            padded[:, :, :n] = x[:, :, :1] if prev is None else prev
            padded[:, :, n:] = x
            if cache is not None:
                cache.frames[self] = padded[:, :, -n:].clone()
            x = padded
        return F.conv3d(x, self.weight, self.bias, self.stride, self.padding)


class CausalGroupNorm(nn.Module):
    """GroupNorm with one group over each frame's (C, H, W), eps 1e-6 (`CosmosCausalGroupNorm`)."""

    def __init__(self, dim: int):
        super().__init__()
        # On CUDA channels-last the frame-major view is a channels-last image batch, which dit_rt's
        # GroupNorm normalizes in place of layout (PyTorch's copies it to NCHW and back).
        self.norm = GroupNorm(1, dim, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_major(self.norm(frame_major(x)), x.shape[0])


class ConvProjection(nn.Module):
    """Factorized 3x3x3: a 1x3x3 spatial conv, then a 3x1x1 causal temporal conv."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv_s = CausalConv3d(cin, cout, (1, 3, 3), padding=1)
        self.conv_t = CausalConv3d(cout, cout, (3, 1, 1))

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        return self.conv_t(self.conv_s(x), cache)


class ResBlock(nn.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1x1x1 conv shortcut when channels change."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = CausalGroupNorm(cin)
        self.conv1 = ConvProjection(cin, cout)
        self.norm2 = CausalGroupNorm(cout)
        self.conv2 = ConvProjection(cout, cout)
        self.conv_shortcut = CausalConv3d(cin, cout) if cin != cout else None

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x)), cache)
        x = self.conv2(F.silu(self.norm2(x)), cache)
        return x + h


class _Attention(nn.Module):
    """Single-head attention with 1x1x1 conv projections and a residual (`CosmosCausalAttention`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = CausalGroupNorm(dim)
        self.to_q = CausalConv3d(dim, dim)
        self.to_k = CausalConv3d(dim, dim)
        self.to_v = CausalConv3d(dim, dim)
        self.to_out = nn.ModuleList([CausalConv3d(dim, dim)])

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """normed x [B, C, T, H, W] -> q, k, v [B, T, H, W, C] (1x1x1 convs as GEMMs over pixel rows)."""
        rows = self.norm(x).permute(0, 2, 3, 4, 1)
        return tuple(F.linear(rows, p.weight.flatten(1), p.bias) for p in (self.to_q, self.to_k, self.to_v))

    def _out(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """o [B, T, H, W, C] -> x + to_out(o) in x's layout [B, C, T, H, W]."""
        proj = self.to_out[0]
        return x + F.linear(o, proj.weight.flatten(1), proj.bias).permute(0, 4, 1, 2, 3)


class SpatialAttention(_Attention):
    """Attention over the H*W positions of each frame."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        q, k, v = (p.reshape(b * t, h * w, 1, c) for p in self._project(x))
        o = attention(q, k, v)  # through the seam; head_dim = C (512 at real size)
        return self._out(o.reshape(b, t, h, w, c), x)


class TemporalAttention(_Attention):
    """Causal attention over the frames of each pixel: frame t sees frames <= t. With a `CausalCache` the
    keys and values of the earlier chunks are kept, so a chunk's frames see the whole past."""

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        # [B, T, H, W, C] -> [B*H*W, 1, T, C]: one sequence of frames per pixel
        q, k, v = (p.permute(0, 2, 3, 1, 4).reshape(b * h * w, 1, t, c) for p in self._project(x))
        past = cache.keys_values.get(self) if cache is not None else None
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        if cache is not None:
            cache.keys_values[self] = (k, v)
        t0 = k.shape[2] - t  # frames before this chunk
        mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(t0)
        # A boolean mask over a handful of frames: plain SDPA (the attention seam takes no mask).
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B*H*W, 1, T, C]
        return self._out(o.reshape(b, h, w, t, c).permute(0, 3, 1, 2, 4), x)


class Downsample(nn.Module):
    """2x down in space (stride-2 1x3x3 conv + 2x2 average, summed) and/or in time (stride-2 3x1x1 causal conv
    + 2-frame average over the clip with its first frame repeated, summed), then a 1x1x1 conv."""

    def __init__(self, dim: int, spatial: bool, temporal: bool):
        super().__init__()
        self.conv1 = CausalConv3d(dim, dim, (1, 3, 3), stride=(1, 2, 2)) if spatial else None
        self.conv2 = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None
        self.conv3 = CausalConv3d(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv1 is not None:
            x = F.pad(x, (0, 1, 0, 1))  # right and bottom
            x = self.conv1(x) + F.avg_pool3d(x, (1, 2, 2), (1, 2, 2))
        if self.conv2 is not None:
            x = torch.cat([x[:, :, :1], x], dim=2)
            x = self.conv2(x) + F.avg_pool3d(x, (2, 1, 1), (2, 1, 1))
        return self.conv3(x)


class Upsample(nn.Module):
    """2x up in time (each frame twice, the clip's first frame once, + a causal 3x1x1 conv residual) and/or
    in space (nearest + a 1x3x3 conv residual), then a 1x1x1 conv."""

    def __init__(self, dim: int, spatial: bool, temporal: bool):
        super().__init__()
        self.conv1 = CausalConv3d(dim, dim, (3, 1, 1)) if temporal else None
        self.conv2 = CausalConv3d(dim, dim, (1, 3, 3), padding=1) if spatial else None
        self.conv3 = CausalConv3d(dim, dim)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if self.conv1 is not None:
            b, c, t, h, w = x.shape
            twice = torch.empty(
                b, c, 2 * t, h, w, dtype=x.dtype, device=x.device, memory_format=_layout_like(x)
            )
            twice[:, :, 0::2] = x
            twice[:, :, 1::2] = x
            # [B, C, 2T - 1, H, W] on the clip's first chunk (its first frame once), 2T frames after it
            x = twice[:, :, 1:] if cache is None or cache.first else twice
            x = self.conv1(x, cache) + x
        if self.conv2 is not None:
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")  # an exact copy
            x = self.conv2(x) + x
        return self.conv3(x)


class MidBlock(nn.Module):
    """resnet -> spatial attention -> temporal attention -> resnet."""

    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(dim, dim), ResBlock(dim, dim)])
        self.attentions = nn.ModuleList([SpatialAttention(dim)])
        self.temp_attentions = nn.ModuleList([TemporalAttention(dim)])

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = self.resnets[0](x, cache)
        x = self.temp_attentions[0](self.attentions[0](x), cache)
        return self.resnets[1](x, cache)


class _Stage(nn.Module):
    """resnets, each followed by spatial + temporal attention at the configured resolutions
    (`CosmosDownBlock3d` / `CosmosUpBlock3d`)."""

    def __init__(self, cin: int, cout: int, num_layers: int, use_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(cin if i == 0 else cout, cout) for i in range(num_layers)])
        n = num_layers if use_attention else 0
        self.attentions = nn.ModuleList([SpatialAttention(cout) for _ in range(n)])
        self.temp_attentions = nn.ModuleList([TemporalAttention(cout) for _ in range(n)])

    def _layers(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, cache)
            if self.attentions:
                x = self.temp_attentions[i](self.attentions[i](x), cache)
        return x


class DownBlock(_Stage):
    def __init__(self, cin, cout, num_layers, use_attention, spatial: bool, temporal: bool):
        super().__init__(cin, cout, num_layers, use_attention)
        # A block with neither resampling keeps no downsampler (the reference's has no parameters).
        self.downsamplers = (
            nn.ModuleList([Downsample(cout, spatial, temporal)]) if spatial or temporal else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._layers(x, None)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpBlock(_Stage):
    def __init__(self, cin, cout, num_layers, use_attention, spatial: bool, temporal: bool):
        super().__init__(cin, cout, num_layers, use_attention)
        self.upsamplers = nn.ModuleList([Upsample(cout, spatial, temporal)]) if spatial or temporal else None

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = self._layers(x, cache)
        return self.upsamplers[0](x, cache) if self.upsamplers is not None else x


# ---------------------------------------------------------------------------------------------- wavelets

_HAAR = 0.5**0.5  # the Haar filters: low [a, a], high [a, -a]


def _haar_split(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stride-2 2-tap Haar analysis along `dim`: (low, high); an odd length is reflect-padded by one."""
    if x.shape[dim] % 2:
        x = torch.cat([x, x.narrow(dim, x.shape[dim] - 2, 1)], dim=dim)
    even, odd = x.unflatten(dim, (-1, 2)).unbind(dim + 1)
    return (even + odd) * _HAAR, (even - odd) * _HAAR


def _haar_merge(low: torch.Tensor, high: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of `_haar_split` (the stride-2 transposed 2-tap filters): samples 2i, 2i+1 along `dim`."""
    return torch.stack([(low + high) * _HAAR, (low - high) * _HAAR], dim=dim + 1).flatten(dim, dim + 1)


def _dwt3d(x: torch.Tensor) -> torch.Tensor:
    """One 3-D Haar level: [B, C, T, H, W] -> [B, 8C, T/2, H/2, W/2], sub-bands lll, llh, ..., hhh (time,
    height, width) concatenated along channels, divided by sqrt(8)."""
    bands = [x]
    for dim in (2, 3, 4):
        bands = [part for band in bands for part in _haar_split(band, dim)]
    return torch.cat(bands, dim=1) / 8**0.5


def _idwt3d(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `_dwt3d`: [B, 8C, T, H, W] -> [B, C, 2T, 2H, 2W]."""
    bands = list(x.chunk(8, dim=1))
    for dim in (4, 3, 2):
        bands = [_haar_merge(lo, hi, dim) for lo, hi in zip(bands[0::2], bands[1::2])]
    return bands[0] * 8**0.5


def patchify(x: torch.Tensor, patch_size: int, patch_type: str) -> torch.Tensor:
    """Video [B, C, 1 + pk, H, W] -> [B, C p^3, 1 + k, H/p, W/p]: the first frame repeated p times, then
    log2(p) Haar levels ("haar") or p x p x p blocks folded into channels ("rearrange")."""
    x = torch.cat([x[:, :, :1].repeat_interleave(patch_size, dim=2), x[:, :, 1:]], dim=2)
    if patch_type == "haar":
        for _ in range(int(math.log2(patch_size))):
            x = _dwt3d(x)
        return x
    p, (b, c, t, h, w) = patch_size, x.shape
    x = x.reshape(b, c, t // p, p, h // p, p, w // p, p)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).flatten(1, 4)


def unpatchify(x: torch.Tensor, patch_size: int, patch_type: str, first: bool = True) -> torch.Tensor:
    """Inverse of `patchify`; `first`: x starts the clip, whose p - 1 repeated first frames are dropped."""
    p = patch_size
    if patch_type == "haar":
        for _ in range(int(math.log2(p))):
            x = _idwt3d(x)
    else:
        x = x.unflatten(1, (-1, p, p, p)).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
    return x[:, :, p - 1 :] if first else x


# ---------------------------------------------------------------------------------------------- networks


class Encoder(nn.Module):
    def __init__(self, cfg: CosmosVAEConfig):
        super().__init__()
        dims = cfg.encoder_block_out_channels
        self.patch = (cfg.patch_size, cfg.patch_type)
        self.conv_in = ConvProjection(cfg.in_channels * cfg.patch_size**3, dims[0])
        resolution, blocks = cfg.resolution // cfg.patch_size, []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            resample = i < len(dims) - 2
            blocks.append(
                DownBlock(
                    cin,
                    cout,
                    cfg.num_layers,
                    resolution in cfg.attention_resolutions,
                    spatial=resample and i < cfg.spatial_layers,
                    temporal=resample and i < cfg.temporal_layers,
                )
            )
            resolution //= 2 if resample else 1
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = CausalGroupNorm(dims[-1])
        self.conv_out = ConvProjection(dims[-1], cfg.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, 3, 1 + 8k, H, W] -> [B, Z, 1 + k, H/8, W/8]
        x = self.conv_in(patchify(x, *self.patch))
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: CosmosVAEConfig):
        super().__init__()
        dims = cfg.decode_block_out_channels[::-1]
        self.patch = (cfg.patch_size, cfg.patch_type)
        self.conv_in = ConvProjection(cfg.latent_channels, dims[0])
        self.mid_block = MidBlock(dims[0])
        resolution = cfg.resolution // cfg.patch_size // 2 ** (len(dims) - 2)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            resample = i < len(dims) - 2
            temporal = resample and 0 < i < cfg.temporal_layers + 1
            spatial = temporal or (
                resample and i < cfg.spatial_layers and cfg.spatial_layers > cfg.temporal_layers
            )
            blocks.append(
                UpBlock(
                    cin, cout, cfg.num_layers + 1, resolution in cfg.attention_resolutions, spatial, temporal
                )
            )
            resolution *= 2 if resample else 1
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = CausalGroupNorm(dims[-1])
        self.conv_out = ConvProjection(dims[-1], cfg.out_channels * cfg.patch_size**3)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        # [B, Z, T, h, w] -> [B, 3, 1 + 8(T-1), 8h, 8w] on the clip's first chunk, [B, 3, 8T, 8h, 8w] after it
        x = self.mid_block(self.conv_in(x, cache), cache)
        for block in self.up_blocks:
            x = block(x, cache)
        x = self.conv_out(F.silu(self.norm_out(x)), cache)
        return unpatchify(x, *self.patch, first=cache is None or cache.first)


class CosmosVAE(nn.Module):
    """Cosmos CV tokenizer: video [B, 3, 1 + 8k, H, W] in [-1, 1] <-> latents [B, 16, 1 + k, H/8, W/8]
    (compression factors from the config)."""

    row_split: ClassVar[RowSplit] = RowSplit(
        halo=(CausalConv3d,), frame_global=(SpatialAttention,), frame_stats=(nn.GroupNorm,)
    )

    def __init__(self, config: CosmosVAEConfig | None = None):
        super().__init__()
        self.config = config = config or CosmosVAEConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = CausalConv3d(config.latent_channels, config.latent_channels)
        self.post_quant_conv = CausalConv3d(config.latent_channels, config.latent_channels)

    def denormalize_latents(self, z: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
        """DiT latents [B, Z, T, h, w] -> VAE latents: z * std / sigma_data + mean, with the per (channel,
        frame) statistics of the config (z / sigma_data without them), as CosmosTextToWorldPipeline does."""
        cfg = self.config
        if cfg.latents_mean is None:
            return z / sigma_data
        t = z.shape[2]
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.latent_channels, -1, 1, 1)[:, :, :t].to(z)
        std = torch.tensor(cfg.latents_std).view(1, cfg.latent_channels, -1, 1, 1)[:, :, :t].to(z)
        return z * std / sigma_data + mean

    @staticmethod
    def _layout(x: torch.Tensor, channels_last: bool | None) -> torch.Tensor:
        if channels_last if channels_last is not None else x.is_cuda:
            return x.contiguous(memory_format=torch.channels_last_3d)
        return x.contiguous()

    @torch.no_grad()
    def encode(self, x: torch.Tensor, *, channels_last: bool | None = None) -> IdentityPosterior:
        """Video [B, 3, 1 + 8k, H, W] in [-1, 1] -> latents [B, Z, 1 + k, H/8, W/8] (`.mean`, `.mode()`)."""
        cfg = self.config
        b, c, t, h, w = x.shape
        st, s = cfg.temporal_compression_ratio, cfg.spatial_compression_ratio
        if c != cfg.in_channels or (t - 1) % st or h % s or w % s:
            raise ValueError(
                f"encode needs [B, {cfg.in_channels}, 1 + {st}k, H, W] with H, W multiples of {s}; "
                f"got {list(x.shape)}"
            )
        z = self.quant_conv(self.encoder(self._layout(x, channels_last)))
        return IdentityPosterior(z.contiguous())

    @torch.no_grad()
    def decode(
        self, z: torch.Tensor, *, chunk: int | None = 2, channels_last: bool | None = None
    ) -> torch.Tensor:
        """Latents [B, Z, T, h, w] (VAE scale, see `denormalize_latents`) -> video [B, 3, 1 + 8(T-1), 8h, 8w],
        unclamped as in the reference, in the model dtype.

        chunk: latent frames per decoder pass (memory grows linearly with it; the result does not depend on
        it); None = one pass. Measured on an H200 for the 121-frame 704x1280 latent in bf16: one pass 227 ms,
        chunk 2 256 ms at a 5.3 GiB peak (diffusers: 654 ms at 30.7 GiB).
        channels_last: activation layout; None picks channels-last on CUDA.
        """
        cfg = self.config
        if z.ndim != 5 or z.shape[1] != cfg.latent_channels:
            raise ValueError(f"decode needs latents [B, {cfg.latent_channels}, T, h, w]; got {list(z.shape)}")
        x = self.post_quant_conv(self._layout(z, channels_last))
        if chunk is None:
            return self.decoder(x)
        cache, out, t0 = CausalCache(), None, 0
        frames = 1 + (x.shape[2] - 1) * cfg.temporal_compression_ratio
        for i in range(0, x.shape[2], chunk):
            y = self.decoder(x[:, :, i : i + chunk], cache)
            cache.first = False
            if out is None:  # written in place: no growing concatenation
                shape = (*y.shape[:2], frames, *y.shape[3:])
                out = torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=_layout_like(y))
            out[:, :, t0 : t0 + y.shape[2]] = y
            t0 += y.shape[2]
        return out


def build_from_folder(folder: str | Path) -> CosmosVAE:
    """The tokenizer of a Hub `vae/` folder, from its config (weights are loaded by the caller)."""
    from dit_rt import loaders

    return CosmosVAE(CosmosVAEConfig.from_config(loaders.read_config(folder)))


__all__ = ["CausalCache", "CosmosVAE", "CosmosVAEConfig", "IdentityPosterior", "build_from_folder"]
