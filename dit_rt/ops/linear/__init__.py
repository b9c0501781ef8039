"""The linear seam: a Linear module whose weight format is applied after load, and the format registry.

Models declare their projections with `Linear` (fused q/k/v with `fused`); the loader fills the
high-precision weight, then `quantize_(model, fmt)` (or `Linear.convert`) turns each weight into its
format once and frees the original: one copy of every weight. Formats (one file per family):

  default                 the model dtype, F.linear
  fp8-per-tensor          e4m3, one weight scale (per fused slice with slice_scales=True), dynamic
                          per-tensor activation scale
  fp8-rowwise             e4m3, per output-row weight scales, dynamic per-token activation scales
  fp8-blockwise           e4m3, 128x128 weight blocks, dynamic 1x128 activation blocks (DeepSeek-V3)
  nvfp4                   e2m1 in 16-blocks, e4m3 block scales, fp32 global scale per slice
  svdquant                4-bit residual + 16-bit low-rank branch after smoothing (W4A4)
  trtllm-fp8-per-tensor,  the fp8 formats with TensorRT-LLM's kernels (needs tensorrt_llm)
  trtllm-fp8-blockwise

Every format runs anywhere: real low-precision kernels where the GPU has them, otherwise an
emulation in fp32 (quantize -> dequantize -> matmul) with the same numerics, which CI tests on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dit_rt.ops.codes import Fp8Codes
from dit_rt.ops.custom import kernel_op
from dit_rt.ops.linear import triton_quant
from dit_rt.ops.linear.base import FLOAT_DTYPES, LinearFormat
from dit_rt.ops.linear.fp8 import Fp8Blockwise, Fp8PerTensor, Fp8Rowwise, gelu_ffn
from dit_rt.ops.linear.nvfp4 import Nvfp4
from dit_rt.ops.linear.svdquant import SVDQuant, record_act_absmax
from dit_rt.ops.linear.trtllm import TrtllmFp8Blockwise, TrtllmFp8PerTensor

LINEAR_FORMATS: dict[str, LinearFormat | None] = {"default": None}
"""Registered formats by name ("default" = plain F.linear); `register_format` adds more."""


def register_format(fmt: LinearFormat) -> LinearFormat:
    """Add a format under `fmt.name` (an existing name is an error)."""
    if fmt.name in LINEAR_FORMATS:
        raise ValueError(f"linear format {fmt.name!r} is already registered")
    LINEAR_FORMATS[fmt.name] = fmt
    return fmt


for _fmt in (
    Fp8PerTensor(),
    Fp8Rowwise(),
    Fp8Blockwise(),
    Nvfp4(),
    SVDQuant(),
    TrtllmFp8PerTensor(),
    TrtllmFp8Blockwise(),
):
    register_format(_fmt)


def linear_formats() -> list[str]:
    """Names of the registered formats."""
    return list(LINEAR_FORMATS)


def get_format(name: str) -> LinearFormat | None:
    if name not in LINEAR_FORMATS:
        raise ValueError(f"unknown linear format {name!r}; valid: {', '.join(LINEAR_FORMATS)}")
    return LINEAR_FORMATS[name]


class Linear(nn.Module):
    """y = x W^T + b, with `weight` (out, in) and `bias` (out,) named as in nn.Linear.

    `sources` names the checkpoint projections fused into this one (e.g. ("to_q", "to_k", "to_v")),
    their output sizes in `splits`; the loader concatenates them along the output dimension.
    After `convert(fmt)` the weight is gone (`weight` is None) and the format's buffers hold it;
    `fmt` names the format. The bias stays in the model dtype.
    """

    def __init__(
        self, in_features, out_features, bias=True, *, sources=None, splits=None, device=None, dtype=None
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.sources = tuple(sources) if sources else None
        self.splits = tuple(splits) if splits else (out_features,)
        if sum(self.splits) != out_features:
            raise ValueError(f"splits {self.splits} do not add up to out_features={out_features}")
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.fmt = "default"
        self._format: LinearFormat | None = None
        self._quant_buffers: list[str] = []

    def extra_repr(self) -> str:
        fused = f", sources={self.sources}" if self.sources else ""
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, fmt={self.fmt}{fused}"

    def register_quant_buffer(self, name: str, t: torch.Tensor) -> None:
        """A format buffer whose dtype is part of the format (fp8 codes, fp32 scales): it moves with
        `.to(device)` but keeps its dtype under `.to(dtype)` / `.half()` (see `_apply`)."""
        self.register_buffer(name, t)
        self._quant_buffers.append(name)

    def convert(self, fmt: str, **opts) -> Linear:
        """Convert the loaded weight to format `fmt` in place, once; frees the high-precision weight.

        Options are per format (fp8-per-tensor: slice_scales, one weight scale per fused slice instead of
        one for the whole weight; fp8-per-tensor and fp8-rowwise: fast_accum, default True, False for
        cuBLAS's fp32-promoted sums; nvfp4: w4a4; svdquant: rank, group_size, w4a4, alpha, act_absmax).
        """
        impl = get_format(fmt)
        if self.fmt != "default":
            raise RuntimeError(f"this Linear is already converted to {self.fmt!r}; convert once, after load")
        if impl is None:
            if opts:
                raise TypeError(f"format 'default' takes no options, got {sorted(opts)}")
            return self
        w = self.weight
        if w.is_meta:
            raise RuntimeError(
                "cannot convert a Linear whose weight is on the meta device: load weights first"
            )
        if w.dtype not in FLOAT_DTYPES:
            raise TypeError(f"cannot convert a {w.dtype} weight to {fmt!r}; expected one of {FLOAT_DTYPES}")
        self.orig_dtype = w.dtype
        with torch.no_grad():
            impl.convert(self, w.detach().float(), **opts)
        self.weight = None  # drops the Parameter: the format's buffers are the only copy now
        self.fmt, self._format = fmt, impl
        return self

    def _apply(self, fn, recurse=True):
        # Format buffers go through `fn` as raw bytes, so device moves, pinning and sharing apply but a
        # dtype cast (model.to(torch.bfloat16)) cannot rewrite fp8 codes or fp32 scales.
        held = {k: self._buffers.pop(k) for k in self._quant_buffers if self._buffers.get(k) is not None}
        super()._apply(fn, recurse)
        for k, t in held.items():
            self._buffers[k] = fn(t.reshape(-1).view(torch.uint8)).view(t.dtype).view(t.shape)
        return self

    def takes_fp8_codes(self, x: torch.Tensor) -> bool:
        """Whether this Linear would take `x` as per-tensor fp8 codes (Fp8Codes) on this device: a format
        with per-tensor activation codes, no K padding, and the real fp8 kernels."""
        from dit_rt.ops.linear.fp8 import fp8_native

        return (
            getattr(self._format, "code_mode", None) == "tensor"
            and self.qweight.shape[1] == self.in_features
            and x.is_cuda
            and fp8_native(x.device)
            and triton_quant.available()
        )

    def forward(self, x: torch.Tensor | Fp8Codes, bias: bool = True) -> torch.Tensor:
        """y = x W^T + b. bias=False (fp8 codes inputs only) leaves b out for the caller's next pass to add:
        a fused kernel reading y anyway adds it for free, where the GEMM's bias epilogue is not."""
        if isinstance(x, Fp8Codes):
            if getattr(self._format, "code_mode", None) != "tensor" or x.q.shape[-1] != self.qweight.shape[1]:
                raise ValueError(
                    f"a {self.fmt!r} Linear of {self.in_features} inputs cannot take these fp8 codes"
                )
            q = x.q.reshape(-1, x.q.shape[-1])
            y = self._format.forward_codes(self, q, x.scale, x.dtype, bias=bias)
            return y.reshape(*x.q.shape[:-1], self.out_features)
        if not bias:
            raise ValueError("Linear(x, bias=False) takes fp8 codes (Fp8Codes), not a tensor")
        if self._format is None:
            return F.linear(x, self.weight, self.bias)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear expects inputs (..., {self.in_features}), got {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{self.fmt} Linear takes {FLOAT_DTYPES} inputs, got {x.dtype}")
        y = self._format.forward(self, x.reshape(-1, self.in_features))  # [M, out]
        return y.reshape(*x.shape[:-1], self.out_features)

    def gelu_tanh(self, x: torch.Tensor) -> torch.Tensor:
        """GELU (tanh approximation) of this projection. In the default format on CUDA the bias and GELU run
        in the GEMM epilogue (cuBLASLt), saving a full read and write of the (large) FFN hidden activation."""
        b = self.bias
        epilogue = self._format is None and x.is_cuda and b is not None and x.dtype == self.weight.dtype
        # the epilogue op has no backward: training (tools/train_tiny.py) takes the plain path
        if epilogue and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, self.weight, b))):
            y = _linear_gelu_tanh(x.reshape(-1, self.in_features), self.weight, self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        return F.gelu(self(x), approximate="tanh")


@kernel_op("dit_rt::linear_gelu_tanh", mutates_args=())
def _linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU-tanh(x W^T + b) with the bias and GELU in cuBLASLt's epilogue. A custom op so that compiled
    blocks keep the epilogue: inductor would decompose `_addmm_activation` into a GEMM and a separate
    GELU pass over the (tokens x ffn_dim) hidden activation."""
    return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)


@_linear_gelu_tanh.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def fused(in_features: int, out_features: int, sources, bias=True, **kw) -> Linear:
    """A projection fusing len(sources) equally sized checkpoint projections into one GEMM."""
    return Linear(
        in_features,
        out_features * len(sources),
        bias,
        sources=sources,
        splits=(out_features,) * len(sources),
        **kw,
    )


def quantize_(
    model: nn.Module, fmt: str, *, filter: Callable[[str, Linear], bool] | None = None, **opts
) -> nn.Module:
    """Convert every dit_rt Linear in `model` (those where filter(name, module) is true) to `fmt`."""
    get_format(fmt)
    for name, m in model.named_modules():
        if isinstance(m, Linear) and (filter is None or filter(name, m)):
            m.convert(fmt, **opts)
    return model


__all__ = [
    "LINEAR_FORMATS",
    "Fp8Codes",
    "Linear",
    "LinearFormat",
    "fused",
    "gelu_ffn",
    "get_format",
    "linear_formats",
    "quantize_",
    "record_act_absmax",
    "register_format",
]
