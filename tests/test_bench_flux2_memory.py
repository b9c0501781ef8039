"""tools/bench_flux2_memory.py: the sparse zero checkpoint at the real sizes (shapes only) and the whole tool
at tiny sizes on the CPU: every run loads the folder through `dit_rt.load` and generates."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_flux2_memory as bench  # noqa: E402


def _params(shapes) -> int:
    return sum(math.prod(shape) for dtype, shape in shapes.values() if dtype == "BF16")


def test_real_sizes():
    # FLUX.2-dev: 32.2B transformer; the Mistral-Small 3.x text stack without its vision tower: 23.6B
    transformer = {k: v for k, v in bench.FLUX2_TRANSFORMER.items() if not k.startswith("_")}
    assert round(_params(bench.diffusers_shapes("Flux2Transformer2DModel", transformer)) / 1e9, 1) == 32.2
    text = bench.mistral_shapes(bench.MISTRAL)
    assert round(_params(text) / 1e9, 1) == 23.6
    assert "language_model.model.layers.39.mlp.down_proj.weight" in text


def test_sparse_files_are_holes_that_read_as_zeros(tmp_path):
    from dit_rt.loaders import read_header

    shapes = {f"w{i}": ("BF16", [1024, 1024]) for i in range(3)} | {"n": ("I64", [])}
    bench.SHARD_BYTES, old = 4 * 2**20, bench.SHARD_BYTES  # two shards and an index
    try:
        total = bench.write_sparse(tmp_path, "m", shapes)
    finally:
        bench.SHARD_BYTES = old
    files = sorted(tmp_path.glob("m-*.safetensors"))
    assert total == 3 * 2 * 2**20 + 8 and len(files) == 2
    index = json.loads((tmp_path / "m.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(shapes)
    header, _ = read_header(files[0])
    assert header["w0"].shape == (1024, 1024)
    assert files[0].read_bytes()[-100:] == bytes(100)


def test_tiny_runs_through_dit_rt_load(tmp_path, capsys):
    rows = bench.main(["--tiny", "--device", "cpu", "--steps", "1", "--workdir", str(tmp_path)])
    assert [r["run"] for r in rows] == ["fp8", "offload", "offload-resident", "offload-auto", "resident"]
    assert all("error" not in r and r["image"] == [1, 1, 64, 64, 3] for r in rows), rows
    assert "| offload |" in capsys.readouterr().out


def test_random_weights_reach_offloaded_blocks(tmp_path):
    """--random runs with offloaded blocks (their weights on the host copies); vectors 1, matrices random."""
    args = [
        "--tiny",
        "--device",
        "cpu",
        "--steps",
        "1",
        "--workdir",
        str(tmp_path),
        "--runs",
        "offload-resident",
    ]
    rows = bench.main([*args, "--random", "--resident-gib", "0.00001"])
    assert rows[0]["random_transformer"] is True and "error" not in rows[0], rows
    layer = torch.nn.Linear(8, 4)
    torch.nn.init.zeros_(layer.weight)
    bench.randomize_in_place(layer)
    assert layer.weight.abs().sum() > 0 and torch.equal(layer.bias, torch.ones(4))
