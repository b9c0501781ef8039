"""NVFP4: e2m1 values in blocks of 16 along K, an e4m3 scale per block, an fp32 global scale per slice.

Two-level ("double") quantization: g = amax / (6 * 448) maps the tensor's range onto e4m3 x e2m1,
each block stores sb = e4m3(block_amax / 6 / g), values are e2m1(x / (sb * g)) rounded to nearest,
ties to even. x ~= e2m1 * sb * g. Codes are 4 bits (sign bit 3, magnitude index 0..7 into
{0, .5, 1, 1.5, 2, 3, 4, 6}), packed two per byte, element 2i in the low nibble (torch's
float4_e2m1fn_x2 order). Each fused slice (q/k/v) has its own global scale.

Kernels. sm100+ has block-scaled FP4 tensor cores: with `w4a4` the activation is quantized to NVFP4
per call too and `F.scaled_mm` runs BlockWise1x16 x TensorWise with the block scales in cuBLAS's
swizzled 128x4 layout. sm90 (H100/H200) has no FP4 tensor cores: the weight-only path dequantizes
the weight to the activation dtype per call and runs a plain GEMM, so nvfp4 there saves memory
(4.5 bits per weight), not time. The CPU emulates whichever path `w4a4` selects in fp32.

Error bound (gaussian data): e2m1 has one mantissa bit, so a relative weight error of ~9% rms per
element; a K-long dot product keeps ~9% relative output error for weight-only and ~13% for w4a4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dit_rt.ops.linear.base import LinearFormat, capability, pad2d, round_up

E2M1_MAX = 6.0
E4M3_MAX = 448.0
BLOCK = 16
_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """4-bit e2m1 codes (uint8 in 0..15) of x, already scaled to [-6, 6]; round to nearest, ties to even."""
    a = x.abs().clamp(max=E2M1_MAX)
    mid = torch.tensor(_MIDPOINTS, device=x.device, dtype=a.dtype)
    idx = torch.bucketize(a, mid)  # a == midpoint lands on the lower value
    tie_to_odd = torch.isin(a, mid) & (idx % 2 == 1)
    idx = idx + tie_to_odd.to(idx.dtype)
    sign = (x < 0) & (idx > 0)  # no negative zero code
    return (idx + 8 * sign.to(idx.dtype)).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """fp32 values of uint8 e2m1 codes."""
    lut = torch.tensor(_VALUES + tuple(-v for v in _VALUES), device=codes.device)
    return lut[codes.long()]


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """(..., K) codes -> (..., K / 2) bytes; element 2i in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"packing e2m1 needs an even last dimension, got {tuple(codes.shape)}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """(..., K / 2) bytes -> (..., K) codes."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def quantize_nvfp4(x: torch.Tensor, global_amax: torch.Tensor | None = None):
    """x (R, K) with K % 16 == 0 -> packed codes (R, K/2) uint8, block scales (R, K/16) e4m3, global (1,).

    `global_amax` (per row, (R, 1)) lets fused slices keep their own global scale; default: amax of x.
    """
    x = x.float()
    if global_amax is None:
        global_amax = x.abs().amax().reshape(1)
    g = global_amax.float().clamp(min=1e-12) / (E2M1_MAX * E4M3_MAX)
    blocks = x.unflatten(1, (-1, BLOCK))  # [R, K/16, 16]
    g_b = g.reshape(-1, 1, 1) if g.numel() > 1 else g
    sb = (blocks.abs().amax(dim=2, keepdim=True) / E2M1_MAX / g_b).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    denom = sb.float() * g_b
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))  # all-zero (or underflowed) blocks
    codes = e2m1_encode((blocks / denom).clamp(-E2M1_MAX, E2M1_MAX)).flatten(1)
    return pack_e2m1(codes), sb.squeeze(2), g


def dequantize_nvfp4(packed, block_scale, g, dtype=torch.float32) -> torch.Tensor:
    """Inverse of quantize_nvfp4: (R, K) in `dtype` (math in fp32)."""
    vals = e2m1_decode(unpack_e2m1(packed)).unflatten(1, (-1, BLOCK))  # [R, K/16, 16]
    g_b = g.reshape(-1, 1, 1) if g.numel() > 1 else g
    return (vals * (block_scale.float()[..., None] * g_b)).flatten(1).to(dtype)


def to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """(R, C) block scales -> cuBLAS's swizzled layout: 128x4 tiles, each stored as 32 rows of 16
    (row r of a tile goes to row r % 32, column group r // 32). Pads to R % 128 == 0, C % 4 == 0."""
    R, C = scales.shape
    s = pad2d(scales.view(torch.uint8), round_up(R, 128), round_up(C, 4))
    tiles = s.unflatten(0, (-1, 128)).unflatten(2, (-1, 4)).permute(0, 2, 1, 3)  # [Rt, Ct, 128, 4]
    tiles = tiles.unflatten(2, (4, 32)).transpose(2, 3)  # [Rt, Ct, 32, 4, 4]
    return tiles.flatten().view(scales.dtype)


def nvfp4_native(device: torch.device) -> bool:
    """Block-scaled FP4 GEMM available: sm100+ and a torch with F.scaled_mm."""
    return capability(device) >= (10, 0) and hasattr(F, "scaled_mm")


class Nvfp4(LinearFormat):
    """Options: w4a4 (bool | None): also quantize activations to NVFP4 (the native sm100 GEMM needs
    it); None = True where the native GEMM exists for the weight's device, else weight-only."""

    name = "nvfp4"

    def convert(self, m, w, *, w4a4: bool | None = None):
        N, K = w.shape
        w = pad2d(w, N, round_up(K, 32))  # 16-byte aligned packed rows for the native GEMM
        rows = torch.repeat_interleave(torch.tensor(m.splits, device=w.device))
        slice_amax = torch.stack([p.abs().amax() for p in w.split(m.splits)])  # [S]
        packed, sb, g = quantize_nvfp4(w, slice_amax[rows.to(w.device)][:, None])
        m.register_quant_buffer("qweight", packed)
        m.register_quant_buffer("weight_scale", sb)
        m.register_quant_buffer("weight_global_scale", slice_amax.float().clamp(min=1e-12) / (6.0 * 448.0))
        m.w4a4 = nvfp4_native(w.device) if w4a4 is None else bool(w4a4)

    def weight(self, m, dtype=torch.float32) -> torch.Tensor:
        rows = torch.repeat_interleave(
            torch.arange(len(m.splits), device=m.qweight.device),
            torch.tensor(m.splits, device=m.qweight.device),
        )
        return dequantize_nvfp4(m.qweight, m.weight_scale, m.weight_global_scale[rows][:, None], dtype)

    def forward(self, m, x):
        Kp = m.qweight.shape[1] * 2
        if m.w4a4 and x.is_cuda and nvfp4_native(x.device):
            return self.forward_native(m, x, Kp)
        if m.w4a4:
            xp, xs, xg = quantize_nvfp4(pad2d(x.float(), x.shape[0], Kp))
            xq = dequantize_nvfp4(xp, xs, xg)
            y = F.linear(xq, self.weight(m), None if m.bias is None else m.bias.float())
            return y.to(x.dtype)
        if x.is_cuda:
            # Weight-only: dequantize to the activation dtype, one plain GEMM.
            w = self.weight(m, x.dtype)[:, : m.in_features]
            return F.linear(x, w, m.bias)
        w = self.weight(m)[:, : m.in_features]
        return F.linear(x.float(), w, None if m.bias is None else m.bias.float()).to(x.dtype)

    def forward_native(self, m, x, Kp):
        st, sw = F.ScalingType, F.SwizzleType
        recipe = [st.BlockWise1x16, st.TensorWise]
        swizzle = [sw.SWIZZLE_32_4_4, sw.NO_SWIZZLE]
        xp, xs, xg = quantize_nvfp4(pad2d(x, x.shape[0], Kp))
        a = xp.view(torch.float4_e2m1fn_x2)
        outs = []
        # One GEMM per fused slice: the native kernel takes one global weight scale.
        for i, (qw, sb) in enumerate(
            zip(m.qweight.split(m.splits), m.weight_scale.split(m.splits), strict=True)
        ):
            b = qw.view(torch.float4_e2m1fn_x2).t()
            g_w = m.weight_global_scale[i : i + 1]
            outs.append(
                F.scaled_mm(
                    a, b, [to_blocked(xs), xg], recipe, [to_blocked(sb), g_w], recipe,
                    swizzle_a=swizzle, swizzle_b=swizzle, output_dtype=x.dtype,
                )
            )  # fmt: skip
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return y if m.bias is None else y + m.bias
