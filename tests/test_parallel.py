"""Multi-process checks of dit_rt.parallel on CPU: 2 and 4 gloo processes against one process.

Each world size is spawned once (module fixture); inside it every case builds its own ParallelMesh,
runs, and records the largest absolute error against the single-process result computed on the same
rank from the same seed. The pytest cases then assert on those records, so each mode fails on its own.
Sequence lengths are chosen so no degree divides them (and at 4 ranks one case leaves a whole shard as
padding); head counts so the Ulysses degree does not divide them.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dit_rt.ops.attention import attention
from dit_rt.ops.attention.sdpa import SDPA
from dit_rt.parallel import (
    ParallelConfig,
    ParallelMesh,
    Replicate,
    SequenceLayout,
    SequenceParallel,
    SequenceParallelAttention,
    SequencePlan,
    Split,
    cfg_gather,
    cfg_select,
    gather_batch,
    gather_sequence,
    merge_partial,
    shard_blocks,
    shard_sequence,
    split_batch,
    split_sizes,
)
from dit_rt.parallel.ring import real_keys

TOL = 1e-5
# (B, L, H, Hk, D): L never divisible by 2 or 4; H = 3, 6 with U = 2, 4 gives padded heads; Hk < H is GQA.
SHAPES = {"even_heads": (2, 13, 4, 4, 8), "odd_heads": (1, 9, 3, 3, 8), "gqa": (1, 11, 6, 2, 16)}
MESHES = {
    2: {"ulysses2": dict(ulysses=2), "ring2": dict(ring=2)},
    4: {
        "ulysses4": dict(ulysses=4),
        "ring4": dict(ring=4),
        "ulysses2_ring2": dict(ulysses=2, ring=2),
        "cfg2_ulysses2": dict(cfg=2, ulysses=2),
        "dp2_ring2": dict(dp=2, ring=2),
    },
}


def _qkv(shape, seed):
    B, L, H, Hk, D = shape
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, L, H, D, generator=g),
        torch.randn(B, L, Hk, D, generator=g),
        torch.randn(B, L, Hk, D, generator=g),
    )


def _attention_case(mesh: ParallelMesh, shape) -> float:
    # Different dp / cfg coordinates run different inputs, as different prompts or passes would.
    seed = 100 * mesh.rank("dp") + 10 * mesh.rank("cfg") + shape[1]
    q, k, v = _qkv(shape, seed)
    ref = attention(q, k, v, scale=0.3)  # [B, L, H, D]
    world, rank = mesh.size("sp"), mesh.rank("sp")
    op = SequenceParallelAttention(SDPA, mesh, SequenceLayout({"x": q.shape[1]}), ("x",))
    local = op(*(shard_sequence(x, 1, world, rank) for x in (q, k, v)), 0.3)  # [B, Ls, H, D]
    out = gather_sequence(local, 1, mesh.group("sp"), q.shape[1])
    return (out - ref).abs().max().item()


def _tiny_wan():
    from dit_rt.models.wan import WanTransformer, WanTransformerConfig

    cfg = WanTransformerConfig(
        num_attention_heads=3, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=32, num_layers=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = WanTransformer(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    g = torch.Generator().manual_seed(1)
    # latent (T, H, W) = (1, 6, 10) -> token grid (1, 3, 5), L = 15: no degree divides it.
    x = torch.randn(2, 4, 1, 6, 10, generator=g)
    context = torch.randn(2, 5, 16, generator=g)
    return model, (x, torch.tensor([3.0, 700.0]), context)


WAN_PLAN = SequencePlan(
    inputs={
        "x": Split("x"), "rope": Split("x", dim=0),
        "context": Replicate(), "context_img": Replicate(), "tproj": Replicate(),
    },
    attention={"blocks.*.attn1.attn": ("x",)},
)  # fmt: skip


def _wan_case(mesh: ParallelMesh) -> float:
    model, inputs = _tiny_wan()
    with torch.no_grad():
        ref = model(*inputs)
        sp = SequenceParallel.apply(model, mesh, WAN_PLAN)
        out = model(*inputs)
        sp.remove()
        again = model(*inputs)  # remove() restores the single-process model
    return max((out - ref).abs().max().item(), (again - ref).abs().max().item())


def _fsdp_case() -> float:
    """FSDP2 over every rank: the blocks' weights sharded, gathered per block, the same output."""
    model, inputs = _tiny_wan()
    with torch.no_grad():
        ref = model(*inputs)
        shard_blocks(model)
        owned = sum(getattr(p, "to_local", lambda p=p: p)().numel() for p in model.blocks.parameters())
        out = model(*inputs)
    whole = sum(p.numel() for p in model.blocks.parameters())
    if owned >= whole:  # the blocks must really be sharded, not replicated
        return float("inf")
    return (out - ref).abs().max().item()


def _cfg_dp_case(mesh: ParallelMesh) -> float:
    """CFG split: each cfg rank runs one pass, cfg_gather gives both; DP: a batch of 3 split and gathered."""
    g = torch.Generator().manual_seed(7)
    cond, uncond, batch = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g), torch.randn(3, 4)
    err = 0.0
    if mesh.size("cfg") == 2:
        mine = cfg_select(cond, uncond, mesh.group("cfg"))
        c, u = cfg_gather(mine * 2 + 1, mesh.group("cfg"))
        err = max((c - (cond * 2 + 1)).abs().max().item(), (u - (uncond * 2 + 1)).abs().max().item())
    if mesh.size("dp") > 1:
        part = split_batch(batch, mesh.group("dp"))
        prompts = split_batch(["a", "b", "c"], mesh.group("dp"))
        if len(part) != len(prompts) or len(part) != split_sizes(3, mesh.size("dp"))[mesh.rank("dp")]:
            return float("inf")
        whole = gather_batch(part * 3, mesh.group("dp"), 3)
        err = max(err, (whole - batch * 3).abs().max().item())
    return err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    # The torchrun environment, without torchrun: dit_rt must initialise the process group itself.
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    results: dict[str, float] = {}
    for name, options in MESHES[world].items():
        mesh = ParallelMesh.build(options, device="cpu")
        for shape_name, shape in SHAPES.items():
            results[f"{name}/{shape_name}"] = _attention_case(mesh, shape)
        if mesh.size("sp") > 1 and mesh.size("dp") == 1:
            results[f"{name}/wan"] = _wan_case(mesh)
        results[f"{name}/cfg_dp"] = _cfg_dp_case(mesh)
    results["fsdp"] = _fsdp_case()
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _spawn(world: int, tmp_path_factory) -> dict[str, float]:
    out = tmp_path_factory.mktemp(f"world{world}")
    # fork, not spawn: the children inherit the imported torch and dit_rt instead of importing them again
    # (seconds each on a loaded 2-core machine); they use one thread and no OpenMP pool of the parent.
    mp.start_processes(_worker, args=(world, _free_port(), str(out)), nprocs=world, start_method="fork")
    per_rank = [json.loads((out / f"{r}.json").read_text()) for r in range(world)]
    return {case: max(r[case] for r in per_rank) for case in per_rank[0]}


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _spawn(2, tmp_path_factory)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _spawn(4, tmp_path_factory)


def _cases(world: int) -> list[str]:
    names = []
    for name, options in MESHES[world].items():
        names += [f"{name}/{s}" for s in SHAPES] + [f"{name}/cfg_dp"]
        if options.get("dp", 1) == 1:
            names.append(f"{name}/wan")
    return names + ["fsdp"]


@pytest.mark.parametrize("case", _cases(2))
def test_two_processes_match_one(world2, case):
    assert world2[case] <= TOL, f"{case}: max abs error {world2[case]:.3g}"


@pytest.mark.parametrize("case", _cases(4))
def test_four_processes_match_one(world4, case):
    assert world4[case] <= TOL, f"{case}: max abs error {world4[case]:.3g}"


# ------------------------------------------------------------------------------------------ one process


def test_config_validation_errors():
    assert ParallelConfig.from_dict(dict(cfg=2, ulysses=2), 4).sp == 2
    assert ParallelConfig.from_dict(None, 1) == ParallelConfig()
    with pytest.raises(ValueError, match=r"need 8 processes but the world size is 4.*nproc-per-node 8"):
        ParallelConfig.from_dict(dict(ulysses=4, ring=2), 4)
    with pytest.raises(ValueError, match="unknown key"):
        ParallelConfig.from_dict(dict(tp=2), 2)
    with pytest.raises(ValueError, match="cfg is 1 or 2"):
        ParallelConfig.from_dict(dict(cfg=4), 4)
    with pytest.raises(ValueError, match="integer >= 1"):
        ParallelConfig.from_dict(dict(ring=0), 1)
    with pytest.raises(ValueError, match="True or False"):
        ParallelConfig.from_dict(dict(fsdp="yes"), 1)


def test_single_process_mesh_without_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    mesh = ParallelMesh.build(None, device="cpu")
    assert mesh.mesh is None and mesh.size("sp") == 1 and mesh.group("ulysses") is None
    with pytest.raises(ValueError, match="world size is 1"):
        ParallelMesh.build(dict(ulysses=2), device="cpu")


def test_shard_and_gather_roundtrip_with_padding():
    x = torch.arange(2 * 9 * 3.0).view(2, 9, 3)
    shards = [shard_sequence(x, 1, 4, r) for r in range(4)]
    assert [s.shape[1] for s in shards] == [3, 3, 3, 3]
    assert torch.equal(shards[3], torch.zeros(2, 3, 3))  # 9 tokens over 4 ranks: the last shard is padding
    assert torch.equal(torch.cat(shards, 1)[:, :9], x)
    assert torch.equal(gather_sequence(x, 1, None, 5), x[:, :5])
    assert [real_keys(9, 3, j) for j in range(4)] == [3, 3, 3, 0]
    assert split_sizes(5, 2) == [3, 2] and split_sizes(1, 2) == [1, 0]


def test_lse_merge_is_exact():
    q, k, v = _qkv((1, 7, 2, 2, 8), 3)
    ref = attention(q, k, v)
    out = lse = None
    for part in (slice(0, 3), slice(3, 5), slice(5, 7)):
        o, l = attention(q, k[:, part], v[:, part], return_lse=True)
        out, lse = merge_partial(out, lse, o, l)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)


def test_plan_errors_name_the_module():
    model, _ = _tiny_wan()
    mesh = ParallelMesh(ParallelConfig())
    with pytest.raises(ValueError, match="no Attention module .* matches 'blocks.\\*.attn9.attn'"):
        SequenceParallel.apply(model, mesh, replace(WAN_PLAN, attention={"blocks.*.attn9.attn": ("x",)}))
    with pytest.raises(ValueError, match="declares no `sequence_plan`"):
        SequenceParallel.apply(torch.nn.Linear(2, 2), mesh)
