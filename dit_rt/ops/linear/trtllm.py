"""TensorRT-LLM as an alternative kernel provider for the fp8 formats (`linear="trtllm-fp8-..."`).

Same weight numerics as the torch formats (the CPU emulates them identically); on CUDA the GEMM and
activation quantization come from `torch.ops.trtllm` / `torch.ops.tensorrt_llm`, which exist once
`tensorrt_llm` is imported. The import happens at conversion, never at `import dit_rt`; a missing
package is a clear error there.

- `trtllm-fp8-per-tensor`: `quantize_e4m3_per_tensor` + `cublas_scaled_mm`. A fused projection with
  several slices needs per-column scales, which that op lacks: it runs the torch rowwise GEMM.
- `trtllm-fp8-blockwise`: `fp8_quantize_1x128` + `fp8_block_scaling_gemm` (DeepSeek-style); the
  weight scales are (N/128, K/128) fp32 row-major, without cuBLAS's pad-to-4.
"""

from __future__ import annotations

import functools

from dit_rt.ops.linear.fp8 import Fp8Blockwise, Fp8PerTensor, fp8_native

INSTALL_HINT = (
    "install TensorRT-LLM (`pip install tensorrt_llm`, a CUDA build matching your torch) or use the "
    "torch kernels of the same format"
)


@functools.cache
def require_trtllm():
    """Import tensorrt_llm (registering its torch ops) once; a clear ImportError when it is missing."""
    try:
        import tensorrt_llm
    except ImportError as e:
        raise ImportError(f"this linear format needs the `tensorrt_llm` package: {INSTALL_HINT}") from e
    return tensorrt_llm


class TrtllmFp8PerTensor(Fp8PerTensor):
    name = "trtllm-fp8-per-tensor"

    def convert(self, m, w, **opts):
        require_trtllm()
        super().convert(m, w, **opts)

    def forward_kernel(self, m, x):
        import torch

        if not m.single_scale or m.qweight.shape != (m.out_features, m.in_features):
            return super().forward_kernel(m, x)
        q, s = torch.ops.tensorrt_llm.quantize_e4m3_per_tensor(x)
        y = torch.ops.trtllm.cublas_scaled_mm(
            q, m.qweight.t(), scale_a=s.float(), scale_b=m.weight_scale[:1], bias=None, out_dtype=x.dtype
        )
        return y if m.bias is None else y + m.bias


class TrtllmFp8Blockwise(Fp8Blockwise):
    name = "trtllm-fp8-blockwise"
    pad_scales_to = 1

    def convert(self, m, w, **opts):
        require_trtllm()
        super().convert(m, w, **opts)

    def forward(self, m, x):
        if not (x.is_cuda and fp8_native(x.device)):
            return self.forward_emulated(m, x)
        import torch

        if m.qweight.shape[1] != m.in_features:
            x = torch.nn.functional.pad(x, (0, m.qweight.shape[1] - m.in_features))
        q, s = torch.ops.trtllm.fp8_quantize_1x128(x.to(torch.bfloat16))
        y = torch.ops.trtllm.fp8_block_scaling_gemm(q, m.qweight, s, m.weight_scale).to(x.dtype)
        if y.shape[1] != m.out_features:
            y = y[:, : m.out_features]
        return y if m.bias is None else y + m.bias
