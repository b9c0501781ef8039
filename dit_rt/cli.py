"""The `dit-rt` command (also `python -m dit_rt`): generate, models, info, demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

CATALOG_DEFAULT = "default: the model's catalog default"
VERBOSE = "log the attention backend, load and generation times, step-cache counters"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows `(default: X)` after a flag's help, except where there is no default to show."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _launched() -> bool:
    """Whether a launcher (torchrun) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", help="bfloat16 | float16 | float32 (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--vae-dtype", help="dtype of the VAE (default: --dtype; Wan: float32)")
    p.add_argument(
        "--attention", default="auto", help="attention backend (auto, sdpa, fa3, fa3-fp8, sage, ...)"
    )
    p.add_argument("--linear", default="default", help="linear weight format (default, fp8-per-tensor, ...)")
    p.add_argument("--cache", choices=["teacache", "fbcache"], help="step cache kind (default: none)")
    p.add_argument(
        "--cache-threshold", type=float, help="step cache threshold (default: 0.2 teacache, 0.1 fbcache)"
    )
    p.add_argument(
        "--cache-model",
        metavar="ALIAS",
        help="teacache: use this catalog model's published coefficients (for a folder outside the catalog)",
    )
    p.add_argument(
        "--cache-coefficients",
        metavar="C4,C3,C2,C1,C0",
        help="teacache: your own rescaling polynomial, comma-separated, highest power first",
    )
    p.add_argument("--offload", choices=["block", "model"], help="CPU offload mode (default: none)")
    p.add_argument(
        "--offload-resident-gib",
        type=_gib_or_auto,
        metavar="G",
        help="--offload block: keep the leading transformer blocks that fit G GiB on the GPU (fewer copies); "
        "'auto': as many as the card's free memory holds",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the block stack from CUDA graphs")
    for degree in ("dp", "cfg", "ulysses", "ring"):
        p.add_argument(f"--{degree}", type=int, default=1, help=f"{degree} parallel degree (under torchrun)")
    p.add_argument("--fsdp", action="store_true", help="shard the transformer with FSDP2")


def _coefficients(text: str) -> list[float]:
    try:
        values = [float(c) for c in text.split(",")]
    except ValueError:
        values = []
    if not values:
        raise ValueError(
            f"--cache-coefficients {text!r}: expected comma-separated numbers, highest power first "
            "(such as 1.2e3,-4.5e2,6.7e1,-1.8,0.05)"
        )
    return values


def _runtime_options(a: argparse.Namespace) -> dict:
    parallel = {k: getattr(a, k) for k in ("dp", "cfg", "ulysses", "ring") if getattr(a, k) != 1}
    if a.fsdp:
        parallel["fsdp"] = True
    if not _launched():
        parallel = parallel or None
    # else: under torchrun the degrees (all 1 when no flag is given) must multiply to the world size:
    # N independent copies all writing the same file is never what was meant.
    cache = None
    tea = {"model": a.cache_model, "coefficients": a.cache_coefficients}
    if a.cache:
        cache = {"kind": a.cache}
        if a.cache_threshold is not None:
            cache["threshold"] = a.cache_threshold
        if a.cache != "teacache" and any(v is not None for v in tea.values()):
            raise ValueError(
                f"--cache-model and --cache-coefficients apply to --cache teacache, not {a.cache}"
            )
        if a.cache_model is not None:
            cache["model"] = a.cache_model
        if a.cache_coefficients is not None:
            cache["coefficients"] = _coefficients(a.cache_coefficients)
    elif a.cache_threshold is not None or any(v is not None for v in tea.values()):
        raise ValueError(
            "--cache-threshold, --cache-model and --cache-coefficients need --cache teacache (or fbcache)"
        )
    if a.offload_resident_gib is not None and a.offload != "block":
        raise ValueError("--offload-resident-gib needs --offload block")
    opts = dict(
        attention=a.attention,
        linear=a.linear,
        parallel=parallel,
        cache=cache,
        offload=a.offload
        if a.offload_resident_gib is None
        else dict(name=a.offload, resident_gib=a.offload_resident_gib),
        compile=a.compile,
        cuda_graphs=a.cuda_graphs,
    )
    for key in ("device", "dtype", "vae_dtype"):
        if getattr(a, key) is not None:
            opts[key] = getattr(a, key)
    return opts


def _check_output(path: str) -> None:
    """The extension, the optional package its writer needs, and that the path can be written, before any
    work (dit_rt.checks.check_output_path: a directory, an unwritable folder)."""
    from dit_rt.checks import check_output_path

    check_output_path(path)


def _timed(what: str, t0: float) -> None:
    logging.getLogger("dit_rt").info("%s in %.1f s", what, time.perf_counter() - t0)


def cmd_generate(a: argparse.Namespace) -> int:
    import dit_rt
    from dit_rt.checks import check_generation, check_guidance

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
    # Every argument is checked before the model is resolved, downloaded or loaded.
    _check_output(a.output)
    if a.true_cfg_scale is not None:  # only FLUX pipelines take it
        check_guidance("--true-cfg-scale", a.true_cfg_scale, 1.0)
        kwargs["true_cfg_scale"] = a.true_cfg_scale
    checked = {k: v for k, v in kwargs.items() if k not in ("negative_prompt", "seed", "true_cfg_scale")}
    check_generation(a.model, a.revision, fps=a.fps, **({"image": None} | checked))
    t0 = time.perf_counter()
    pipe = dit_rt.load(a.model, revision=a.revision, **_runtime_options(a))
    _timed(f"loaded {a.model}", t0)
    t0 = time.perf_counter()
    out = pipe.generate(a.prompt, progress_bar=_rank() == 0, **kwargs)
    _timed("generated", t0)
    if _rank() == 0:  # every rank holds the same frames; one writes them
        _report(out)
        written = out.save(a.output, fps=a.fps)
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _report(out) -> None:
    """The seed always (it is needed to reproduce the output); the phases' times and the step cache's
    counters with -v."""
    print(f"seed: {out.seed}")
    log = logging.getLogger("dit_rt")
    if out.timings:
        log.info("time: %s", ", ".join(f"{k} {v:.2f} s" for k, v in out.timings.items()))
    if out.stats:
        log.info("stats: %s", ", ".join(f"{k} {v}" for k, v in out.stats.items()))


def cmd_models(a: argparse.Namespace) -> int:
    from dit_rt.catalog import list_models

    print("Defaults are the authors' published settings; every one can be overridden with a flag.")
    entries = list_models()
    w = max(len(e.alias) for e in entries)
    head = f"{'size HxW':9} {'frames':>6} {'steps':>5} {'guidance':8}"
    print(f"{'alias':{w}} {'implemented':11} {'task':4} {head} repo")
    for e in entries:
        d = e.defaults
        guidance = f"{d.guidance_scale:.1f}" + (
            f"/{d.guidance_scale_2:.1f}" if d.guidance_scale_2 is not None else ""
        )
        print(
            f"{e.alias:{w}} {'yes' if e.implemented else 'not yet':11} {e.task:4} "
            f"{f'{d.height}x{d.width}':9} {d.num_frames:>6} {d.num_inference_steps:>5} {guidance:8} {e.repo}"
        )
    return 0


def _count(n: int) -> str:
    return next(
        f"{n / d:,.1f}{u}" for d, u in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")) if n >= d or d == 1
    )


def _component_summary(folder: Path) -> str:
    """'1.3B params, BF16 1.3B' from the validated headers, or '(no weights)'; CheckpointError when a file is
    missing, truncated or corrupt (the loader's own checks, which name the file)."""
    from dit_rt.loaders import CheckpointError, find_weight_files, scan
    from dit_rt.loaders.safetensors_io import DTYPES

    if not folder.is_dir():
        raise CheckpointError(f"{folder}: component folder missing (model_index.json lists it)")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.safetensors.index.json")):
        return "(no weights)"
    codes = {dtype: code for code, dtype in DTYPES.items()}
    params, dtypes = 0, {}
    for t in scan(*find_weight_files(folder)).values():
        n = 1
        for s in t.shape:
            n *= s
        params += n
        dtypes[codes[t.dtype]] = dtypes.get(codes[t.dtype], 0) + n
    return f"{_count(params)} params, " + ", ".join(f"{k} {_count(v)}" for k, v in dtypes.items())


def cmd_info(a: argparse.Namespace) -> int:
    from dit_rt.loaders import CheckpointError, read_model_index

    folder = Path(a.path)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"{folder} is not a model folder: it has no model_index.json")
    meta = read_model_index(folder)
    print(f"{folder}: {meta.get('_class_name')}")
    problems = []
    for name, spec in meta.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        if name == "safety_checker":  # Cosmos' guardrail: never loaded, so not checked either
            print(f"  {name:14} {spec[1]!s:28} not run (dit_rt runs no guardrail)")
            continue
        try:
            detail = _component_summary(folder / name)
        except CheckpointError as e:
            detail = "corrupt (see the error below)"
            problems.append(str(e))
        print(f"  {name:14} {spec[1]!s:28} {detail}")
    if str(meta.get("_class_name")).startswith("Cosmos"):
        print("  guardrail: none (dit_rt does not run NVIDIA's Cosmos safety checker)")
    for p in problems:
        print(f"dit-rt: error: {p}", file=sys.stderr)
    return 2 if problems else 0


def cmd_demo(a: argparse.Namespace) -> int:
    import dataclasses

    import dit_rt
    from dit_rt.clipcheck import check_clip, parse_prompt
    from dit_rt.demo import DEMO_FRAMES, DEMO_SIZE, tiny_model_folder

    try:  # the words and the grammar, before anything loads
        parse_prompt(a.prompt)
    except ValueError as e:
        raise SystemExit(f"dit-rt: error: --prompt: {e}") from None
    if a.scale < 1:
        raise SystemExit(f"dit-rt: error: --scale must be >= 1, got {a.scale}")
    _check_output(a.output)
    folder = tiny_model_folder()
    print(f"checkpoint: {folder} (the tiny shapes model, trained by tools/train_tiny.py)")
    t0 = time.perf_counter()
    pipe = dit_rt.load(str(folder), device="cpu", dtype="float32")
    _timed("loaded", t0)
    t0 = time.perf_counter()
    out = pipe.generate(
        a.prompt,
        negative_prompt="",  # what the model was trained to take as "no prompt"
        height=DEMO_SIZE,
        width=DEMO_SIZE,
        num_frames=DEMO_FRAMES,
        num_inference_steps=a.steps,
        guidance_scale=a.guidance,
        seed=a.seed,
        progress_bar=False,
    )
    _timed("generated", t0)
    _report(out)
    print(f"check: {check_clip(out.frames[0], a.prompt)}")
    big = out.frames.repeat_interleave(a.scale, dim=2).repeat_interleave(a.scale, dim=3)  # nearest, x scale
    written = dataclasses.replace(out, frames=big).save(a.output, fps=8)
    size = f"{DEMO_SIZE * a.scale} px, {DEMO_FRAMES} frames"
    print("wrote " + ", ".join(str(p) for p in written) + f" ({size})")
    return 0


def _gib_or_auto(value: str):
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of GiB or 'auto'") from None


def build_parser() -> argparse.ArgumentParser:
    from dit_rt import __version__
    from dit_rt.clipcheck import DEFAULT_PROMPT, DEMO_GUIDANCE, DEMO_STEPS, GRAMMAR, PALETTE, SHAPES

    p = argparse.ArgumentParser(prog="dit-rt", description="Diffusion-transformer image and video generation")
    p.add_argument("--version", action="version", version=f"dit-rt {__version__}")
    # -v works before or after the command; SUPPRESS keeps a subcommand from resetting the top-level value.
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE)
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser(
        "generate", help="generate a video or image", parents=[verbose], formatter_class=_HelpFormatter
    )
    g.add_argument("--model", required=True, help="catalog alias, Hub repo id, or local Hub-layout folder")
    g.add_argument("--revision", help="Hub revision")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", help=f"what to steer away from ({CATALOG_DEFAULT}; Wan has its own)")
    g.add_argument("--height", type=int, help=f"pixels, a multiple of 16 ({CATALOG_DEFAULT})")
    g.add_argument("--width", type=int, help=f"pixels, a multiple of 16 ({CATALOG_DEFAULT})")
    g.add_argument("--frames", type=int, help=f"number of frames, 4k+1 ({CATALOG_DEFAULT})")
    g.add_argument("--steps", type=int, help=f"denoising steps ({CATALOG_DEFAULT})")
    g.add_argument(
        "--guidance", type=float, help=f"classifier-free guidance scale, 1 = off ({CATALOG_DEFAULT})"
    )
    g.add_argument(
        "--guidance-2", type=float, help=f"Wan 2.2 A14B: guidance of the low-noise expert ({CATALOG_DEFAULT})"
    )
    g.add_argument("--flow-shift", type=float, help=f"the scheduler's flow shift ({CATALOG_DEFAULT})")
    g.add_argument(
        "--true-cfg-scale",
        type=float,
        help="FLUX.1: true CFG with --negative-prompt, two passes a step (default 1: off)",
    )
    g.add_argument("--seed", type=int, help="random seed (default: a random one, printed as `seed: N`)")
    g.add_argument("--fps", type=int, help=f"frame rate of the video file ({CATALOG_DEFAULT}, 16 for Wan)")
    g.add_argument("--image", help="conditioning image for image-to-video models")
    g.add_argument(
        "-o", "--output", required=True, help="output file: .mp4, .gif, .webp or .png (one per frame)"
    )
    _add_runtime_flags(g)
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("models", help="list the catalog and each model's defaults")
    m.set_defaults(func=cmd_models)

    i = sub.add_parser("info", help="what a checkpoint folder holds; checks every weight file's header")
    i.add_argument("path")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser(
        "demo",
        help="a clip from the tiny shapes model shipped with dit_rt, on the CPU in seconds (no download)",
        parents=[verbose],
        formatter_class=_HelpFormatter,
    )
    d.add_argument("-o", "--output", default="demo.mp4", help="output file: .mp4, .gif, .webp or .png")
    d.add_argument(
        "--prompt",
        default=DEFAULT_PROMPT,
        help=f"what to draw: {GRAMMAR}; colours: {', '.join(PALETTE)}; shapes: {', '.join(SHAPES)}",
    )
    d.add_argument("--steps", type=int, default=DEMO_STEPS, help="denoising steps")
    d.add_argument("--guidance", type=float, default=DEMO_GUIDANCE, help="classifier-free guidance scale")
    d.add_argument("--seed", type=int, default=0, help="random seed")
    d.add_argument("--scale", type=int, default=8, help="the 32x32 clip is written this many times larger")
    d.set_defaults(func=cmd_demo)
    return p


def _configure_logging(verbose: bool) -> None:
    """-v: dit_rt's INFO records (attention backend, load and step times, cache counters) on stderr.
    Without it only warnings show (Python's last-resort handler)."""
    log = logging.getLogger("dit_rt")
    if not verbose or _rank() != 0:
        return
    if not any(getattr(h, "_dit_rt_cli", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("dit-rt: %(message)s"))
        handler._dit_rt_cli = True
        log.addHandler(handler)
    log.setLevel(logging.INFO)


# Modules whose pip package has another name.
_PACKAGES = {"PIL": "pillow", "imageio_ffmpeg": "imageio-ffmpeg"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    # numpy is optional and dit_rt's core path does not use it; torch warns at import when it is absent.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    try:
        return args.func(args)
    except BrokenPipeError:  # stdout closed early (`dit-rt models | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 0
    except (ValueError, TypeError, NotImplementedError, ImportError, OSError) as e:
        msg = str(e)
        if isinstance(e, ModuleNotFoundError) and e.name and msg.startswith("No module named"):
            msg += f" (pip install {_PACKAGES.get(e.name, e.name)})"
        if _rank() == 0:  # the same error on every rank of a torchrun launch: report it once
            print(f"dit-rt: error: {msg}", file=sys.stderr)
        return 2
    finally:
        dist = sys.modules.get("torch.distributed")  # loaded only if a command used it
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
