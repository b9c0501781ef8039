"""Sparse VideoGen attention (`attention="svg"`, dit_rt.ops.attention.svg) on CPU in float32.

The kernel against dense attention under the same mask, built here from the definition; the layout transform;
the head classifier on synthetic spatial / temporal heads; the seam (geometry and step from the model and the
pipeline, dense warm-up, clear errors); and whole pipelines (Wan T2V, Wan I2V, Cosmos Video2World) against
the same pipeline with dense attention.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_checkpoints import make_wan_i2v, make_wan_t2v

import dit_rt
from dit_rt.ops.attention import (
    Attention,
    attention_context,
    attention_step,
    resolve_attention,
    set_attention,
    set_video_grid,
    svg,
)
from dit_rt.runtime import RuntimeOptions

GRID = (3, 5, 4)  # frames, height, width tokens: 60 tokens, 20 per frame
CHUNK = 8  # 8 query chunks, the last one partial
BLOCK = 8  # svg2's mask blocks


def _positions(grid: tuple[int, int, int], temporal: bool) -> torch.Tensor:
    """Where each frame-major token sits in the head's layout, from the definition: token (f, s) is at
    f * S + s frame-major and at s * F + f token-major."""
    frames, s = grid[0], grid[1] * grid[2]
    n = torch.arange(frames * s)
    return (n % s) * frames + n // s if temporal else n


def _masked_dense(q, k, v, grid, temporal, chunk, radius):
    """Dense attention per (batch, head) restricted to the windows in the head's layout: query position p
    attends to key positions j with a - radius <= j < a + chunk + radius, a = p's chunk start: q/k/v
    [B, N, H, D]."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            pos = _positions(grid, bool(temporal[b, h]))
            start = pos[:, None] // chunk * chunk
            mask = (pos[None, :] >= start - radius) & (pos[None, :] < start + chunk + radius)
            x = [t[b, :, h][None, None] for t in (q, k, v)]  # [1, 1, N, D]
            out[b, :, h] = F.scaled_dot_product_attention(*x, attn_mask=mask)[0, 0]
    return out


def _qkv(b=2, n=60, h=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, h, d, generator=g) for _ in range(3)]


def _pairs(n: int, chunk: int, radius: int) -> int:
    """Query-key pairs the windows keep, counted one by one."""
    return sum(
        i // chunk * chunk - radius <= j < i // chunk * chunk + chunk + radius
        for i in range(n)
        for j in range(n)
    )


def test_windows_equal_masked_dense():
    q, k, v = _qkv()
    sdpa = resolve_attention("sdpa", device="cpu")
    plan = svg.make_plan(GRID, CHUNK, 0.4, 16, torch.device("cpu"))
    # the widest radius within the budget
    assert plan.radius >= 1 and _pairs(60, CHUNK, plan.radius) / 60**2 == pytest.approx(plan.share)
    assert plan.share <= 0.4 < _pairs(60, CHUNK, plan.radius + 1) / 60**2
    assert svg.window_radius(60, CHUNK, 0.01) == 0 and svg.window_radius(60, CHUNK, 1.0) == 60
    temporal = torch.tensor([[False, True, True, False], [True, False, True, False]])
    placed = [svg.place(x, temporal, plan) for x in (q, k, v)]  # [B, N, H, D]
    out = svg.unplace(svg.window_attention(*placed, plan, 16**-0.5, sdpa), temporal, plan)
    expected = _masked_dense(q, k, v, GRID, temporal, CHUNK, plan.radius)
    assert (out - expected).abs().max() <= 1e-5
    dense = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert (out - dense).abs().max() > 1e-2  # the windows leave keys out
    # The op's own path (classify, then the same windows) against the same definition.
    out, chosen = svg.sparse_attention(q, k, v, plan, 16**-0.5, sdpa)
    assert (out - _masked_dense(q, k, v, GRID, chosen, CHUNK, plan.radius)).abs().max() <= 1e-5
    # the profiling masks are the same windows, on the sampled rows
    for t, mask in enumerate(plan.masks):
        pos = _positions(GRID, bool(t))
        start = pos[plan.rows, None] // CHUNK * CHUNK
        assert torch.equal(
            mask, (pos[None] >= start - plan.radius) & (pos[None] < start + CHUNK + plan.radius)
        )


def test_layout_transform_round_trips():
    x = torch.randn(2, 60, 3, 8)
    token_major = svg.to_token_major(x, GRID)
    assert torch.equal(svg.to_frame_major(token_major, GRID), x)
    frames, s = GRID[0], GRID[1] * GRID[2]
    for p in (0, 1, 7, 59):  # token-major position p holds token p // F of frame p % F
        assert torch.equal(token_major[:, p], x[:, (p % frames) * s + p // frames])
    plan = svg.make_plan(GRID, CHUNK, 0.4, 16, torch.device("cpu"))
    temporal = torch.tensor([[True, False, True], [False, False, True]])
    placed = svg.place(x, temporal, plan)  # [B, N, H, D]
    assert torch.equal(placed[0, :, 0], token_major[0, :, 0]) and torch.equal(placed[0, :, 1], x[0, :, 1])
    assert torch.equal(svg.unplace(placed, temporal, plan), x)


def _synthetic(kinds: list[str], grid=(4, 3, 4), d=16, strength=6.0, seed=0):
    """q = k per head: a one-hot of the token's frame (a spatial head: it attends within its frame) or of its
    place in the frame (a temporal head: it attends to that place in every frame), scaled, plus noise."""
    frames, s = grid[0], grid[1] * grid[2]
    n = torch.arange(frames * s)
    g = torch.Generator().manual_seed(seed)
    heads = []
    for kind in kinds:
        key = n // s if kind == "spatial" else n % s
        heads.append(F.one_hot(key, d).float() * strength + 0.1 * torch.randn(len(n), d, generator=g))
    qk = torch.stack(heads, dim=1)[None].expand(2, -1, -1, -1)  # [2, N, H, D]
    return qk, qk, torch.randn(qk.shape, generator=g)


def test_classifier_picks_the_pattern():
    kinds = ["spatial", "temporal", "temporal", "spatial"]
    q, k, v = _synthetic(kinds)
    plan = svg.make_plan((4, 3, 4), 4, 0.3, 16, torch.device("cpu"))
    err = svg.profile(q, k, v, plan, 1.0)  # [B, H, 2]
    chosen = err.argmin(-1)
    assert chosen.tolist() == [[0, 1, 1, 0]] * 2
    ratio = err.min(-1).values / err.max(-1).values
    assert (ratio < 0.5).all(), err  # clearly decided, not a tie
    # against the definition in float64: a softmax over each pattern's keys alone
    q64, k64, v64 = (t.double().transpose(1, 2) for t in (q, k, v))
    s = q64[:, :, plan.rows] @ k64.transpose(-1, -2)  # [B, H, m, N]
    exact = s.softmax(-1) @ v64
    want = [
        ((s.masked_fill(~m, float("-inf")).softmax(-1) @ v64 - exact) ** 2).mean((-1, -2)) for m in plan.masks
    ]
    torch.testing.assert_close(err.double(), torch.stack(want, -1), rtol=1e-4, atol=1e-7)
    # a pattern that keeps no weight (every kept logit far below the row's best): zero output, finite error
    far = q.clone()
    far[:, plan.rows] *= 400
    p = (far[:, plan.rows].transpose(1, 2) @ k.permute(0, 2, 3, 1)).softmax(-1)
    assert ((p * plan.masks[0]).sum(-1) == 0).any()  # the case is there
    assert torch.isfinite(svg.profile(far, k, v, plan, 1.0)).all()


# ------------------------------------------------------------------------------------------------ the seam


@pytest.fixture(scope="module")
def wan_t2v(tmp_path_factory):
    path = tmp_path_factory.mktemp("svg_wan")
    make_wan_t2v(path)
    return path


def _wan_inputs(pipe, grid=(3, 6, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    model = pipe.transformers[0]
    cfg = model.cfg
    x = torch.randn(1, cfg.in_channels, grid[0], 2 * grid[1], 2 * grid[2], generator=g)
    context = torch.randn(1, 7, cfg.text_dim, generator=g)
    return model, (x, torch.tensor([500.0]), context)


OPTS = dict(name="svg", budget=0.4, chunk=4, samples=16)


@torch.no_grad()
def test_wan_transformer_dense_warm_up_and_layers(wan_t2v, caplog):
    pipe = dit_rt.load(str(wan_t2v), device="cpu", dtype=torch.float32)
    model, inputs = _wan_inputs(pipe)
    set_attention(model, "sdpa")
    dense = model(*inputs)
    set_attention(model, dict(OPTS, dense_steps=0.2, dense_layers=0.0))
    ops = [b.attn1.attn.op for b in model.blocks]
    assert all(isinstance(op, svg.SvgAttention) for op in ops)
    assert all(b.attn2.attn.op.name == "sdpa" for b in model.blocks)  # cross-attention stays dense
    svg._warned.clear()
    unreported = model(*inputs)  # no step reported: sparse, and said once
    assert "no denoising step was reported" in caplog.text and (unreported - dense).abs().max() > 1e-4
    for op in ops:
        op.temporal = None
    attention_step(model, 1, 10)  # steps 0 and 1 of 10 are the warm-up
    assert torch.equal(model(*inputs), dense)
    assert all(op.temporal is None for op in ops)  # nothing classified: dense
    attention_step(model, 2, 10)
    sparse = model(*inputs)
    assert attention_context(model).grid == (3, 6, 8)
    assert all(op.temporal is not None and op.temporal.shape == (1, 2) for op in ops)
    assert torch.isfinite(sparse).all() and (sparse - dense).abs().max() > 1e-4
    set_attention(model, dict(OPTS, dense_layers=1.0))  # every layer dense, at any step
    assert torch.equal(model(*inputs), dense)
    set_attention(model, dict(OPTS, dense_layers=0.5))  # the first of the two layers dense
    out = model(*inputs)
    first, second = (b.attn1.attn.op for b in model.blocks)
    assert first.temporal is None and second.temporal is not None
    assert (out - dense).abs().max() > 1e-4 and (out - sparse).abs().max() > 1e-6


def test_geometry_comes_from_the_model():
    class NoVideo(torch.nn.Module):  # an image model: declares no video attention
        def __init__(self):
            super().__init__()
            self.attn = Attention(head_dim=16)

    with pytest.raises(ValueError, match="declares no `video_attention`"):
        set_attention(NoVideo(), "svg")

    class Forgetful(NoVideo):  # declares its video attention, never its grid
        video_attention = ("attn",)

    model = Forgetful()
    set_attention(model, "svg")
    q = torch.randn(1, 60, 2, 16)
    with pytest.raises(RuntimeError, match="set_video_grid"):
        model.attn(q, q, q)
    set_video_grid(model, (3, 4, 4))  # 48 tokens, not the 60 given
    with pytest.raises(ValueError, match=r"grid \(3, 4, 4\) has 48 tokens"):
        model.attn(q, q, q)
    with pytest.raises(ValueError, match="binds to a model"):
        resolve_attention("svg", device="cpu")


def test_compiles_as_one_opaque_op():
    """fullgraph torch.compile traces the op (as dit_rt.compile does each block) without a graph break, and a
    new step changes the result without retracing (the choices live inside the op)."""
    model = type("M", (torch.nn.Module,), {"video_attention": ("attn",)})()
    model.attn = Attention(head_dim=16)
    set_attention(model, dict(OPTS, dense_steps=0.5))
    set_video_grid(model, GRID)
    q, k, v = _qkv(b=1)
    compiled = torch.compile(lambda q, k, v: model.attn(q, k, v) * 2, backend="eager", fullgraph=True)
    attention_step(model, 0, 2)
    dense = compiled(q, k, v)
    assert model.attn.op.temporal is None
    attention_step(model, 1, 2)
    sparse = compiled(q, k, v)
    assert model.attn.op.temporal is not None and torch.equal(sparse, model.attn(q, k, v) * 2)
    assert (sparse - dense).abs().max() > 1e-2


def test_ulysses_padding_and_ring():
    """After Ulysses' all-to-all an op sees the whole sequence of its heads, with padding queries at the end
    (the keys are trimmed to the real ones); Ring attention asks for the log-sum-exp and is refused."""
    model = type("M", (torch.nn.Module,), {"video_attention": ("attn",)})()
    model.attn = Attention(head_dim=16)
    set_attention(model, dict(OPTS, dense_steps=0.0))
    set_video_grid(model, GRID)
    q, k, v = _qkv(b=1)
    padded = torch.cat([q, torch.randn(1, 3, 4, 16)], dim=1)
    out = model.attn(padded, k, v)
    assert torch.equal(out[:, :60], model.attn(q, k, v))
    tail = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (padded[:, 60:], k, v)))
    tail = tail.transpose(1, 2)
    assert (out[:, 60:] - tail).abs().max() <= 1e-6
    with pytest.raises(NotImplementedError, match="Ring attention"):
        model.attn.op(q, k, v, None, return_lse=True)
    with pytest.raises(ValueError, match="does not run under Ring attention"):
        RuntimeOptions.create(device="cpu", attention="svg", parallel=dict(ring=2))


def _ulysses_worker(rank: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    from dit_rt.models.wan import WanTransformer, WanTransformerConfig
    from dit_rt.parallel import ParallelMesh, SequenceParallel

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    cfg = WanTransformerConfig(
        num_attention_heads=3, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=32, num_layers=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = WanTransformer(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    g = torch.Generator().manual_seed(1)
    # token grid (3, 3, 5): 45 tokens (Ulysses pads them to 46), 3 heads (padded to 4)
    inputs = (torch.randn(2, 4, 3, 6, 10, generator=g), torch.tensor([3.0, 700.0]), torch.randn(2, 5, 16))
    set_attention(model, dict(OPTS, chunk=2, dense_steps=0.0))
    with torch.no_grad():
        ref = model(*inputs)
        one = [b.attn1.attn.op.temporal.clone() for b in model.blocks]
        sp = SequenceParallel.apply(model, ParallelMesh.build(dict(ulysses=2), device="cpu"))
        out = model(*inputs)
        mine = [op.base.temporal for op in (b.attn1.attn.op for b in model.blocks)]  # this rank's heads
    heads = slice(2 * rank, 2 * rank + 2)
    same = all(torch.equal(t[:, heads][:, : m.shape[1]], m[:, : 3 - 2 * rank]) for t, m in zip(one, mine))
    err = (out - ref).abs().max().item()
    sp.remove()
    (Path(out_dir) / f"{rank}.txt").write_text(f"{err} {same}")
    dist.destroy_process_group()


def test_ulysses_matches_one_process(tmp_path):
    """Two gloo processes under Ulysses: each classifies its own heads over the whole sequence, so the
    classification and the output are those of one process."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ulysses_worker, args=(port, str(tmp_path)), nprocs=2, start_method="fork")
    for rank in range(2):
        err, same = (tmp_path / f"{rank}.txt").read_text().split()
        assert float(err) <= 1e-5 and same == "True", (rank, err, same)


def test_options_are_checked_up_front():
    options = RuntimeOptions.create(device="cpu", attention=dict(name="svg", budget=0.3, dense_steps=0.1))
    assert options.attention == "svg" and options.attention_options == dict(budget=0.3, dense_steps=0.1)
    for bad, match in [
        (dict(name="svg", sparsity=0.3), "unknown: \\['sparsity'\\]"),
        (dict(name="svg", budget=0), "budget must be > 0"),
        (dict(name="svg", dense_steps=1.5), "dense_steps must be a number in \\[0, 1\\]"),
        (dict(name="svg", dense="fa3"), "attention='fa3' cannot run"),
        (dict(name="sdpa", budget=0.3), "takes no options"),
        (dict(budget=0.3), "name= must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            RuntimeOptions.create(device="cpu", attention=bad)
    with pytest.raises(ValueError, match="CUDA graph replay cannot follow"):
        RuntimeOptions.create(device="cpu", attention="svg", cuda_graphs=True)


# ------------------------------------------------------------------------------------------------ pipelines


def _generate(pipe, steps, report_steps, **kw):
    """Run with the denoising step reported to the attention through the callback (the shared loop in
    dit_rt/pipeline.py does not call attention_step itself yet; once it does, this repeats it harmlessly) and
    return (the latents after each step, the output)."""
    seen = []

    def callback(i, t, latents):
        seen.append(latents.clone())
        if report_steps:
            attention_step(pipe.transformers, i + 1, steps)

    if report_steps:
        attention_step(pipe.transformers, 0, steps)
    out = pipe.generate(num_inference_steps=steps, callback=callback, progress_bar=False, **kw)
    return seen, out


def _against_dense(folder, steps=3, **kw):
    """svg with the first of three steps dense (floor(0.5 x 3)): the same latents as dense attention through
    the warm-up, different but finite after it (three steps: Cosmos' last step does not read the model);
    without the warm-up the first step differs already."""
    dense = dit_rt.load(str(folder), device="cpu", dtype=torch.float32, attention="sdpa")
    sparse = dit_rt.load(
        str(folder), device="cpu", dtype=torch.float32, attention=dict(OPTS, dense_steps=0.5)
    )
    expected, ref = _generate(dense, steps, False, **kw)
    seen, out = _generate(sparse, steps, True, **kw)
    assert torch.equal(seen[0], expected[0])  # the warm-up step is exactly dense
    assert torch.isfinite(out.latents).all() and (out.latents - ref.latents).abs().max() > 1e-6
    ops = [m.op for m in sparse.transformers[0].modules() if isinstance(m, Attention)]
    ops = [op for op in ops if isinstance(op, svg.SvgAttention)]
    assert ops and all(op.temporal is not None for op in ops)
    no_warm_up = dit_rt.load(
        str(folder), device="cpu", dtype=torch.float32, attention=dict(OPTS, dense_steps=0.0)
    )
    first, _ = _generate(no_warm_up, 1, True, **kw)
    assert (first[0] - expected[0]).abs().max() > 1e-6


def test_wan_t2v_pipeline(wan_t2v):
    _against_dense(wan_t2v, prompt="a cat", height=48, width=64, num_frames=9, seed=0, output_type="latents")


def test_wan_i2v_pipeline(tmp_path):
    make_wan_i2v(tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    kw = dict(height=48, width=64, num_frames=9, seed=0, output_type="latents")
    _against_dense(tmp_path, prompt="a cat", image=image, **kw)


def test_cosmos_video2world_pipeline(tmp_path):
    from tiny_cosmos_pipelines import make_cosmos2_v2w

    from dit_rt.models.cosmos.transformer import CosmosTransformer

    assert CosmosTransformer.video_attention == ("transformer_blocks.*.attn1.attn",)
    make_cosmos2_v2w(tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    kw = dict(height=32, width=48, num_frames=9, seed=0, output_type="latents", max_sequence_length=96)
    _against_dense(tmp_path, prompt="a robot", image=image, **kw)


# ------------------------------------------------------------------------------------------------ svg2

SVG2 = dict(OPTS, mode="svg2", block=4, q_clusters=4, k_clusters=6, kmeans_iters=3)


def test_kmeans_finds_separated_clusters():
    from dit_rt.ops.attention.svg2 import kmeans

    g = torch.Generator().manual_seed(0)
    centres = 10 * torch.randn(3, 8, generator=g)
    truth = torch.arange(60) % 3
    x = (centres[truth] + 0.1 * torch.randn(60, 8, generator=g))[None]  # [1, 60, 8]
    labels, centroids = kmeans(x, 3, 5)
    # the same partition up to the naming of the clusters
    pairs = {(int(a), int(b)) for a, b in zip(labels[0], truth)}
    assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3
    assert (centroids[0][labels[0]] - x[0]).abs().max() < 1
    # fitted on 12 of the 60 rows, then every row labelled: the same partition
    sampled, fitted = kmeans(x, 3, 5, sample=12)
    assert sampled.shape == (1, 60) and (centroids[0][labels[0]] - fitted[0][sampled[0]]).abs().max() < 0.2
    assert len({(int(a), int(b)) for a, b in zip(sampled[0], truth)}) == 3
    # a bf16 input is labelled through a bf16 GEMM, as on the GPU
    assert torch.equal(kmeans(x.bfloat16(), 3, 5, sample=12)[0], sampled)


def test_svg2_equals_dense_restricted_to_the_kept_cluster_pairs():
    from dit_rt.ops.attention.svg2 import semantic_attention

    q, k, v = _qkv(n=60)
    scale = 16**-0.5
    out, plan = semantic_attention(q, k, v, scale, 0.3, 4, 6, 3, BLOCK, svg.block_sparse)
    B, N, H, _ = q.shape
    expected = torch.empty_like(q)
    for b in range(B):
        for h in range(H):
            g = b * H + h
            keep = plan["keep"][g]  # [Kq, Kk]
            assert (keep.sum(-1) >= 1).all()  # every query cluster keeps a key cluster
            mask = keep[plan["lq"][g][:, None], plan["lk"][g][None, :]]  # [N, N] in the model's order
            x = [t[b, :, h][None, None] for t in (q, k, v)]
            expected[b, :, h] = F.scaled_dot_product_attention(*x, attn_mask=mask, scale=scale)[0, 0]
            sizes = torch.bincount(plan["lk"][g], minlength=keep.shape[1])
            kept_keys = (keep.float() @ sizes.float()).max()
            single = sizes[keep.long().argmax(-1)].max()  # a lone first cluster may exceed the budget
            assert kept_keys <= max(0.3 * N, single)
    assert (out - expected).abs().max() <= 1e-5
    dense = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert (out - dense).abs().max() > 1e-2  # key clusters were left out
    # fitted on a sample of the tokens: still exactly dense attention restricted to the kept pairs
    part, plan = semantic_attention(q, k, v, scale, 0.3, 4, 6, 3, BLOCK, svg.block_sparse, sample=20)
    g = 0
    mask = plan["keep"][g][plan["lq"][g][:, None], plan["lk"][g][None, :]]
    x = [t[0, :, 0][None, None] for t in (q, k, v)]
    assert (
        part[0, :, 0] - F.scaled_dot_product_attention(*x, attn_mask=mask, scale=scale)[0, 0]
    ).abs().max() <= 1e-5
    full, _ = semantic_attention(q, k, v, scale, 1.0, 4, 6, 3, BLOCK, svg.block_sparse)
    assert (full - F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), scale=scale)
            .transpose(1, 2)).abs().max() <= 1e-5  # fmt: skip


def test_svg2_options_and_pipeline(wan_t2v):
    with pytest.raises(ValueError, match="mode must be 'svg' or 'svg2'"):
        svg.SvgConfig.parse(dict(mode="svg3"))
    with pytest.raises(ValueError, match="k_clusters must be a positive int"):
        svg.SvgConfig.parse(dict(mode="svg2", k_clusters=0))
    with pytest.raises(ValueError, match="kmeans_sample must be an int >= 0"):
        svg.SvgConfig.parse(dict(mode="svg2", kmeans_sample=-1))
    assert svg.SvgConfig.parse(dict(mode="svg2", kmeans_sample=0)).kmeans_sample == 0
    dense = dit_rt.load(str(wan_t2v), device="cpu", dtype=torch.float32, attention="sdpa")
    sparse = dit_rt.load(
        str(wan_t2v), device="cpu", dtype=torch.float32, attention=dict(SVG2, dense_steps=0.0)
    )
    kw = dict(prompt="a cat", height=48, width=64, num_frames=9, seed=0, output_type="latents")
    kw |= dict(num_inference_steps=2, progress_bar=False)
    a, b = dense.generate(**kw).latents, sparse.generate(**kw).latents
    assert torch.isfinite(b).all() and (a - b).abs().max() > 1e-6
