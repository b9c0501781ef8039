"""fp8 GEMM ending in bias + GELU and an e4m3 output, from cuBLASLt's epilogue (called through ctypes).

torch's scaled-mm exposes cuBLASLt's bias epilogue and a bf16 / fp32 output only. A DiT feed-forward's up
projection then writes its (tokens x ffn_dim) hidden activation in bf16, and a second pass reads it back
to add GELU and quantize it for the down projection: at Wan 1.3B (32,760 x 8,960) 880 MB of traffic, ~0.3
ms on an H100 per block. cuBLASLt itself can finish the GEMM with the bias, GELU (tanh approximation) and
a scaled cast to e4m3:

    codes = e4m3(out_scale * GELU-tanh(scale_a * scale_w * (a @ w^T) + bias))

written once, from the fp32 accumulator (one rounding, where the bf16 round trip rounds twice).

The library is the libcublasLt torch has loaded (opened at import; no CUDA work); nothing is compiled. A
plan (descriptors, layouts and the heuristic's algorithm) is built once per shape, outside any CUDA graph
capture (the graph recorder warms up first); the scale, bias and output pointers are set per call. One
workspace per device is shared by every call on it: the calls run in stream order (two streams issuing
these GEMMs at once would need their own). The GEMM is a custom op, so compiled blocks keep it and CUDA
graphs capture it like any cuBLAS call.

Off the GPU (or without the library) the same formula runs in fp32 on the dequantized codes (`emulate`):
equal to cuBLAS up to summation order and its GELU's last bit.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from dit_rt.ops.custom import kernel_op
from dit_rt.ops.linear.base import capability

E4M3 = torch.float8_e4m3fn

# cublasLt.h / library_types.h values (stable across CUDA 12 and 13).
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_DESC_A_SCALE, _DESC_B_SCALE, _DESC_D_SCALE = 17, 18, 20
_DESC_FAST_ACCUM, _DESC_BIAS_DATA_TYPE = 25, 26
_PREF_MAX_WORKSPACE_BYTES = 1
_EPILOGUE_GELU, _EPILOGUE_GELU_BIAS = 32, 36
_OP_N, _OP_T = 0, 1
_COMPUTE_32F = 68
_R_32F, _R_16F, _R_16BF, _R_8F_E4M3 = 0, 2, 14, 28
_DTYPES = {torch.bfloat16: _R_16BF, torch.float16: _R_16F}
_WORKSPACE_BYTES = 32 << 20
_LIB_NAMES = ("libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so")


class _HeuristicResult(ctypes.Structure):
    _fields_ = [
        ("algo", ctypes.c_uint64 * 8),  # cublasLtMatmulAlgo_t
        ("workspace_size", ctypes.c_size_t),
        ("state", ctypes.c_int),
        ("waves_count", ctypes.c_float),
        ("reserved", ctypes.c_int * 4),
    ]


def _load(names=_LIB_NAMES):
    """libcublasLt with the prototypes set (pointers must not pass as C ints), or None."""
    lib = None
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return None
    p, i, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    ptr_p = ctypes.POINTER(ctypes.c_void_p)
    prototypes = {
        "cublasLtCreate": [ptr_p],
        "cublasLtMatmulDescCreate": [ptr_p, i, i],
        "cublasLtMatmulDescSetAttribute": [p, i, p, size],
        "cublasLtMatrixLayoutCreate": [ptr_p, i, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64],
        "cublasLtMatmulPreferenceCreate": [ptr_p],
        "cublasLtMatmulPreferenceSetAttribute": [p, i, p, size],
        "cublasLtMatmulAlgoGetHeuristic": [p] * 7 + [i, ctypes.POINTER(_HeuristicResult), ctypes.POINTER(i)],
        "cublasLtMatmul": [p] * 13 + [p, size, p],
    }
    for fn, argtypes in prototypes.items():
        f = getattr(lib, fn)
        f.argtypes, f.restype = argtypes, ctypes.c_int
    return lib


# Opened at import: a CUDA build of torch has loaded libcublasLt already (this only takes a reference), and
# torch.compile then reads a plain constant instead of tracing into ctypes.
_LIB = _load()
_ENABLED = _LIB is not None


def set_enabled(enabled: bool) -> None:
    """Switch the epilogue path on or off (`gelu_ffn` then runs the separate GELU-cast pass): for A/B timing,
    or should a cuBLAS release misbehave. On by default where the library loads."""
    global _ENABLED
    _ENABLED = bool(enabled) and _LIB is not None


def available(device: torch.device) -> bool:
    """The epilogue GEMM runs on this device: CUDA sm89+ (fp8 tensor cores), libcublasLt loaded, enabled."""
    return capability(device) >= (8, 9) and _ENABLED  # (0, 0) off CUDA


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt {what} failed with status {status} (cublasStatus_t)")


def _set(setter, obj, attr: int, value) -> None:
    _check(setter(obj, attr, ctypes.byref(value), ctypes.sizeof(value)), f"attribute {attr}")


class _Plan:
    """Descriptors and algorithm of one (M, N, K, bias dtype, fast_accum) problem. cuBLAS is column-major:
    the row-major output (M, N) is its (N, M) D = op(A) B with A = w (K x N, transposed), B = a (K x M)."""

    def __init__(self, lib, handle, M: int, N: int, K: int, bias_dtype, fast_accum: bool):
        self.desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _R_32F), "descriptor")
        setattr_ = lib.cublasLtMatmulDescSetAttribute
        _set(setattr_, self.desc, _DESC_TRANSA, ctypes.c_int32(_OP_T))
        _set(setattr_, self.desc, _DESC_TRANSB, ctypes.c_int32(_OP_N))
        _set(setattr_, self.desc, _DESC_FAST_ACCUM, ctypes.c_int8(int(fast_accum)))
        epilogue = _EPILOGUE_GELU if bias_dtype is None else _EPILOGUE_GELU_BIAS
        _set(setattr_, self.desc, _DESC_EPILOGUE, ctypes.c_uint32(epilogue))
        # An e4m3 D takes a 16-bit C descriptor, of the bias' type; C itself is NULL (beta = 0; cuBLASLt
        # refuses C == D with differing descriptors).
        c_type = _DTYPES[bias_dtype or torch.bfloat16]
        if bias_dtype is not None:
            _set(setattr_, self.desc, _DESC_BIAS_DATA_TYPE, ctypes.c_int32(c_type))
        self.layouts = []
        for dtype, rows, cols in ((_R_8F_E4M3, K, N), (_R_8F_E4M3, K, M), (c_type, N, M), (_R_8F_E4M3, N, M)):
            layout = ctypes.c_void_p()
            _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), dtype, rows, cols, rows), "layout")
            self.layouts.append(layout)
        pref = ctypes.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
        _set(
            lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_MAX_WORKSPACE_BYTES,
            ctypes.c_uint64(_WORKSPACE_BYTES),
        )  # fmt: skip
        self.result, count = _HeuristicResult(), ctypes.c_int(0)
        _check(
            lib.cublasLtMatmulAlgoGetHeuristic(
                handle, self.desc, *self.layouts, pref, 1, ctypes.byref(self.result), ctypes.byref(count)
            ),
            "heuristic",
        )
        if count.value == 0:
            raise RuntimeError(f"cuBLASLt has no fp8 GELU-epilogue algorithm for M={M}, N={N}, K={K}")


@functools.cache
def _handle(device_index: int):
    handle = ctypes.c_void_p()
    with torch.cuda.device(device_index):
        _check(_LIB.cublasLtCreate(ctypes.byref(handle)), "handle creation")
    return handle


@functools.cache
def _workspace(device_index: int) -> torch.Tensor:
    return torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=torch.device("cuda", device_index))


@functools.cache
def _plan(device_index: int, M: int, N: int, K: int, bias_dtype, fast_accum: bool) -> _Plan:
    return _Plan(_LIB, _handle(device_index), M, N, K, bias_dtype, fast_accum)


def check_args(a, w, scale_a, scale_w, bias, out_scale) -> None:
    """The operands the epilogue GEMM takes; a clear error for anything else (before any GPU work)."""
    if a.dtype != E4M3 or w.dtype != E4M3:
        raise TypeError(f"gemm_gelu_fp8 takes e4m3 codes, got {a.dtype} and {w.dtype}")
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"gemm_gelu_fp8 takes a (M, K) and w (N, K), got {tuple(a.shape)}, {tuple(w.shape)}")
    if a.shape[1] % 16 or w.shape[0] % 16:
        raise ValueError(f"fp8 GEMMs need K and N divisible by 16, got K={a.shape[1]}, N={w.shape[0]}")
    if not (a.is_contiguous() and w.is_contiguous()):
        raise ValueError("gemm_gelu_fp8 takes contiguous (row-major) codes")
    for name, s in (("scale_a", scale_a), ("scale_w", scale_w), ("out_scale", out_scale)):
        if s.numel() != 1 or s.dtype != torch.float32:
            raise ValueError(
                f"{name} must be one fp32 value (a per-tensor scale), got {tuple(s.shape)} {s.dtype}"
            )
    if bias is not None and (bias.shape != (w.shape[0],) or bias.dtype not in _DTYPES):
        raise ValueError(
            f"bias must be ({w.shape[0]},) in bfloat16 or float16, got {tuple(bias.shape)} {bias.dtype}"
        )


def gemm_gelu_fp8(
    a: torch.Tensor,
    w: torch.Tensor,
    scale_a: torch.Tensor,
    scale_w: torch.Tensor,
    bias: torch.Tensor | None,
    out_scale: torch.Tensor,
    fast_accum: bool = True,
) -> torch.Tensor:
    """e4m3 codes (M, N) of GELU-tanh(scale_a * scale_w * (a @ w^T) + bias) * out_scale, saturated at +-448.

    a (M, K) and w (N, K): e4m3 codes, contiguous; scale_a, scale_w: their fp32 dequant scales (1,);
    out_scale (1,): the multiplier before the cast (448 / the output's bound); bias (N,) bf16/fp16 or None.
    On CUDA with cuBLASLt the epilogue GEMM runs; elsewhere `emulate`."""
    check_args(a, w, scale_a, scale_w, bias, out_scale)
    return _gemm_gelu_op(a, w, scale_a.reshape(1), scale_w.reshape(1), bias, out_scale.reshape(1), fast_accum)


def emulate(a, w, scale_a, scale_w, bias, out_scale) -> torch.Tensor:
    """The epilogue GEMM's definition in fp32 (summation order aside)."""
    h = (a.float() @ w.float().t()) * (scale_a.float() * scale_w.float())
    if bias is not None:
        h = h + bias.float()
    return (F.gelu(h, approximate="tanh") * out_scale.float()).clamp(-448.0, 448.0).to(E4M3)


@kernel_op("dit_rt::fp8_gemm_gelu", mutates_args=())
def _gemm_gelu_op(
    a: torch.Tensor,
    w: torch.Tensor,
    scale_a: torch.Tensor,
    scale_w: torch.Tensor,
    bias: torch.Tensor | None,
    out_scale: torch.Tensor,
    fast_accum: bool,
) -> torch.Tensor:
    if not available(a.device):
        return emulate(a, w, scale_a, scale_w, bias, out_scale)
    M, K = a.shape
    N = w.shape[0]
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    lib, plan, ws = (
        _LIB,
        _plan(index, M, N, K, None if bias is None else bias.dtype, fast_accum),
        _workspace(index),
    )
    out = torch.empty(M, N, dtype=E4M3, device=a.device)
    setattr_ = lib.cublasLtMatmulDescSetAttribute
    # cuBLAS's A is the weight and B the activations (see _Plan).
    for attr, t in ((_DESC_A_SCALE, scale_w), (_DESC_B_SCALE, scale_a), (_DESC_D_SCALE, out_scale)):
        _set(setattr_, plan.desc, attr, ctypes.c_void_p(t.data_ptr()))
    if bias is not None:
        _set(setattr_, plan.desc, _DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
    alpha, beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
    a_desc, b_desc, c_desc, d_desc = plan.layouts
    stream = torch.cuda.current_stream(a.device).cuda_stream
    _check(
        lib.cublasLtMatmul(
            _handle(index), plan.desc, ctypes.byref(alpha), w.data_ptr(), a_desc, a.data_ptr(), b_desc,
            ctypes.byref(beta), None, c_desc, out.data_ptr(), d_desc,
            ctypes.byref(plan.result.algo), ws.data_ptr(), _WORKSPACE_BYTES, stream,
        ),
        "matmul",
    )  # fmt: skip
    return out


@_gemm_gelu_op.register_fake
def _(a, w, scale_a, scale_w, bias, out_scale, fast_accum):
    return a.new_empty(a.shape[0], w.shape[0], dtype=E4M3)
