"""Sequence parallelism over several streams: joint [text; image] attention, gloo processes against one.

A tiny two-stream transformer written for this test has FLUX's structure: a double stack carrying
(img, txt) that attends over [txt; img] jointly, then a single stack carrying their concatenation, with a
joint positional table (a stand-in for RoPE) split like the tokens. Its plan splits both streams, each
padded on its own: text lengths here are odd, so the last rank's text shard ends in padding in the middle
of its joint sequence, which Ulysses and Ring must exclude by position. Each world (2 processes: Ulysses,
Ring; 4: the Ulysses x Ring hybrid) is spawned once; each case records its largest error against the
one-process output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_parallel import _free_port
from torch import nn

from dit_rt.contract import BlockStack
from dit_rt.ops.attention import Attention
from dit_rt.parallel import (
    ParallelConfig,
    ParallelMesh,
    Replicate,
    SequenceParallel,
    SequencePlan,
    ShardLayout,
    Split,
    gather_streams,
    shard_streams,
)
from dit_rt.runner import BlockRunner

TOL = 1e-5
HEADS, HEAD_DIM = 3, 4  # 3 heads: Ulysses 2 pads a head as well
DIM = HEADS * HEAD_DIM
LENGTHS = {"txt5_img8": (5, 8), "txt3_img7": (3, 7), "txt1_img2": (1, 2)}  # (text, image) tokens
MESHES = {
    2: {"ulysses2": dict(ulysses=2), "ring2": dict(ring=2)},
    4: {"ulysses2_ring2": dict(ulysses=2, ring=2)},
}


def _attend(attn: Attention, qkv: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    q, k, v = qkv.unflatten(-1, (3, HEADS, HEAD_DIM)).unbind(2)  # [B, L, H, Dh]
    return attn(q * pe, k * pe, v).flatten(2)  # [B, L, D]


class DoubleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.img_qkv, self.txt_qkv = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, 3 * DIM)
        self.img_out, self.txt_out = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.attn = Attention()

    def forward(self, img, txt, vec, pe):
        out = _attend(self.attn, torch.cat([self.txt_qkv(txt), self.img_qkv(img)], 1), pe)  # [B, Lt+Li, D]
        t, i = out.split([txt.shape[1], img.shape[1]], 1)
        return img + self.img_out(i) * vec, txt + self.txt_out(t)


class SingleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.attn = Attention()

    def forward(self, x, vec, pe):
        return x + self.out(_attend(self.attn, self.qkv(x), pe)) * vec


class TwoStream(nn.Module):
    stacks = (
        BlockStack("double_blocks", carry=("img", "txt"), args=("vec", "pe")),
        BlockStack("single_blocks", carry=("x",), args=("vec", "pe")),
    )
    sequence_plan = SequencePlan(
        inputs={
            "img": Split("img"), "txt": Split("txt"), "x": Split("txt", "img"),
            "pe": Split("txt", "img", dim=0), "vec": Replicate(),
        },
        attention={"double_blocks.*.attn": ("txt", "img"), "single_blocks.*.attn": ("txt", "img")},
    )  # fmt: skip

    def __init__(self):
        super().__init__()
        self.double_blocks = nn.ModuleList([DoubleBlock() for _ in range(2)])
        self.single_blocks = nn.ModuleList([SingleBlock()])
        self.runner = BlockRunner()

    def forward(self, img, txt, vec, pe):
        img, txt = self.runner(self.double_blocks, (img, txt), vec, pe)
        x = self.runner(self.single_blocks, torch.cat([txt, img], 1), vec, pe)  # [B, Lt+Li, D]
        return x[:, txt.shape[1] :]


def _inputs(lt: int, li: int):
    g = torch.Generator().manual_seed(10 * lt + li)
    img, txt = torch.randn(2, li, DIM, generator=g), torch.randn(2, lt, DIM, generator=g)
    vec = torch.rand(2, 1, DIM, generator=g)
    pe = torch.rand(lt + li, 1, HEAD_DIM, generator=g) + 0.5  # [L, 1, Dh], one row per joint position
    return img, txt, vec, pe


def _model() -> TwoStream:
    torch.manual_seed(0)
    return TwoStream()


def _case(mesh: ParallelMesh, lengths) -> float:
    model, inputs = _model(), _inputs(*lengths)
    with torch.no_grad():
        ref = model(*inputs)
        sp = SequenceParallel.apply(model, mesh)
        out = model(*inputs)
        sp.remove()
        again = model(*inputs)  # remove() restores the one-process model
    return max((out - ref).abs().max().item(), (again - ref).abs().max().item())


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    results = {}
    for name, options in MESHES[world].items():
        mesh = ParallelMesh.build(options, device="cpu")
        for case, lengths in LENGTHS.items():
            results[f"{name}/{case}"] = _case(mesh, lengths)
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=sorted(MESHES))
def world(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"streams{request.param}")
    mp.start_processes(
        _worker, args=(request.param, _free_port(), str(out)), nprocs=request.param, start_method="fork"
    )
    per_rank = [json.loads((out / f"{r}.json").read_text()) for r in range(request.param)]
    return {case: max(r[case] for r in per_rank) for case in per_rank[0]}


def test_joint_attention_processes_match_one(world):
    errors = {case: e for case, e in world.items() if e > TOL}
    assert not errors, f"max abs errors above {TOL}: {errors}"


# ------------------------------------------------------------------------------------------ one process


def test_shard_layout_and_stream_roundtrip():
    # 5 text + 8 image tokens over 2 ranks: shards of 3 + 4 tokens, [t0 t1 t2 i0 i1 i2 i3], [t3 t4 _ i4 .. i7]
    layout = ShardLayout((5, 8), world=2)
    assert layout.shard == 7
    assert layout.real_runs(0) == [(0, 7)] and layout.real_runs(1) == [(0, 2), (3, 4)]
    assert layout.real_runs(0, 2) == [(0, 9), (10, 4)]  # both shards concatenated (a Ulysses gather)
    assert ShardLayout((3, 1), world=4).real_runs(3) == []  # all padding
    assert ShardLayout((9,), world=4).real_runs(0, 4) == [(0, 9)]  # one stream: a prefix, as today
    x = torch.arange(2 * 13 * 3.0).view(2, 13, 3)
    shards = [shard_streams(x, 1, 2, r, (5, 8)) for r in range(2)]
    assert torch.equal(shards[1][:, :2], x[:, 3:5]) and torch.equal(shards[1][:, 2], torch.zeros(2, 3))
    # gather_streams on one process takes the whole joint shard of a one-rank split
    assert torch.equal(gather_streams(shard_streams(x, 1, 1, 0, (5, 8)), 1, None, (5, 8)), x)
    with pytest.raises(ValueError, match=r"streams \(5, 7\) has 13 tokens"):
        shard_streams(x, 1, 2, 0, (5, 7))


def test_one_rank_plan_is_the_plain_model():
    model, inputs = _model(), _inputs(5, 8)
    with torch.no_grad():
        ref = model(*inputs)
        SequenceParallel.apply(model, ParallelMesh(ParallelConfig()))
        torch.testing.assert_close(model(*inputs), ref, atol=1e-6, rtol=0)


def _plan(**changes) -> SequencePlan:
    plan = TwoStream.sequence_plan
    return SequencePlan(
        inputs={**plan.inputs, **changes.get("inputs", {})},
        attention=changes.get("attention", plan.attention),
    )


def test_plan_errors_are_clear():
    model, mesh = _model(), ParallelMesh(ParallelConfig())
    with pytest.raises(
        ValueError, match=r"\['rope'\] is no runner input of its stacks; they take \['img', 'pe'"
    ):
        SequenceParallel.apply(model, mesh, _plan(inputs={"rope": Split("img", dim=0)}))
    inputs = {k: v for k, v in TwoStream.sequence_plan.inputs.items() if k != "vec"}
    with pytest.raises(ValueError, match=r"input\(s\) \['vec'\] \(stack 'double_blocks'\) are not declared"):
        SequenceParallel.apply(model, mesh, SequencePlan(inputs=inputs, attention={}))
    with pytest.raises(ValueError, match=r"attends over \['vec'\], which no input splits"):
        _plan(attention={"single_blocks.*.attn": ("txt", "vec")})
    with pytest.raises(ValueError, match="no Attention module of TwoStream matches 'blocks.*.attn'"):
        SequenceParallel.apply(model, mesh, _plan(attention={"blocks.*.attn": ("img",)}))
    with pytest.raises(ValueError, match="name one or more distinct streams"):
        Split("txt", "txt")
    with pytest.raises(
        TypeError, match=r"input 'vec' is 'replicate'; expected Split\(...\) or Replicate\(\)"
    ):
        _plan(inputs={"vec": "replicate"})
    SequenceParallel.apply(model, mesh)
    img, txt, vec, pe = _inputs(5, 8)
    with pytest.raises(
        ValueError, match=r"'x' holds stream\(s\) \['txt', 'img'\] jointly.*lengths are unknown"
    ):
        model.runner(model.single_blocks, torch.cat([txt, img], 1), vec, pe)  # no double stack ran before
    with pytest.raises(ValueError, match="ran a block list that is none of its declared stacks"):
        model.runner(nn.ModuleList(), img, vec, pe)
