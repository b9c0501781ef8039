"""Fp8Codes: an activation its producer already quantized to e4m3 (one per-tensor dequant scale).

A producer kernel that reads every element anyway (LayerNorm + modulation, RMSNorm + RoPE) can write e4m3
codes directly when it knows a bound on its output, which saves the consumer's amax and cast passes. The
consumers that accept codes say so (`Linear.takes_fp8_codes`, `Attention.takes_fp8_codes`); everything
else keeps receiving tensors in the model dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Fp8Codes(NamedTuple):
    q: torch.Tensor  # e4m3 codes: [..., in_features] for a Linear, [B, L, H, Dh] for attention
    scale: torch.Tensor  # (1,) fp32 dequant scale: value ~= code * scale
    dtype: torch.dtype  # the dtype the consumer returns (the model dtype)
    # (1,) fp32 bound on every row's L2 norm (of the dequantized values), when the producer knows one: a
    # consumer GEMM then bounds its own outputs by Cauchy-Schwarz (`gelu_ffn` quantizes its hidden
    # activation with that bound instead of an amax pass).
    row_norm: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def is_cuda(self) -> bool:
        return self.q.is_cuda

    @property
    def device(self) -> torch.device:
        return self.q.device
