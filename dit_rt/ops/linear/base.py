"""What a linear weight format is, and the small helpers every format shares.

A format is a stateless object with two methods: `convert` turns a loaded Linear's high-precision
weight into the format's buffers (registered on the module, so `.to(device)` and `state_dict()` see
them), `forward` computes y = x W^T + b from those buffers. Per-module options live on the module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class LinearFormat:
    """Base of every weight format; subclasses set `name` and implement `convert` and `forward`."""

    name: str = ""

    def convert(self, m, w: torch.Tensor, **opts) -> None:
        """Register the format's buffers on `m` from `w`, the fp32 weight (out, in)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement convert")

    def forward(self, m, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T + b for x (M, in) in a float dtype; returns (M, out) in x.dtype."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad2d(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad a 2-D tensor at the bottom/right to (rows, cols); returns t itself when nothing to pad."""
    if t.shape == (rows, cols):
        return t
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


_CAPABILITIES: dict[int, tuple[int, int]] = {}


def capability(device: torch.device) -> tuple[int, int]:
    """CUDA compute capability of `device`, (0, 0) for anything else; queried once per device (a plain dict:
    torch.compile, which reaches this from the fp8 forwards, traces functools' caches with a warning)."""
    if device.type != "cuda":
        return (0, 0)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITIES:
        _CAPABILITIES[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITIES[index]


def slice_rows(splits: tuple[int, ...], n_padded: int, device) -> torch.Tensor:
    """Slice index of every output row (padding rows count as the last slice)."""
    idx = torch.repeat_interleave(
        torch.arange(len(splits), device=device), torch.tensor(splits, device=device)
    )
    return F.pad(idx, (0, n_padded - idx.numel()), value=len(splits) - 1)
