"""The `dit-rt` command (also `python -m dit_rt`): generate, models, info, demo."""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path


def _launched() -> bool:
    """Whether a launcher (torchrun) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", help="bfloat16 | float16 | float32 (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--vae-dtype", help="dtype of the VAE (default: --dtype)")
    p.add_argument(
        "--attention", default="auto", help="attention backend (auto, sdpa, fa3, fa3-fp8, sage, ...)"
    )
    p.add_argument("--linear", default="default", help="linear weight format (default, fp8-per-tensor, ...)")
    p.add_argument("--cache", choices=["teacache", "fbcache"], help="step cache kind")
    p.add_argument("--cache-threshold", type=float, help="step cache threshold")
    p.add_argument("--offload", choices=["block", "model"], help="CPU offload mode")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the block stack from CUDA graphs")
    for degree in ("dp", "cfg", "ulysses", "ring"):
        p.add_argument(f"--{degree}", type=int, default=1, help=f"{degree} parallel degree (under torchrun)")
    p.add_argument("--fsdp", action="store_true", help="shard the transformer with FSDP2")


def _runtime_options(a: argparse.Namespace) -> dict:
    parallel = {k: getattr(a, k) for k in ("dp", "cfg", "ulysses", "ring") if getattr(a, k) != 1}
    if a.fsdp:
        parallel["fsdp"] = True
    if not _launched():
        parallel = parallel or None
    # else: under torchrun the degrees (all 1 when no flag is given) must multiply to the world size:
    # N independent copies all writing the same file is never what was meant.
    cache = None
    if a.cache:
        cache = {"kind": a.cache} | (
            {"threshold": a.cache_threshold} if a.cache_threshold is not None else {}
        )
    elif a.cache_threshold is not None:
        raise ValueError("--cache-threshold needs --cache teacache or --cache fbcache")
    opts = dict(
        attention=a.attention,
        linear=a.linear,
        parallel=parallel,
        cache=cache,
        offload=a.offload,
        compile=a.compile,
        cuda_graphs=a.cuda_graphs,
    )
    for key in ("device", "dtype", "vae_dtype"):
        if getattr(a, key) is not None:
            opts[key] = getattr(a, key)
    return opts


def _check_output(path: str) -> None:
    from dit_rt.media import FORMATS

    if Path(path).suffix.lower() not in FORMATS:
        raise ValueError(f"-o {path}: the extension must be one of {', '.join(FORMATS)}")


def cmd_generate(a: argparse.Namespace) -> int:
    import dit_rt

    _check_output(a.output)
    if a.image is not None and not Path(a.image).is_file():
        raise ValueError(f"--image {a.image}: no such file")
    pipe = dit_rt.load(a.model, revision=a.revision, **_runtime_options(a))
    kwargs = dict(
        negative_prompt=a.negative_prompt,
        height=a.height,
        width=a.width,
        num_frames=a.frames,
        num_inference_steps=a.steps,
        guidance_scale=a.guidance,
        guidance_scale_2=a.guidance_2,
        flow_shift=a.flow_shift,
        seed=a.seed,
    )
    if a.image is not None:
        kwargs["image"] = a.image
    out = pipe.generate(a.prompt, progress_bar=_rank() == 0, **kwargs)
    if _rank() == 0:  # every rank holds the same frames; one writes them
        written = out.save(a.output, fps=a.fps)
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    from dit_rt.catalog import list_models

    print(f"{'alias':36} {'implemented':11} {'task':4} {'repo'}")
    for e in list_models():
        print(f"{e.alias:36} {'yes' if e.implemented else 'not yet':11} {e.task:4} {e.repo}")
    return 0


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def cmd_info(a: argparse.Namespace) -> int:
    folder = Path(a.path)
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{folder} is not a model folder: it has no model_index.json")
    meta = json.loads(index.read_text())
    print(f"{folder}: {meta.get('_class_name')}")
    for name, spec in meta.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        files = sorted((folder / name).glob("*.safetensors"))
        params, dtypes = 0, {}
        for f in files:
            for t in _safetensors_header(f).values():
                n = 1
                for s in t["shape"]:
                    n *= s
                params += n
                dtypes[t["dtype"]] = dtypes.get(t["dtype"], 0) + n
        detail = f"{params / 1e6:,.1f}M params, " + ", ".join(
            f"{k} {v / 1e6:,.1f}M" for k, v in dtypes.items()
        )
        print(f"  {name:14} {spec[1]:28} {detail if files else '(no weights)'}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    import dit_rt
    from dit_rt.demo import tiny_wan_folder

    _check_output(a.output)
    folder = tiny_wan_folder()
    pipe = dit_rt.load(str(folder), device="cpu", dtype="float32")
    out = pipe.generate(
        "a cat and a dog baking a cake",
        height=64,
        width=96,
        num_frames=9,
        num_inference_steps=a.steps,
        seed=a.seed,
        progress_bar=False,
    )
    written = out.save(a.output, fps=8)
    print("wrote " + ", ".join(str(p) for p in written) + " (random weights: expect noise)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dit-rt", description="Diffusion-transformer image and video generation")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a video or image")
    g.add_argument("--model", required=True, help="catalog alias, Hub repo id, or local Hub-layout folder")
    g.add_argument("--revision", help="Hub revision")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--frames", type=int)
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance", type=float)
    g.add_argument("--guidance-2", type=float, help="Wan 2.2 A14B: guidance of the low-noise expert")
    g.add_argument("--flow-shift", type=float, help="override the scheduler's flow shift")
    g.add_argument("--seed", type=int)
    g.add_argument("--fps", type=int)
    g.add_argument("--image", help="conditioning image for image-to-video models")
    g.add_argument("-o", "--output", required=True, help="output file: .mp4, .gif, .webp or .png")
    _add_runtime_flags(g)
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("models", help="list the catalog")
    m.set_defaults(func=cmd_models)

    i = sub.add_parser("info", help="what a checkpoint folder holds")
    i.add_argument("path")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="generate a short clip with a tiny random model on the CPU (no download)")
    d.add_argument("-o", "--output", default="demo.mp4")
    d.add_argument("--steps", type=int, default=4)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, NotImplementedError, ImportError, FileNotFoundError) as e:
        if _rank() == 0:  # the same error on every rank of a torchrun launch: report it once
            print(f"dit-rt: error: {e}", file=sys.stderr)
        return 2
    finally:
        dist = sys.modules.get("torch.distributed")  # loaded only if a command used it
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
