"""The channels-last GroupNorm (dit_rt.ops.group_norm): the Triton passes, run by Triton's CPU interpreter in
a subprocess, against F.group_norm and float64 math; the module keeps nn.GroupNorm's keys and CPU path."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dit_rt.ops.group_norm import GroupNorm, group_norm

KERNELS = r"""
import torch, torch.nn.functional as F
from dit_rt.ops import group_norm as G

torch.manual_seed(0)
# C = 128 (4 channels a group), 256 (8 a group); an H*W that is not a multiple of the statistics chunk; an
# offset mean (10 + N(0, 1)) where E[x^2] - E[x]^2 would cancel; batch 2 with different statistics.
for B, C, H, W, offset in ((2, 128, 9, 13, 10.0), (1, 256, 40, 30, 0.0)):
    x = torch.randn(B, C, H, W) * torch.rand(B, C, 1, 1) * 3 + offset
    x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(C), torch.randn(C)
    G._STATS_ROWS = 64  # several chunks per image, so the Chan merge is exercised
    mean, var = G.group_stats(x, 32)
    x64 = x.double().reshape(B, 32, -1)
    assert torch.allclose(mean, x64.mean(-1), rtol=1e-6, atol=1e-6), (mean - x64.mean(-1)).abs().max()
    assert torch.allclose(var, x64.var(-1, unbiased=False), rtol=1e-5, atol=1e-6)
    y = G._group_norm_cl(x, 32, w, b, 1e-6)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.shape == x.shape
    ref = F.group_norm(x.double(), 32, w.double(), b.double(), 1e-6)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-6, err
print("ok")
"""


def test_triton_group_norm_matches_float64():
    pytest.importorskip("triton", reason="the Triton kernels need the triton package (test extra)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run(
        [sys.executable, "-c", KERNELS], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_module_is_a_group_norm_with_the_same_keys_and_cpu_math():
    torch.manual_seed(0)
    ours, ref = GroupNorm(8, 32, eps=1e-6), torch.nn.GroupNorm(8, 32, eps=1e-6)
    assert isinstance(ours, torch.nn.GroupNorm)
    ours.load_state_dict({"weight": torch.randn(32), "bias": torch.randn(32)})
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 32, 5, 7).contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours(x), ref(x))  # CPU: F.group_norm itself
    assert torch.equal(group_norm(x, 8, ours.weight, ours.bias, 1e-6), ref(x))
    assert torch.equal(group_norm(x, 8, None, None, 1e-6), F.group_norm(x, 8, None, None, 1e-6))
