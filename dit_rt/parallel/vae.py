"""Parallel VAE decode: the latent split into horizontal stripes across the ranks of a group, with a halo
exchange in front of every spatial conv, so the frames equal the one-process decode.

Why halo exchange per conv and not one wide halo: the Wan decoder's mid block holds a self-attention over
all H*W positions of a frame, so its receptive field is the whole frame and no finite halo around a stripe
reproduces it. Instead each rank keeps exactly its own rows at every layer:
- before a conv with a k x k spatial kernel (stride 1, zero padding k // 2) the rank receives the k // 2
  boundary rows of each neighbour's input and sends its own; the conv's output rows that belong to the
  neighbours are dropped after it. The first and last ranks have no neighbour on their outer side, where
  the conv's own zero padding is exactly the full frame's. Causal time caches keep the halo rows, so the
  chunked temporal decode stays exact too.
- the frame-global attention block gathers every rank's (already exact) rows, runs on the whole frame and
  keeps its own rows: its cost is replicated, but it runs once, at the latent resolution.
- a norm whose statistics span the frame (GroupNorm, in the AutoencoderKL of FLUX and SD) is recomputed
  from statistics all-reduced over the ranks: two small all-reduces of per-group sums, no rows move.
Everything else in the decoder (channel RMS norms, SiLU, nearest upsampling, 1x1 and time-only convs) acts
on each pixel column independently and needs nothing. A stripe of r latent rows is r * 2^k rows after k
upsamplings, so row bookkeeping is a scale of the latent split.

Which modules are which is the VAE's to say: its class declares a `row_split` (`RowSplit`), so this file
imports no model and a VAE shared by several families (the Wan VAE: Wan and Cosmos) declares it once.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dit_rt.parallel.split import split_sizes


@dataclass(frozen=True)
class RowSplit:
    """How a VAE's decoder runs on a stripe of latent rows, declared by the VAE class as `row_split`.

    halo: module types that read neighbouring rows: spatial convs with stride 1 and 'same' zero padding
    (the weight's kernel at dims [-2, -1], `stride` and `padding` as nn.Conv2d / Conv3d hold them); each
    gets the neighbours' padding-many boundary rows before it and drops them after. frame_global: module
    types whose output row depends on the whole frame (attention over H*W): each sees every rank's rows
    gathered and keeps its own. frame_stats: nn.GroupNorm types, normalized with the group statistics of the
    whole frame (all-reduced; inside a frame_global module every rank holds the whole frame, and the
    all-reduced counts make the statistics those of one frame again). decoder: the VAE attribute holding
    the decoder the hooks go on.
    """

    halo: tuple[type[nn.Module], ...]
    frame_global: tuple[type[nn.Module], ...] = ()
    frame_stats: tuple[type[nn.GroupNorm], ...] = ()
    decoder: str = "decoder"


def _gather_rows(x: torch.Tensor, group: dist.ProcessGroup, sizes: list[int]) -> torch.Tensor:
    """All ranks' row stripes (dim -2, rank r holding sizes[r] rows) concatenated in rank order."""
    top = max(sizes)
    padded = F.pad(x, (0, 0, 0, top - x.shape[-2])).contiguous()  # all_gather wants equal shapes
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[..., :n, :] for p, n in zip(parts, sizes)], dim=-2)


class StripeDecode:
    """Hooks that make a decoder run on this rank's row stripe; install with `hooks()` (a context)."""

    def __init__(self, group: dist.ProcessGroup, latent_rows: int, channels_last: bool = False):
        self.group = group
        self.channels_last = channels_last  # keep the decoder's layout (channels-last on CUDA) through hooks
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.sizes = split_sizes(latent_rows, self.world)  # latent rows per rank
        self.start = sum(self.sizes[: self.rank])
        # Global ranks of the neighbours above (lower rows) and below; None at the frame's edges.
        self.above = dist.get_global_rank(group, self.rank - 1) if self.rank > 0 else None
        self.below = dist.get_global_rank(group, self.rank + 1) if self.rank < self.world - 1 else None

    def stripe(self, z: torch.Tensor) -> torch.Tensor:
        """This rank's rows of latents [..., h, w]."""
        return z[..., self.start : self.start + self.sizes[self.rank], :]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's stripe of x [..., rows, W] (any resolution of the decoder) -> the whole frame."""
        scale = x.shape[-2] // self.sizes[self.rank]
        return _gather_rows(x, self.group, [n * scale for n in self.sizes])

    def _format(self, x: torch.Tensor) -> torch.memory_format:
        if not self.channels_last:
            return torch.contiguous_format
        return torch.channels_last_3d if x.ndim == 5 else torch.channels_last

    # ---- conv halo ----

    def _exchange(self, x: torch.Tensor, halo: int) -> torch.Tensor:
        """x [..., rows, W] -> [..., halo + rows + halo, W] with the neighbours' boundary rows (none at an
        edge of the frame)."""
        if x.shape[-2] < halo:
            raise ValueError(f"parallel VAE decode: a stripe of {x.shape[-2]} rows cannot lend {halo} rows")
        ops, above, below = [], None, None
        if self.above is not None:
            above = torch.empty_like(x[..., :halo, :], memory_format=torch.contiguous_format)
            ops += [
                dist.P2POp(dist.isend, x[..., :halo, :].contiguous(), self.above, self.group),
                dist.P2POp(dist.irecv, above, self.above, self.group),
            ]
        if self.below is not None:
            below = torch.empty_like(x[..., -halo:, :], memory_format=torch.contiguous_format)
            ops += [
                dist.P2POp(dist.isend, x[..., -halo:, :].contiguous(), self.below, self.group),
                dist.P2POp(dist.irecv, below, self.below, self.group),
            ]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        # One copy into a buffer in the decoder's layout (a concatenation of mixed layouts would fall back
        # to the contiguous one, and the convs after it with it).
        parts = [t for t in (above, x, below) if t is not None]
        shape = (*x.shape[:-2], sum(t.shape[-2] for t in parts), x.shape[-1])
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=self._format(x))
        row = 0
        for t in parts:
            out[..., row : row + t.shape[-2], :] = t
            row += t.shape[-2]
        return out

    def _conv_pre(self, module: nn.Module, args: tuple, kwargs: dict):
        return (self._exchange(args[0], _halo(module)), *args[1:]), kwargs

    def _conv_post(self, module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
        halo = _halo(module)
        start = halo if self.above is not None else 0
        stop = out.shape[-2] - (halo if self.below is not None else 0)
        return out[..., start:stop, :].contiguous(memory_format=self._format(out))

    # ---- frame-global attention ----

    def _attention_pre(self, module: nn.Module, args: tuple):
        self._rows = args[0].shape[-2]
        return (self.gather(args[0]), *args[1:])

    def _attention_post(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        scale = self._rows // self.sizes[self.rank]
        return out[..., self.start * scale : self.start * scale + self._rows, :]

    # ---- frame-wide group statistics ----

    def _group_norm_post(self, module: nn.GroupNorm, args: tuple, out: torch.Tensor) -> torch.Tensor:
        # The module's own output used this stripe's statistics; redo it with the frame's (float32).
        x = args[0]
        b, c, g = x.shape[0], x.shape[1], module.num_groups
        xs = x.float().reshape(b, g, c // g, -1)  # [B, G, C/G, rows * W (* T)]
        # Sums and the element count in one float64 all-reduce (counts pass 2^24 at 1024^2 on 8 ranks).
        sums = xs.sum(dim=(2, 3), dtype=torch.float64).flatten()  # [B * G]
        sums = torch.cat([sums, sums.new_full((1,), float(xs[0, 0].numel()))])
        dist.all_reduce(sums, group=self.group)
        count = sums[-1]
        mean = (sums[:-1] / count).view(b, g, 1, 1).float()
        centred = xs - mean  # two passes: no cancellation in E[x^2] - E[x]^2
        var = centred.square().sum(dim=(2, 3), dtype=torch.float64)
        dist.all_reduce(var, group=self.group)
        y = centred * torch.rsqrt(var / count + module.eps).float()[:, :, None, None]
        y = y.reshape(x.shape)
        if module.affine:
            shape = (1, c) + (1,) * (x.ndim - 2)
            y = y * module.weight.float().view(shape) + module.bias.float().view(shape)
        return y.to(out.dtype).contiguous(memory_format=self._format(out))

    @contextmanager
    def hooks(self, decoder: nn.Module, split: RowSplit):
        """Install the stripe hooks on `decoder`'s modules that `split` names, for the body."""
        handles = []
        for m in decoder.modules():
            if isinstance(m, split.halo) and _halo(m) > 0:
                handles.append(m.register_forward_pre_hook(self._conv_pre, with_kwargs=True))
                handles.append(m.register_forward_hook(self._conv_post, with_kwargs=True))
            elif isinstance(m, split.frame_global):
                handles.append(m.register_forward_pre_hook(self._attention_pre))
                handles.append(m.register_forward_hook(self._attention_post))
            elif isinstance(m, split.frame_stats):
                handles.append(m.register_forward_hook(self._group_norm_post))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def _halo(conv: nn.Module) -> int:
    """Rows a conv reads beyond each side of an output row: its spatial zero padding (stride 1 only)."""
    kernel, stride = conv.weight.shape[-2], conv.stride[-2]
    padding = conv.padding[-2]
    if kernel > 1 and (stride != 1 or padding != kernel // 2):
        raise ValueError(
            f"parallel VAE decode handles stride-1 'same' convs; got kernel {kernel}, stride {stride}, "
            f"padding {padding}"
        )
    return padding


@torch.no_grad()
def parallel_decode(
    vae: nn.Module,
    z: torch.Tensor,
    group: dist.ProcessGroup | None,
    *,
    chunk: int | None = 2,
    channels_last: bool | None = None,
) -> torch.Tensor:
    """`vae.decode(z)` with the latent rows split over the ranks of `group`; the whole video on every rank.

    z: [B, Z, T, h, w] (video VAEs) or [B, Z, h, w] (image VAEs) VAE-scale latents, the same on every rank
    of the group. Returns [B, 3, T', 8h, 8w] (or [B, 3, 8h, 8w]) in the VAE dtype, equal to the one-process
    decode (float rounding of differently shaped convs aside). Without a group, with fewer latent rows than
    ranks, or for a VAE that declares no `row_split`, every rank decodes the whole frame. chunk and
    channels_last as in the VAE's `decode` (None: channels-last on CUDA).
    """
    split: RowSplit | None = getattr(type(vae), "row_split", None)
    if (
        split is None
        or group is None
        or dist.get_world_size(group) == 1
        or z.shape[-2] < dist.get_world_size(group)
    ):
        return vae.decode(z, chunk=chunk, channels_last=channels_last)
    channels_last = z.is_cuda if channels_last is None else channels_last
    stripes = StripeDecode(group, z.shape[-2], channels_last=channels_last)
    # Tiles are blended, not exact: a stripe is decoded whole (a VAE without tiling has no attribute).
    tiling = getattr(vae, "tiling", None)
    if tiling is not None:
        vae.tiling = None
    try:
        with stripes.hooks(getattr(vae, split.decoder), split):
            part = vae.decode(
                stripes.stripe(z), chunk=chunk, channels_last=channels_last
            )  # [B, 3, (T',) 8r, 8w]
    finally:
        if tiling is not None:
            vae.tiling = tiling
    return stripes.gather(part)
