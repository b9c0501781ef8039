"""Conformance: every runtime feature against the eager output, for every transformer at a tiny config (CPU).

Each case is a transformer that follows `dit_rt.contract` (Wan T2V, Wan I2V, FLUX.1, FLUX.2 with reference
tokens, Cosmos with one timestep per item and with per-frame timesteps, a two-stream transformer
written only for this test: a double stack carrying (img, txt) with joint attention over [txt; img], then a
single stack over their concatenation, as FLUX is built). A new family adds its tiny factory to CASES and
gets every check: the contract's declarations, attention backends, linear formats, step caches at
threshold 0 (exact) and their skip path, block offload, the CUDA graph seam (with the CPU stand-in
recorder of tests/test_graphs.py), per-block compile, and Ulysses / Ring / CFG / DP / FSDP in two gloo
processes against one.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from dit_rt.cache import apply_cache, cache_branch, cache_reset, cache_step, get_cache
from dit_rt.cache.teacache import FLUX_RULES
from dit_rt.compile import apply_compile
from dit_rt.contract import BlockStack, CachePlan, Transformer, block_stacks, check_transformer
from dit_rt.graphs import apply_cuda_graphs
from dit_rt.models.cosmos import CosmosTransformer, CosmosTransformerConfig
from dit_rt.models.flux import (
    Flux2Transformer,
    Flux2TransformerConfig,
    FluxTransformer,
    FluxTransformerConfig,
)
from dit_rt.models.wan import WanTransformer, WanTransformerConfig
from dit_rt.models.wan.transformer import RotaryFreqs, timestep_sinusoid
from dit_rt.offload import apply_offload
from dit_rt.ops import Attention, Linear
from dit_rt.ops.attention import available_attention, register_attention, set_attention, unregister_attention
from dit_rt.ops.linear import quantize_
from dit_rt.parallel import (
    ParallelMesh,
    Replicate,
    SequenceParallel,
    SequencePlan,
    Split,
    cfg_gather,
    cfg_select,
    gather_batch,
    shard_blocks,
    split_batch,
)
from dit_rt.runner import BlockRunner, forward_seam
from tests.test_graphs import fake_capture
from tests.test_parallel import _free_port

# ------------------------------------------------------------------------------ the two-stream transformer


def _rotate(x: torch.Tensor, pe: RotaryFreqs) -> torch.Tensor:
    """Interleaved RoPE on [B, L, H, Dh] with cos / sin [L, 1, Dh/2]."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x1 * pe.cos - x2 * pe.sin, x1 * pe.sin + x2 * pe.cos], dim=-1)
    return out.flatten(-2).type_as(x)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:]) * (1 + scale) + shift


class _Stream(nn.Module):
    """One stream's weights in a double block: modulation, fused qkv, output projection, MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.mod = nn.Linear(dim, 3 * dim)
        self.qkv = Linear(dim, 3 * dim)
        self.out = Linear(dim, dim)
        self.mlp = nn.Sequential(Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), Linear(2 * dim, dim))


class DoubleBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.img, self.txt = _Stream(dim), _Stream(dim)
        self.attn = Attention(head_dim=dim // heads)

    def forward(self, img, txt, vec, pe):
        parts = []
        for s, x in ((self.txt, txt), (self.img, img)):  # joint sequence order: [txt; img]
            shift, scale, gate = s.mod(F.silu(vec))[:, None].chunk(3, dim=-1)
            q, k, v = s.qkv(_modulate(x, shift, scale)).unflatten(-1, (3, self.heads, -1)).unbind(2)
            parts.append((q, k, v, gate))
        q, k, v = (torch.cat([p[i] for p in parts], dim=1) for i in range(3))  # [B, Lt + Li, H, Dh]
        o = self.attn(_rotate(q, pe), _rotate(k, pe), v).flatten(2)
        lt = txt.shape[1]
        out = []
        for s, x, o_s, gate in (
            (self.txt, txt, o[:, :lt], parts[0][3]),
            (self.img, img, o[:, lt:], parts[1][3]),
        ):
            x = x + gate * s.out(o_s)
            out.append(x + s.mlp(F.layer_norm(x, x.shape[-1:])))
        return out[1], out[0]


class SingleBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.mod = nn.Linear(dim, 3 * dim)
        self.qkv = Linear(dim, 3 * dim)
        self.mlp = nn.Sequential(Linear(dim, 2 * dim), nn.GELU(approximate="tanh"))
        self.out = Linear(3 * dim, dim)
        self.attn = Attention(head_dim=dim // heads)

    def forward(self, x, vec, pe):
        shift, scale, gate = self.mod(F.silu(vec))[:, None].chunk(3, dim=-1)
        h = _modulate(x, shift, scale)
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, -1)).unbind(2)
        o = self.attn(_rotate(q, pe), _rotate(k, pe), v).flatten(2)
        return x + gate * self.out(torch.cat([o, self.mlp(h)], dim=-1))


class TwoStreamTransformer(nn.Module):
    """img tokens [B, Li, C], txt tokens [B, Lt, C], timestep [B] -> [B, Li, C]."""

    stacks: ClassVar[tuple[BlockStack, ...]] = (
        BlockStack("double_blocks", carry=("img", "txt"), args=("vec", "pe")),
        BlockStack("single_blocks", carry=("x",), args=("vec", "pe")),
    )
    sequence_plan: ClassVar[SequencePlan] = SequencePlan(
        inputs={
            "img": Split("img"),
            "txt": Split("txt"),
            "x": Split("txt", "img"),
            "pe": Split("txt", "img", dim=0),
            "vec": Replicate(),
        },
        attention={"double_blocks.*.attn": ("txt", "img"), "single_blocks.*.attn": ("txt", "img")},
    )
    cache_plan: ClassVar[CachePlan] = CachePlan(
        residual="img", module_outputs={"modulated": "double_blocks.0.img.mod"}, teacache=FLUX_RULES
    )
    keep_fp32: ClassVar[tuple[str, ...]] = ("time_in",)
    ckpt_key_map: ClassVar[tuple[tuple[str, str | None], ...]] = ()

    def __init__(self, channels: int = 6, dim: int = 24, heads: int = 3, double: int = 2, single: int = 2):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.img_in, self.txt_in = nn.Linear(channels, dim), nn.Linear(channels, dim)
        self.time_in = nn.Linear(16, dim)
        self.double_blocks = nn.ModuleList([DoubleBlock(dim, heads) for _ in range(double)])
        self.single_blocks = nn.ModuleList([SingleBlock(dim, heads) for _ in range(single)])
        self.proj_out = nn.Linear(dim, channels)
        self.runner = BlockRunner()

    def rope(self, length: int, device) -> RotaryFreqs:
        dh = self.dim // self.heads
        angles = torch.arange(length, device=device)[:, None, None] * 0.5 ** torch.arange(
            dh // 2, device=device
        )
        return RotaryFreqs(angles.cos(), angles.sin())  # [L, 1, Dh/2]

    @forward_seam
    def forward(self, img: torch.Tensor, txt: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        lt = txt.shape[1]
        pe = self.rope(lt + img.shape[1], img.device)
        vec = self.time_in(timestep_sinusoid(timestep, 16))  # [B, D]
        img, txt = self.runner(self.double_blocks, (self.img_in(img), self.txt_in(txt)), vec, pe)
        x = self.runner(self.single_blocks, torch.cat([txt, img], dim=1), vec, pe)  # [B, Lt + Li, D]
        return self.proj_out(F.layer_norm(x[:, lt:], (self.dim,)))

    def flops(self, img_len: int, txt_len: int) -> int:
        L, D = img_len + txt_len, self.dim
        double = 2 * L * D * (3 * D + D + 4 * D) + 4 * L * L * D
        single = 2 * L * D * (3 * D + 2 * D) + 2 * L * 3 * D * D + 4 * L * L * D
        return len(self.double_blocks) * double + len(self.single_blocks) * single


# ------------------------------------------------------------------------------------------------ cases


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.2)
    return model.eval()


def _wan(image: bool):
    image_kw = dict(image_dim=12, added_kv_proj_dim=36, in_channels=8) if image else dict(in_channels=4)
    cfg = WanTransformerConfig(
        num_attention_heads=3, attention_head_dim=12, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
        num_layers=3, **image_kw,
    )  # fmt: skip
    model = _randomize(WanTransformer(cfg), 0)
    g = torch.Generator().manual_seed(1)
    # latent (T, H, W) = (1, 6, 10) -> token grid (1, 3, 5), L = 15: no degree divides it.
    x = torch.randn(2, cfg.in_channels, 1, 6, 10, generator=g)
    args = [x, torch.tensor([3.0, 700.0]), torch.randn(2, 5, 16, generator=g)]
    if image:
        args.append(torch.randn(2, 3, 12, generator=g))
    return model, tuple(args)


def _two_stream():
    model = _randomize(TwoStreamTransformer(), 0)
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(2, 7, 6, generator=g), torch.randn(2, 5, 6, generator=g)  # odd lengths: padded
    return model, (img, txt, torch.tensor([3.0, 700.0]))


def _flux():
    cfg = FluxTransformerConfig(
        in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=3,
        joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    model = _randomize(FluxTransformer(cfg), 0)
    g = torch.Generator().manual_seed(1)
    li, lt = 7, 5  # odd lengths: both streams padded
    img_ids = torch.stack([torch.zeros(li), torch.arange(li) // 3, torch.arange(li) % 3], dim=-1)
    # ids as [B, L, 3] (the reference's deprecated form): dp / cfg split every input along the batch
    x, ctx = torch.randn(2, li, 8, generator=g), torch.randn(2, lt, 12, generator=g)
    pooled, t, guidance = (
        torch.randn(2, 10, generator=g),
        torch.tensor([0.003, 0.7]),
        torch.tensor([3.5, 1.0]),
    )
    args = (x, ctx, pooled, t, img_ids.expand(2, li, 3), torch.zeros(2, lt, 3), guidance)
    return model, args


def _flux2():
    cfg = Flux2TransformerConfig(
        in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=3,
        joint_attention_dim=12, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
    )  # fmt: skip
    model = _randomize(Flux2Transformer(cfg), 0)
    g = torch.Generator().manual_seed(1)
    li, lt = 7, 5  # odd lengths: both streams padded; the last 3 image tokens are a reference image's
    img_ids = torch.stack([(torch.arange(li) >= 4) * 10.0, torch.arange(li) % 4 // 2, torch.arange(li) % 2,
                           torch.zeros(li)], dim=-1)  # fmt: skip
    txt_ids = torch.stack([torch.zeros(lt)] * 3 + [torch.arange(lt, dtype=torch.float32)], dim=-1)
    # ids as [B, L, 4] (the pipeline's form): dp / cfg split every input along the batch
    x, ctx = torch.randn(2, li, 8, generator=g), torch.randn(2, lt, 12, generator=g)
    t, guidance = torch.tensor([0.003, 0.7]), torch.tensor([4.0, 1.0])
    return model, (x, ctx, t, img_ids.expand(2, li, 4), txt_ids.expand(2, lt, 4), guidance)


def _cosmos(per_frame: bool):
    """Cosmos-1.0-like (learnable position embedding, one timestep per item) or Predict2.5-like (text
    projection, per-frame timesteps: the modulation is spread over the tokens by their frame indices)."""
    variant = (
        dict(use_crossattn_projection=True, crossattn_proj_in_channels=20, encoder_hidden_states_channels=16)
        if per_frame
        else dict(extra_pos_embed_type="learnable")
    )
    cfg = CosmosTransformerConfig(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=3,
        mlp_ratio=2.0, text_embed_dim=16, adaln_lora_dim=8, max_size=(8, 16, 16),
        **{"extra_pos_embed_type": None, **variant},
    )  # fmt: skip
    model = _randomize(CosmosTransformer(cfg), 0)
    g = torch.Generator().manual_seed(1)
    if per_frame:  # latent (3, 2, 6) -> token grid (3, 1, 3), L = 9 over three frames
        x = torch.randn(2, 4, 3, 2, 6, generator=g)
        t = torch.tensor([[0.01, 0.5, 0.5], [0.01, 0.9, 0.9]])[:, None, :, None, None]
    else:  # latent (1, 6, 10) -> token grid (1, 3, 5), L = 15
        x = torch.randn(2, 4, 1, 6, 10, generator=g)
        t = torch.tensor([0.3, 0.7])
    return model, (x, t, torch.randn(2, 5, cfg.context_dim, generator=g))


CASES: dict[str, Callable[[], tuple[nn.Module, tuple]]] = {
    "wan-t2v": lambda: _wan(image=False),
    "wan-i2v": lambda: _wan(image=True),
    "two-stream": _two_stream,
    "flux": _flux,
    "flux2": _flux2,
    "cosmos": lambda: _cosmos(per_frame=False),
    "cosmos-per-frame": lambda: _cosmos(per_frame=True),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    model, inputs = CASES[request.param]()
    with torch.no_grad():
        eager = model(*inputs)
    return request.param, model, inputs, eager


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def _with_timestep(inputs: tuple, t: float) -> tuple:
    """The case's inputs at another timestep (the timestep is the only [B] float input)."""
    return tuple(torch.full_like(a, t) if a.ndim == 1 else a for a in inputs)


# ------------------------------------------------------------------------------------------------ checks


def test_declarations(case):
    _, model, inputs, _ = case
    check_transformer(model)
    assert isinstance(model, Transformer)
    assert [s.blocks for s in block_stacks(model)] == [getattr(model, s.blocks) for s in model.stacks]


@torch.no_grad()
def test_attention_backends(case):
    _, model, inputs, eager = case

    @register_attention("conformance-math")
    def naive(q, k, v, attn_mask=None, scale=None):  # (B, L, H, D), the textbook formula
        s = torch.einsum("blhd,bmhd->bhlm", q, k) * (scale or q.shape[-1] ** -0.5)
        return torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v)

    try:
        names = available_attention("cpu", torch.float32)
        assert "sdpa" in names and "conformance-math" in names
        m = copy.deepcopy(model)
        for name in names:
            set_attention(m, name, device="cpu", dtype=torch.float32)
            assert _rel(m(*inputs), eager) < 1e-5, name
    finally:
        unregister_attention("conformance-math")


# Relative L2 error vs the float32 output: the emulated formats' own error at these tiny widths.
LINEAR_TOL = {"fp8-per-tensor": 0.1, "fp8-rowwise": 0.1, "fp8-blockwise": 0.1, "nvfp4": 0.4, "svdquant": 0.4}
# At the tiny widths here svdquant's default rank (32) covers the whole input: rank 4 leaves a 4-bit residual.
LINEAR_OPTS = {"svdquant": dict(rank=4)}


@torch.no_grad()
@pytest.mark.parametrize("fmt", list(LINEAR_TOL))
def test_linear_formats(case, fmt):
    _, model, inputs, eager = case
    m = copy.deepcopy(model)
    quantize_(m, fmt, **LINEAR_OPTS.get(fmt, {}))
    err = _rel(m(*inputs), eager)
    assert 1e-3 < err < LINEAR_TOL[fmt], f"{fmt}: relative error {err:.3g}"  # quantized, within bounds


CACHES = {
    "fbcache": dict(kind="fbcache", threshold=0.0),
    "teacache": dict(kind="teacache", threshold=0.0, coefficients=[1.0, 0.0]),
}


def _steps(model, inputs, steps=3):
    cache_reset(model, steps)
    outs = []
    for i, t in enumerate(torch.linspace(999, 100, steps).tolist()):
        cache_step(model, i)
        for branch, scale in (("cond", 1.0), ("uncond", -1.0)):
            with cache_branch(model, branch):
                outs.append(model(*_with_timestep(inputs, t)) * scale)
    return outs


@torch.no_grad()
@pytest.mark.parametrize("kind", list(CACHES))
def test_step_caches_at_threshold_zero_are_exact(case, kind):
    _, model, inputs, _ = case
    expected = _steps(model, inputs)
    m = copy.deepcopy(model)
    apply_cache(m, CACHES[kind])
    got = _steps(m, inputs)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert get_cache(m).stats()["skipped"] == 0
    assert all(
        r.stack_hook is get_cache(m) for r in {id(s.runner): s.runner for s in block_stacks(m)}.values()
    )


@torch.no_grad()
def test_skipped_call_is_the_cached_residual_of_every_stack(case):
    """FBCache over the same input twice: the second call is skipped, every stack (the lead's tail and each
    follower) then adds its cached residual, which reproduces the computed output."""
    _, model, inputs, eager = case
    m = copy.deepcopy(model)
    cache = apply_cache(m, dict(kind="fbcache", threshold=1e9))
    cache_reset(m)
    first, second = m(*inputs), m(*inputs)
    assert [d for _, _, d in cache.decisions] == [True, False]
    assert torch.equal(first, eager) and _rel(second, eager) < 1e-5
    assert len(cache.states["default"].followers) == len(block_stacks(m)) - 1


@torch.no_grad()
def test_block_offload(case):
    _, model, inputs, eager = case
    m = copy.deepcopy(model)
    hook = apply_offload(m, "block", device="cpu", resident=1, buffers=2)
    hook.log = []
    assert torch.equal(m(*inputs), eager) and torch.equal(m(*inputs), eager)
    n = sum(len(s.blocks) for s in block_stacks(m))  # numbered in run order over the stacks
    assert [e[1] for e in hook.log if e[0] == "run"] == 2 * list(range(1, n))


@torch.no_grad()
def test_cuda_graph_seams(case):
    """The whole forward through `forward_seam`; with a step cache, each stack's ranges."""
    _, model, inputs, eager = case
    m = copy.deepcopy(model)
    graphs = apply_cuda_graphs(m, capture=fake_capture)
    other = _with_timestep(inputs, 500.0)
    assert torch.equal(m(*inputs), eager)
    assert torch.equal(m(*other), model(*other))  # a replay with new inputs
    assert graphs.captures == 1 and graphs.replays == 2 and [k[0] for k in graphs.graphs] == ["forward"]
    apply_cache(m, dict(kind="fbcache", threshold=0.0))
    cache_reset(m)
    assert torch.equal(m(*inputs), eager)
    names = [s.name for s in block_stacks(m)]
    ranges = {k[:3] for k in graphs.graphs if k[0] != "forward"}
    assert ranges == {(0, 1, names[0]), (1, None, names[0]), *((0, None, n) for n in names[1:])}


@torch.no_grad()
def test_per_block_compile(case):
    _, model, inputs, eager = case
    torch._dynamo.reset()
    m = copy.deepcopy(model)
    # aot_eager: the blocks traced whole (fullgraph) as inductor would take them, without its C++ build
    # (30 s for this tiny case on a CPU; the GPU benchmarks run inductor).
    apply_compile(m, backend="aot_eager")
    try:
        assert _rel(m(*inputs), eager) < 1e-5
        assert all(b._compiled_call_impl is not None for s in block_stacks(m) for b in s.blocks)
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------ two gloo processes

MESHES = {"ulysses2": dict(ulysses=2), "ring2": dict(ring=2), "cfg2": dict(cfg=2), "dp2": dict(dp=2)}


def _parallel_case(factory, options: dict | None) -> float:
    model, inputs = factory()
    with torch.no_grad():
        ref = model(*inputs)
        if options is None:  # FSDP over both ranks
            shard_blocks(model)
            return _rel(model(*inputs), ref)
        mesh = ParallelMesh.build(options, device="cpu")
        if mesh.size("sp") > 1:
            sp = SequenceParallel.apply(model, mesh)
            out = model(*inputs)
            sp.remove()
            return max(_rel(out, ref), _rel(model(*inputs), ref))
        if mesh.size("dp") > 1:  # each rank its part of the batch
            part = model(*(split_batch(a, mesh.group("dp")) for a in inputs))
            return _rel(gather_batch(part, mesh.group("dp"), len(ref)), ref)
        # cfg: rank 0 runs the first sample, rank 1 the second, as the two guidance passes
        mine = cfg_select(*(tuple(a[i : i + 1] for a in inputs) for i in (0, 1)), mesh.group("cfg"))
        return _rel(torch.cat(cfg_gather(model(*mine), mesh.group("cfg"))), ref)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    results: dict[str, float | str] = {}
    for name, factory in CASES.items():
        for mode, options in [*MESHES.items(), ("fsdp", None)]:
            try:
                results[f"{name}/{mode}"] = _parallel_case(factory, options)
            except Exception as e:  # reported per case by the test below
                results[f"{name}/{mode}"] = f"{type(e).__name__}: {e}"
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    out = tmp_path_factory.mktemp("conformance")
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=2, start_method="fork")
    return [json.loads((out / f"{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("mode", [*MESHES, "fsdp"])
@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_match_one(world2, name, mode):
    for rank in world2:
        err = rank[f"{name}/{mode}"]
        assert not isinstance(err, str), err
        assert err < 1e-5, f"{name}/{mode}: relative error {err:.3g}"
