"""Checkpoint load time to the GPU: dit_rt.loaders against the disk and against diffusers.

Writes real-size random Wan transformers in the Hub Diffusers layout (5 GB shards + index + config.json),
then, per size and with the page cache dropped before each measurement (posix_fadvise DONTNEED per file;
residency checked with mincore and reported), times
  (a) a plain sequential read of the same files (the disk's throughput, the ceiling),
  (b) dit_rt.loaders.load_weights into a meta-built module tree with the real Wan names, to `--device`, bf16,
  (c) diffusers' WanTransformer3DModel.from_pretrained(torch_dtype=bf16) then .to(device), and with
      device_map=device where diffusers accepts it.
Wan2.1-1.3B is stored fp32 as on the Hub (5.7 GB); the 14B size is stored bf16 (28.6 GB) because its Hub fp32
size (57 GB) does not fit a 64 GB disk next to the rest. `--cache warm` instead reads the files into the page
cache before each measurement (a second load of the same model): the ceiling is then the page-cache read rate.

    python tools/bench_load.py --sizes 1.3b,14b --dir /tmp/ckpt --out bench_load.json
    python tools/bench_load.py --sizes tiny --device cpu --dir /tmp/ckpt_tiny --out /tmp/b.json   # smoke test
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import mmap
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from dit_rt.loaders import CheckpointError, load_weights, read_config
from dit_rt.ops.linear import Linear

SHARD_BYTES = 5 * 10**9  # diffusers' default max_shard_size ("5GB")
SIZES = {
    # name: (heads, layers, ffn_dim, stored dtype)
    "tiny": (2, 2, 256, torch.float32),
    "1.3b": (12, 30, 8960, torch.float32),
    "14b": (40, 40, 13824, torch.bfloat16),
}
HEAD_DIM, TEXT_DIM, FREQ_DIM, IN_CH, OUT_CH = 128, 4096, 256, 16, 16


def wan_config(size: str) -> dict:
    heads, layers, ffn, _ = SIZES[size]
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": [1, 2, 2],
        "num_attention_heads": heads,
        "attention_head_dim": HEAD_DIM,
        "in_channels": IN_CH,
        "out_channels": OUT_CH,
        "text_dim": TEXT_DIM,
        "freq_dim": FREQ_DIM,
        "ffn_dim": ffn,
        "num_layers": layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }


def wan_shapes(size: str) -> dict[str, tuple[int, ...]]:
    """Diffusers state-dict names and shapes of a Wan T2V transformer (spec wan-cosmos.md A.2)."""
    heads, layers, F, _ = SIZES[size]
    D, P = heads * HEAD_DIM, OUT_CH * 4
    s = {"patch_embedding.weight": (D, IN_CH, 1, 2, 2), "patch_embedding.bias": (D,)}
    for name, (o, i) in {
        "condition_embedder.time_embedder.linear_1": (D, FREQ_DIM),
        "condition_embedder.time_embedder.linear_2": (D, D),
        "condition_embedder.time_proj": (6 * D, D),
        "condition_embedder.text_embedder.linear_1": (D, TEXT_DIM),
        "condition_embedder.text_embedder.linear_2": (D, D),
    }.items():
        s[f"{name}.weight"], s[f"{name}.bias"] = (o, i), (o,)
    for b in range(layers):
        p = f"blocks.{b}."
        s[p + "scale_shift_table"] = (1, 6, D)
        for a in ("attn1", "attn2"):
            for n in ("to_q", "to_k", "to_v", "to_out.0"):
                s[f"{p}{a}.{n}.weight"], s[f"{p}{a}.{n}.bias"] = (D, D), (D,)
            s[f"{p}{a}.norm_q.weight"] = s[f"{p}{a}.norm_k.weight"] = (D,)
        s[p + "norm2.weight"] = s[p + "norm2.bias"] = (D,)
        s[p + "ffn.net.0.proj.weight"], s[p + "ffn.net.0.proj.bias"] = (F, D), (F,)
        s[p + "ffn.net.2.weight"], s[p + "ffn.net.2.bias"] = (D, F), (D,)
    s["scale_shift_table"] = (1, 2, D)
    s["proj_out.weight"], s["proj_out.bias"] = (P, D), (P,)
    return s


# ------------------------------------------------------------------------------------------------ writing


def write_checkpoint(size: str, folder: Path, device: str) -> list[Path]:
    """Random weights, std 0.02, sharded as save_pretrained does; generated on `device` (fast), saved from
    host memory one shard at a time."""
    from safetensors.torch import save_file

    dtype = SIZES[size][3]
    shapes = wan_shapes(size)
    done = folder / "complete.json"
    if done.is_file() and json.loads(done.read_text()).get("size") == size:
        return sorted(folder.glob("*.safetensors"))
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.safetensors*"):
        old.unlink()
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        n = torch.Size(shape).numel() * dtype.itemsize
        if shards[-1] and used + n > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    g = torch.Generator(device).manual_seed(0)
    weight_map, files, total = {}, [], 0
    for i, names in enumerate(shards):
        fname = (
            f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            if len(shards) > 1
            else "diffusion_pytorch_model.safetensors"
        )
        part = {}
        for name in names:
            t = torch.randn(shapes[name], generator=g, device=device, dtype=torch.float32).mul_(0.02)
            part[name] = t.to(dtype).cpu()
            total += part[name].nbytes
            weight_map[name] = fname
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        files.append(folder / fname)
        del part
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(wan_config(size), indent=2))
    os.sync()  # written pages must be clean before DONTNEED can drop them
    done.write_text(json.dumps({"size": size}))
    return files


# ------------------------------------------------------------------------------------------------ page cache


def resident_fraction(path: Path) -> float | None:
    """Share of the file's pages in the page cache (mincore), or None where mincore is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        size = path.stat().st_size
        page = os.sysconf("SC_PAGE_SIZE")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
            addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            n = (size + page - 1) // page
            vec = (ctypes.c_ubyte * n)()
            if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
                return None
            resident = sum(v & 1 for v in vec)
            del addr
        return resident / n
    except (OSError, AttributeError, ValueError, TypeError):
        return None


def drop_cache(files: list[Path]) -> dict:
    """posix_fadvise(DONTNEED) per file; report whether the pages really left the cache."""
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    fracs = [resident_fraction(p) for p in files]
    known = [f for f in fracs if f is not None]
    left = sum(known) / len(known) if known else None
    return {"resident_after_drop": left, "effective": None if left is None else left < 0.02}


WARM = False  # --cache warm: every measurement reads from the page cache instead of the disk


def prepare_cache(files: list[Path]) -> dict:
    """Before each measurement: drop the files from the page cache (cold), or read them into it (warm)."""
    if not WARM:
        return drop_cache(files)
    raw_read(files)
    fracs = [resident_fraction(p) for p in files]
    known = [f for f in fracs if f is not None]
    return {"resident_before": sum(known) / len(known) if known else None, "mode": "warm"}


def raw_read(files: list[Path], chunk: int = 64 << 20) -> float:
    """Seconds to read every file once, sequentially, with large reads (what a perfect loader would pay)."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ models


class _Attn(nn.Module):
    def __init__(self, D: int, self_attn: bool):
        super().__init__()
        if self_attn:  # one GEMM for q, k, v
            self.to_qkv = Linear(D, 3 * D, sources=("to_q", "to_k", "to_v"), splits=(D, D, D))
        else:  # cross-attention: q from the video tokens, fused k, v from the text
            self.to_q = Linear(D, D)
            self.to_kv = Linear(D, 2 * D, sources=("to_k", "to_v"), splits=(D, D))
        self.to_out = nn.ModuleList([Linear(D, D)])
        self.norm_q, self.norm_k = nn.RMSNorm(D), nn.RMSNorm(D)


class _Block(nn.Module):
    def __init__(self, D: int, F: int):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.empty(1, 6, D))
        self.attn1, self.attn2 = _Attn(D, True), _Attn(D, False)
        self.norm2 = nn.LayerNorm(D)
        self.ffn = nn.Module()
        self.ffn.net = nn.ModuleList([nn.Module(), nn.GELU(approximate="tanh"), Linear(F, D)])
        self.ffn.net[0].proj = Linear(D, F)


class WanParamTree(nn.Module):
    """The Wan T2V transformer's parameters under their Diffusers names (self-attention QKV and
    cross-attention KV fused), for timing the loader when dit_rt.models.wan is not available."""

    keep_fp32 = ("scale_shift_table", "norm2", "time_embedder")

    def __init__(self, cfg: dict):
        super().__init__()
        D, F = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"]
        self.patch_embedding = nn.Conv3d(cfg["in_channels"], D, (1, 2, 2), (1, 2, 2))
        ce = self.condition_embedder = nn.Module()
        ce.time_embedder, ce.text_embedder = nn.Module(), nn.Module()
        ce.time_embedder.linear_1, ce.time_embedder.linear_2 = Linear(cfg["freq_dim"], D), Linear(D, D)
        ce.time_proj = Linear(D, 6 * D)
        ce.text_embedder.linear_1, ce.text_embedder.linear_2 = Linear(cfg["text_dim"], D), Linear(D, D)
        self.blocks = nn.ModuleList([_Block(D, F) for _ in range(cfg["num_layers"])])
        self.scale_shift_table = nn.Parameter(torch.empty(1, 2, D))
        self.proj_out = Linear(D, cfg["out_channels"] * 4)


def build_meta(folder: Path) -> tuple[nn.Module, str]:
    cfg = read_config(folder)
    try:
        from dit_rt.models.wan import WanTransformer, WanTransformerConfig

        with torch.device("meta"):
            return WanTransformer(WanTransformerConfig.from_config(cfg)), "dit_rt.models.wan.WanTransformer"
    except (ImportError, AttributeError, TypeError):
        with torch.device("meta"):
            return WanParamTree(cfg), "tools/bench_load.py WanParamTree (fused QKV / KV)"


# ------------------------------------------------------------------------------------------------ timing


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def time_dit_rt(folder: Path, files: list[Path], device: str) -> dict:
    out = {}
    model, kind = build_meta(folder)
    while True:
        cache = prepare_cache(files)
        sync(device)
        t0 = time.perf_counter()
        try:
            report = load_weights(model, folder, device=device, dtype=torch.bfloat16, component="transformer")
            break
        except CheckpointError as e:  # the dit_rt Wan model is young: time the loader on the name tree
            if isinstance(model, WanParamTree):
                raise
            out["model_error"] = f"{kind}: {e}"[:500]
            release(device)
            with torch.device("meta"):
                model, kind = WanParamTree(read_config(folder)), "WanParamTree (fallback)"
    sync(device)
    dt = time.perf_counter() - t0
    model_bytes = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    out.update(seconds=dt, model=kind, tensors=report.tensors, cache=cache, model_GB=model_bytes / 1e9)
    if device.startswith("cuda"):
        out["peak_GB"] = torch.cuda.max_memory_allocated() / 1e9
    del model
    release(device)
    return out


def time_diffusers(folder: Path, files: list[Path], device: str) -> dict:
    try:
        from diffusers import WanTransformer3DModel
    except ImportError as e:
        return {"error": f"diffusers unavailable: {e}"}
    out = {}
    variants = {
        "from_pretrained+to": lambda: WanTransformer3DModel.from_pretrained(
            folder, torch_dtype=torch.bfloat16
        ).to(device),
        "from_pretrained(device_map)": lambda: WanTransformer3DModel.from_pretrained(
            folder, torch_dtype=torch.bfloat16, device_map=device
        ),
    }
    for name, fn in variants.items():
        cache = prepare_cache(files)
        sync(device)
        t0 = time.perf_counter()
        try:
            model = fn()
            sync(device)
            out[name] = {"seconds": time.perf_counter() - t0, "cache": cache}
            del model
        except Exception as e:  # a variant this diffusers/accelerate install does not support
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        release(device)
    return out


def bench(size: str, root: Path, device: str, skip_diffusers: bool) -> dict:
    folder = root / f"wan-{size}" / "transformer"
    t0 = time.perf_counter()
    files = write_checkpoint(size, folder, device)
    nbytes = sum(p.stat().st_size for p in files)
    res = {
        "files": len(files),
        "GB": nbytes / 1e9,
        "stored_dtype": str(SIZES[size][3]).removeprefix("torch."),
        "write_s": time.perf_counter() - t0,
    }
    cache = prepare_cache(files)
    res["raw_read"] = {"seconds": raw_read(files), "cache": cache}
    res["raw_read"]["GBps"] = nbytes / 1e9 / res["raw_read"]["seconds"]
    res["dit_rt"] = time_dit_rt(folder, files, device)
    res["dit_rt"]["GBps"] = nbytes / 1e9 / res["dit_rt"]["seconds"]
    res["dit_rt_vs_raw_read"] = res["dit_rt"]["GBps"] / res["raw_read"]["GBps"]
    if not skip_diffusers:
        res["diffusers"] = time_diffusers(folder, files, device)
        times = [v["seconds"] for v in res["diffusers"].values() if "seconds" in v]
        if times:
            res["speedup_vs_diffusers_best"] = min(times) / res["dit_rt"]["seconds"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1.3b,14b", help=f"comma-separated, from {', '.join(SIZES)}")
    ap.add_argument("--dir", default="/tmp/ckpt", type=Path)
    ap.add_argument("--out", default="bench_load.json", type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-diffusers", action="store_true")
    ap.add_argument(
        "--cache",
        default="cold",
        choices=["cold", "warm"],
        help="cold: drop the page cache before each measurement; warm: read the files into it first",
    )
    args = ap.parse_args()
    global WARM
    WARM = args.cache == "warm"
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        sys.exit(f"unknown size(s) {unknown}; choose from {', '.join(SIZES)}")
    env = {"device": args.device, "torch": torch.__version__, "cache": args.cache}
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    results = {"env": env, "sizes": {}}
    for size in sizes:
        r = results["sizes"][size] = bench(size, args.dir, args.device, args.skip_diffusers)
        args.out.write_text(json.dumps(results, indent=2))  # keep what is done if a later size fails
        diff = r.get("diffusers", {})
        print(
            f"{size:>5}: {r['GB']:.2f} GB {r['stored_dtype']} in {r['files']} file(s) | raw read "
            f"{r['raw_read']['seconds']:.2f} s ({r['raw_read']['GBps']:.2f} GB/s, cache {args.cache}: "
            f"{r['raw_read']['cache']}) | dit_rt {r['dit_rt']['seconds']:.2f} s "
            f"({r['dit_rt_vs_raw_read']:.0%} of raw) | diffusers "
            + ", ".join(
                f"{k} {v['seconds']:.2f} s" if "seconds" in v else f"{k} failed" for k, v in diff.items()
            )
            + (
                f" | speedup {r['speedup_vs_diffusers_best']:.1f}x"
                if "speedup_vs_diffusers_best" in r
                else ""
            ),
            flush=True,
        )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
