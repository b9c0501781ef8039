"""loaders: resolution, safetensors streaming into meta-built modules, key tables, strictness and errors.

Toy module trees (dit_rt Linear incl. fused QKV, Conv3d, norms, tied and int tensors, computed buffers)
check the machinery tensor by tensor against the checkpoint; tiny diffusers / transformers models check it
on the real Hub layouts, output against output.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dit_rt.loaders import (
    WAN_ORIGINAL,
    CheckpointError,
    ResolveError,
    load_weights,
    map_key,
    read_config,
    read_model_index,
    resolve,
)
from dit_rt.loaders.mapping import compile_map
from dit_rt.ops.linear import Linear, fused

D = 8

# ------------------------------------------------------------------------------------------------ toy model


class Rope(nn.Module):
    """A computed, non-persistent table, as the RoPE modules have."""

    def __init__(self, n: int = 4):
        super().__init__()
        self.n = n
        self.register_buffer("table", torch.empty(n, 2), persistent=False)

    def init_buffers(self, device):
        t = torch.arange(self.n, dtype=torch.float32, device=device)
        self.table = torch.stack([t.cos(), t.sin()], dim=-1)


class Attn(nn.Module):
    def __init__(self, linear=Linear):
        super().__init__()
        self.to_qkv = linear(D, 3 * D, sources=("to_q", "to_k", "to_v"), splits=(D, D, D))
        self.to_out = nn.ModuleList([linear(D, D)])
        self.norm_q = nn.RMSNorm(D)


class Block(nn.Module):
    def __init__(self, linear=Linear):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.empty(1, 6, D))
        self.attn1 = Attn(linear)
        self.norm2 = nn.LayerNorm(D)
        self.ffn = nn.ModuleDict({"net": nn.ModuleList([nn.ModuleDict({"proj": linear(D, 2 * D)})])})
        self.ffn.net.append(nn.Identity())
        self.ffn.net.append(linear(2 * D, D, bias=False))


class Toy(nn.Module):
    keep_fp32 = ("scale_shift_table",)

    def __init__(self, linear=Linear, layers: int = 2):
        super().__init__()
        self.patch_embedding = nn.Conv3d(4, D, (1, 2, 2), (1, 2, 2))
        self.blocks = nn.ModuleList([Block(linear) for _ in range(layers)])
        self.rope = Rope()
        self.register_buffer("step", torch.zeros(3, dtype=torch.int64))


def toy_checkpoint(seed: int = 0, layers: int = 2) -> dict[str, torch.Tensor]:
    """Diffusers-style names, projections unfused (as on the Hub)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    sd = {"patch_embedding.weight": r(D, 4, 1, 2, 2), "patch_embedding.bias": r(D)}
    sd["step"] = torch.tensor([1, 2, 3])
    for i in range(layers):
        p = f"blocks.{i}."
        sd[p + "scale_shift_table"] = r(1, 6, D)
        for n in ("to_q", "to_k", "to_v", "to_out.0"):
            sd[p + f"attn1.{n}.weight"], sd[p + f"attn1.{n}.bias"] = r(D, D), r(D)
        sd[p + "attn1.norm_q.weight"] = r(D)
        sd[p + "norm2.weight"], sd[p + "norm2.bias"] = r(D), r(D)
        sd[p + "ffn.net.0.proj.weight"], sd[p + "ffn.net.0.proj.bias"] = r(2 * D, D), r(2 * D)
        sd[p + "ffn.net.2.weight"] = r(D, 2 * D)
    return sd


def expected(sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The model tensor `name` built from checkpoint tensors by hand (fused QKV concatenated on dim 0)."""
    m = re.fullmatch(r"(.*)\.to_qkv\.(weight|bias)", name)
    if m:
        return torch.cat([sd[f"{m[1]}.{s}.{m[2]}"] for s in ("to_q", "to_k", "to_v")])
    return sd[name]


def meta_toy(**kw) -> Toy:
    with torch.device("meta"):
        return Toy(**kw)


def save_sharded(sd: dict, folder, n: int, stem: str = "diffusion_pytorch_model") -> None:
    """Shards + index as save_pretrained writes them."""
    keys = sorted(sd)
    weight_map = {}
    for i in range(n):
        name = f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys[i::n]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index))


def check_toy(model: Toy, sd: dict, dtype: torch.dtype = torch.float32) -> None:
    for name, p in model.state_dict().items():
        want = expected(sd, name)
        if want.is_floating_point() and "scale_shift_table" not in name:
            want = want.to(dtype)
        assert p.dtype == want.dtype, name
        assert torch.equal(p, want), name
    assert torch.equal(model.rope.table[:, 0], torch.arange(4.0).cos())


# ------------------------------------------------------------------------------------------------ loading


def test_sharded_equals_single_file(tmp_path):
    sd = toy_checkpoint()
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    single.mkdir(), sharded.mkdir()
    save_file(sd, str(single / "diffusion_pytorch_model.safetensors"))
    save_sharded(sd, sharded, 3)
    a, b = meta_toy(), meta_toy()
    report = load_weights(a, single, device="cpu", dtype=torch.float32)
    load_weights(b, sharded, device="cpu", dtype=torch.float32)
    check_toy(a, sd)
    check_toy(b, sd)
    assert report.tensors == len(sd)
    assert all(not p.requires_grad for p in a.parameters())
    # the fused QKV really is the concatenation, in source order
    q = sd["blocks.1.attn1.to_q.weight"]
    assert torch.equal(b.blocks[1].attn1.to_qkv.weight[:D], q)


def test_dtype_conversion(tmp_path):
    sd = toy_checkpoint(1)
    save_file(sd, str(tmp_path / "model.safetensors"))  # the transformers file name
    model = meta_toy()
    load_weights(model, tmp_path, device="cpu", dtype=torch.bfloat16)
    check_toy(model, sd, torch.bfloat16)  # cast per tensor; keep_fp32 stays fp32; int64 stays int64
    assert model.blocks[0].scale_shift_table.dtype == torch.float32
    assert model.step.dtype == torch.int64
    # dtype=None keeps what is stored (a bf16 checkpoint stays bf16)
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}
    save_file(half, str(tmp_path / "model.safetensors"))
    model = meta_toy()
    load_weights(model, tmp_path / "model.safetensors", device="cpu")
    assert model.blocks[0].attn1.to_qkv.weight.dtype == torch.bfloat16
    assert torch.equal(model.blocks[0].attn1.to_qkv.weight, expected(half, "blocks.0.attn1.to_qkv.weight"))


class QLinear(Linear):
    """Emulated int8 per-row weight format; records how much of the model was loaded when it ran."""

    calls: list[tuple[int, int]] = []
    root: nn.Module | None = None
    loaded: list[weakref.ref] = []  # the loaded float weights, each dropped by its conversion
    alive: list[int] = []  # how many earlier layers' loaded weights were still alive at each conversion

    def convert(self, fmt: str) -> None:
        assert fmt == "int8-rowwise"
        QLinear.alive.append(sum(r() is not None for r in QLinear.loaded))
        QLinear.loaded.append(weakref.ref(self.weight.untyped_storage()))
        w = self.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        del self.weight
        self.weight = None
        if QLinear.root is not None:
            params = [p for p in QLinear.root.parameters() if p is not None]
            QLinear.calls.append((sum(p.is_meta for p in params), len(params)))


def test_quantize_on_load_equals_load_then_quantize(tmp_path):
    sd = toy_checkpoint(2, layers=3)
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    QLinear.calls, QLinear.loaded, QLinear.alive = [], [], []
    on_load = meta_toy(linear=QLinear, layers=3)
    QLinear.root = on_load
    load_weights(on_load, tmp_path, device="cpu", dtype=torch.float32, linear_format="int8-rowwise")
    QLinear.root = None
    after = meta_toy(linear=QLinear, layers=3)
    load_weights(after, tmp_path, device="cpu", dtype=torch.float32)
    for m in after.modules():
        if isinstance(m, QLinear):
            m.convert("int8-rowwise")
    a, b = on_load.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and any(k.endswith("qweight") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # layer by layer: every Linear (4 per block) converted as it landed, most of the model still on meta then
    assert len(QLinear.calls) == 4 * 3
    assert QLinear.calls[0][0] > QLinear.calls[0][1] // 2
    metas = [m for m, _ in QLinear.calls]
    assert metas == sorted(metas, reverse=True) and metas[-1] < metas[0]
    # ... and its loaded float weight freed right then, not held until the load ends: quantize-on-load never
    # holds more than one layer of the unquantized model (FLUX.2-dev's 64 GB would not fit an 80 GB card)
    assert QLinear.alive == [0] * len(QLinear.alive)
    assert all(r() is None for r in QLinear.loaded)


def test_fused_linear_forward_matches_unfused(tmp_path):
    sd = toy_checkpoint(3)
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    model = meta_toy()
    load_weights(model, tmp_path, device="cpu", dtype=torch.float32)
    x = torch.randn(5, D)
    q, k, v = model.blocks[0].attn1.to_qkv(x).split(D, dim=-1)
    p = "blocks.0.attn1."
    for name, got in (("to_q", q), ("to_k", k), ("to_v", v)):
        ref = nn.functional.linear(x, sd[p + name + ".weight"], sd[p + name + ".bias"])
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)  # GEMM shape changes rounding only


@pytest.mark.parametrize("slice_min", [8 << 20, 1000])  # one read per chunk / chunks read in parallel slices
def test_staged_chunked_reader_matches_memory_map(tmp_path, monkeypatch, slice_min):
    """The GPU path's reader (large sequential chunks through staging buffers), run on the CPU: chunk
    boundaries, a tensor larger than the buffers, skipped tensors, parallel slices: not a byte may shift."""
    from dit_rt.loaders import safetensors_io
    from dit_rt.loaders.safetensors_io import PinnedStaging, iter_mmap, iter_staged, read_header

    monkeypatch.setattr(safetensors_io, "READ_SLICE_MIN", slice_min)
    sd = toy_checkpoint(4)
    sd["big"] = torch.randn(64, 64)  # 16 KiB, larger than the 4 KiB buffers below
    sd["flag"] = torch.tensor([True, False])
    path = tmp_path / "x.safetensors"
    save_file(sd, str(path))
    header, _ = read_header(path)
    items = sorted(header.values(), key=lambda i: i.start)[1::2] + [header["big"]]  # gaps between tensors
    items = sorted(set(items), key=lambda i: i.start)

    def no_numpy(self):  # a core install has no numpy: the GPU path's reader must not need it
        raise RuntimeError("Numpy is not available")

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "numpy", no_numpy)
        staged = [
            (i, t.clone()) for i, t in iter_staged(path, items, torch.device("cpu"), PinnedStaging(4096))
        ]
    assert [i.name for i, _ in staged] == [i.name for i in items]
    for info, a in staged:
        assert a.dtype == sd[info.name].dtype and torch.equal(a, sd[info.name]), info.name
    mapped = [(info.name, b.clone()) for info, b in iter_mmap(path, items)]  # views die with the map
    assert all(torch.equal(b, sd[name]) for name, b in mapped) and len(mapped) == len(items)


def test_parallel_read_reports_a_short_file(tmp_path, monkeypatch):
    from dit_rt.loaders import safetensors_io

    monkeypatch.setattr(safetensors_io, "READ_SLICE_MIN", 100)
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 16  # 4096 bytes
    path.write_bytes(data)
    buf = bytearray(3000)
    with open(path, "rb") as f:
        safetensors_io.read_exact(path, f.fileno(), memoryview(buf), 1000)  # 8 slices of 375 bytes
        assert bytes(buf) == data[1000:4000]
        with pytest.raises(CheckpointError, match=r"blob.bin: truncated file \(read stopped at byte 4096\)"):
            safetensors_io.read_exact(path, f.fileno(), memoryview(bytearray(3000)), 2000)


# ------------------------------------------------------------------------------------------------ errors


def all_meta(model: nn.Module) -> bool:
    return all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape"])
def test_strictness_errors_name_component_file_and_key(tmp_path, case):
    sd = toy_checkpoint()
    if case == "missing":
        del sd["blocks.1.attn1.to_k.bias"]
        key = "blocks.1.attn1.to_k.bias"
    elif case == "unexpected":
        sd["blocks.0.attn1.norm_added_q.weight"] = torch.ones(D)
        key = "blocks.0.attn1.norm_added_q.weight"
    else:
        sd["blocks.0.ffn.net.2.weight"] = torch.ones(D, D)
        key = "blocks.0.ffn.net.2.weight"
    save_sharded(sd, tmp_path, 2)
    model = meta_toy()
    with pytest.raises(CheckpointError) as e:
        load_weights(model, tmp_path, device="cpu", dtype=torch.float32, component="transformer")
    msg = str(e.value)
    assert "transformer" in msg and key in msg and "diffusion_pytorch_model" in msg, msg
    if case == "shape":
        assert "[8, 8]" in msg and "[8, 16]" in msg, msg
    assert all_meta(model), "an error must come before any tensor is allocated"
    if case == "unexpected":  # the explicit ignore list (diffusers ignores norm_added_q the same way)
        load_weights(model, tmp_path, device="cpu", ignore=[r"\.norm_added_q\."])
        check_toy(model, sd)


def test_truncated_corrupt_and_missing_files(tmp_path):
    sd = toy_checkpoint()
    save_sharded(sd, tmp_path, 2)
    shard = tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"00002-of-00002\.safetensors: truncated"):
        load_weights(meta_toy(), tmp_path, device="cpu")
    shard.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match=r"00002-of-00002\.safetensors: corrupt"):
        load_weights(meta_toy(), tmp_path, device="cpu")
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"missing shard.*00002-of-00002\.safetensors"):
        load_weights(meta_toy(), tmp_path, device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no weights found.*pytorch_model\.bin"):
        load_weights(meta_toy(), empty, device="cpu")


def test_unsupported_dtype_is_named(tmp_path):
    header = json.dumps({"w": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 1]}}).encode()
    path = tmp_path / "q.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0")
    with pytest.raises(CheckpointError, match=r"q\.safetensors: tensor 'w' has dtype Q4_K"):
        load_weights(nn.Linear(2, 2, device="meta"), path, device="cpu")


def test_computed_buffers_without_hook_are_an_error(tmp_path):
    class NoHook(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("freqs", torch.ones(3), persistent=False)

    with torch.device("meta"):
        model = NoHook()
    save_file(
        {"lin.weight": torch.ones(2, 2), "lin.bias": torch.ones(2)}, str(tmp_path / "model.safetensors")
    )
    with pytest.raises(CheckpointError, match="freqs"):
        load_weights(model, tmp_path, device="cpu")


# ------------------------------------------------------------------------------------------------ formats


def to_wan_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers Wan names -> official Wan release names (spec wan-cosmos.md A.2), the inverse direction."""
    top = [
        ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
        ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
        ("condition_embedder.time_proj.", "time_projection.1."),
        ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
        ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
        ("proj_out.", "head.head."),
    ]
    block = [
        ("attn1.to_out.0.", "self_attn.o."),
        ("attn2.to_out.0.", "cross_attn.o."),
        ("attn1.to_", "self_attn."),
        ("attn2.to_", "cross_attn."),
        ("attn1.", "self_attn."),
        ("attn2.", "cross_attn."),
        ("norm2.", "norm3."),
        ("ffn.net.0.proj.", "ffn.0."),
        ("ffn.net.2.", "ffn.2."),
        ("scale_shift_table", "modulation"),
    ]
    out = {}
    for k, v in sd.items():
        new = k
        if k == "scale_shift_table":
            new = "head.modulation"
        elif m := re.match(r"blocks\.(\d+)\.(.*)", k):
            rest = m[2]
            for a, b in block:
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
                    break
            new = f"blocks.{m[1]}.{rest}"
        else:
            for a, b in top:
                if k.startswith(a):
                    new = b + k[len(a) :]
        out[new] = v.contiguous()
    return out


def test_wan_original_table_maps_every_kind_of_key():
    rules = compile_map(WAN_ORIGINAL)
    cases = {
        "model.diffusion_model.blocks.3.self_attn.q.weight": "blocks.3.attn1.to_q.weight",
        "blocks.0.cross_attn.norm_k_img.weight": "blocks.0.attn2.norm_added_k.weight",
        "blocks.0.cross_attn.k_img.bias": "blocks.0.attn2.add_k_proj.bias",
        "blocks.12.norm3.bias": "blocks.12.norm2.bias",
        "blocks.1.modulation": "blocks.1.scale_shift_table",
        "head.modulation": "scale_shift_table",
        "img_emb.proj.4.weight": "condition_embedder.image_embedder.norm2.weight",
        "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
        "time_projection.1.bias": "condition_embedder.time_proj.bias",
    }
    for src, dst in cases.items():
        assert map_key(rules, src) == dst


def add_rope_hook(model):
    """diffusers' RoPE tables are non-persistent buffers computed in __init__: recompute them on load."""
    rope = model.rope

    def init_buffers(device):
        with torch.device(device):
            fresh = type(rope)(rope.attention_head_dim, rope.patch_size, rope.max_seq_len)
        for name, buf in fresh.named_buffers():
            rope._buffers[name] = buf

    rope.init_buffers = init_buffers
    return model


def wan_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 8, 8, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 7, 32, generator=g)
    return x, t, ctx


@pytest.mark.parametrize("layout", ["diffusers-sharded", "wan-original"])
def test_tiny_wan_transformer_round_trip(tmp_path, layout):
    from diffusers import WanTransformer3DModel
    from tiny_checkpoints import make_wan_transformer

    ref = make_wan_transformer()
    if layout == "diffusers-sharded":
        ref.save_pretrained(str(tmp_path), safe_serialization=True, max_shard_size="40KB")
        assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
        kw = {}
    else:
        save_file(to_wan_original(ref.state_dict()), str(tmp_path / "diffusion_pytorch_model.safetensors"))
        kw = {"key_map": "auto"}  # detected as the original Wan format
    config = dict(ref.config)
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(config)
    add_rope_hook(model)
    load_weights(model, tmp_path, device="cpu", dtype=torch.float32, component="transformer", **kw)
    x, t, ctx = wan_inputs()
    with torch.no_grad():
        want = ref(x, t, ctx, return_dict=False)[0]
        got = model.eval()(x, t, ctx, return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


class ToyWanFused(nn.Module):
    """Diffusers Wan names with a fused self-attention QKV: original-format keys go through both tables."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Module()])
        b = self.blocks[0]
        b.attn1 = nn.Module()
        b.attn1.to_qkv = fused(D, D, ("to_q", "to_k", "to_v"))
        b.attn1.to_out = nn.ModuleList([Linear(D, D)])
        b.norm2 = nn.LayerNorm(D)
        b.scale_shift_table = nn.Parameter(torch.empty(1, 6, D))
        self.scale_shift_table = nn.Parameter(torch.empty(1, 2, D))
        self.proj_out = Linear(D, 4)


def test_wan_original_into_fused_projections(tmp_path):
    g = torch.Generator().manual_seed(5)
    sd = {}
    for n in ("q", "k", "v", "o"):
        sd[f"model.diffusion_model.blocks.0.self_attn.{n}.weight"] = torch.randn(D, D, generator=g)
        sd[f"model.diffusion_model.blocks.0.self_attn.{n}.bias"] = torch.randn(D, generator=g)
    sd["model.diffusion_model.blocks.0.norm3.weight"] = torch.randn(D, generator=g)
    sd["model.diffusion_model.blocks.0.norm3.bias"] = torch.randn(D, generator=g)
    sd["model.diffusion_model.blocks.0.modulation"] = torch.randn(1, 6, D, generator=g)
    sd["model.diffusion_model.head.modulation"] = torch.randn(1, 2, D, generator=g)
    sd["model.diffusion_model.head.head.weight"] = torch.randn(4, D, generator=g)
    sd["model.diffusion_model.head.head.bias"] = torch.randn(4, generator=g)
    save_file(sd, str(tmp_path / "wan.safetensors"))
    with torch.device("meta"):
        model = ToyWanFused()
    load_weights(model, tmp_path / "wan.safetensors", device="cpu", key_map="wan-original")
    p = "model.diffusion_model.blocks.0."
    qkv = torch.cat([sd[p + f"self_attn.{n}.weight"] for n in "qkv"])
    assert torch.equal(model.blocks[0].attn1.to_qkv.weight, qkv)
    assert torch.equal(model.blocks[0].attn1.to_out[0].bias, sd[p + "self_attn.o.bias"])
    assert torch.equal(model.blocks[0].norm2.weight, sd[p + "norm3.weight"])
    assert torch.equal(model.scale_shift_table, sd["model.diffusion_model.head.modulation"])


def test_model_ckpt_key_map_and_tied_weights(tmp_path):
    """Tied tensors load once from whichever alias is stored; a model-side ckpt_key_map renames and drops."""

    class Tied(nn.Module):
        ckpt_key_map = ((r"^embed\.", "shared."), (r"^unused\.", None))

        def __init__(self):
            super().__init__()
            self.shared = nn.Embedding(16, D)
            self.head = nn.Linear(D, 16, bias=False)
            self.head.weight = self.shared.weight  # tied, as T5's embeddings

    g = torch.Generator().manual_seed(7)
    w = torch.randn(16, D, generator=g)
    save_file({"embed.weight": w, "unused.x": torch.ones(1)}, str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        model = Tied()
    report = load_weights(model, tmp_path, device="cpu", component="text_encoder")
    assert model.head.weight is model.shared.weight and torch.equal(model.shared.weight, w)
    assert report.ignored == ["unused.x"]
    # the second alias stored as well (transformers may write both): still one tensor, no error
    save_file({"shared.weight": w, "head.weight": w.clone()}, str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        model = Tied()
    load_weights(model, tmp_path, device="cpu")
    assert model.head.weight is model.shared.weight and torch.equal(model.head.weight, w)


# ------------------------------------------------------------------------------------------------ resolving


def write_pipeline(folder, sd):
    (folder / "transformer").mkdir(parents=True)
    index = {
        "_class_name": "ToyPipeline",
        "transformer": ["diffusers", "Toy"],
        "safety_checker": [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "Toy", "layers": 2}))
    save_file(sd, str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_resolve_local_folder_and_errors(tmp_path):
    write_pipeline(tmp_path / "pipe", toy_checkpoint())
    folder = resolve(tmp_path / "pipe")
    assert folder == tmp_path / "pipe"
    assert read_model_index(folder)["_class_name"] == "ToyPipeline"
    assert read_config(folder / "transformer")["layers"] == 2
    with pytest.raises(ResolveError, match="model_index.json"):
        resolve(tmp_path)
    with pytest.raises(ResolveError, match="vae"):
        resolve(tmp_path / "pipe", components=["transformer", "vae"])
    with pytest.raises(ResolveError, match="unknown model 'no such model'"):
        resolve("no such model")


RESOLVE_OFFLINE = textwrap.dedent(
    """
    import sys, torch
    from dit_rt.loaders import resolve, load_weights, ResolveError
    sys.path.insert(0, sys.argv[1])
    from test_loaders import meta_toy, check_toy, toy_checkpoint
    folder = resolve("toy-org/toy-pipe")
    print(folder)
    model = meta_toy()
    load_weights(model, folder / "transformer", device="cpu")
    check_toy(model, toy_checkpoint())
    for bad in ("toy-org/absent", ):
        try:
            resolve(bad)
        except ResolveError as e:
            assert "HF_HUB_OFFLINE" in str(e), e
        else:
            raise AssertionError("resolved a repo that is not cached")
    try:
        resolve("toy-org/toy-pipe", components=["vae"])
    except ResolveError as e:
        assert "vae" in str(e), e
    else:
        raise AssertionError("resolved a missing component")
    print("ok")
    """
)


def test_resolve_repo_id_from_local_hub_cache_offline(tmp_path):
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--toy-org--toy-pipe"
    write_pipeline(repo / "snapshots" / rev, toy_checkpoint())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, "-c", RESOLVE_OFFLINE, here], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[0] == str(repo / "snapshots" / rev) and lines[-1] == "ok", out.stdout
