"""Quality of the approximate modes on a trained model: the tiny shapes model shipped in dit_rt/tiny/.

Random weights make flat attention and slowly moving step-cache indicators, so the error of an approximate
mode measured on them says little. This harness generates the same prompts from the same seeds with the
exact settings and with each approximate mode, and reports per mode: PSNR of the frames against the exact
ones (mean and worst over the prompts), how many clips still pass dit_rt.clipcheck, the time per clip and
the step cache's skipped evaluations.

Modes: fp8 linears (emulated on the CPU), TeaCache (coefficients borrowed from wan2.1-t2v-1.3b: none are
fitted for this model) and FBCache at several thresholds, svg sparse attention; on CUDA also the fa3, fa3-fp8
and sage attention kernels and fp8 linears + fa3-fp8 (the fast mode); Ulysses and Ring over two processes
(gloo on the CPU, NCCL where two GPUs are visible; rank 0's clips are scored). A mode that cannot run here is
reported with its error, not dropped.

    python tools/quality.py                  # every mode that runs on this machine
    python tools/quality.py --smoke          # seconds: one prompt, three steps, a few modes (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

PROMPTS = (
    "a red circle moving right on a blue background",
    "a yellow square moving left on a black background",
    "a white triangle moving up on a green background",
    "a green circle moving down on a white background",
    "a blue square growing on a yellow background",
    "a red triangle shrinking on a white background",
    "a white circle turning red on a black background",
)
TEACACHE_MODEL = "wan2.1-t2v-1.3b"


@dataclass
class Row:
    mode: str
    psnr_mean: float | None = None
    psnr_min: float | None = None
    passed: str = ""
    seconds: float | None = None
    skipped: str = ""
    error: str = ""


def modes(device: str, smoke: bool, only: str = "") -> dict[str, dict]:
    """Mode name -> dit_rt.load options (beyond device and dtype); `only`: comma-separated parts of names, the
    modes kept besides exact (the reference)."""
    m: dict[str, dict] = {"exact": {}}
    m["fp8-per-tensor linears"] = dict(linear="fp8-per-tensor")
    if not smoke:
        m["fp8-rowwise linears"] = dict(linear="fp8-rowwise")
        m["fp8-blockwise linears"] = dict(linear="fp8-blockwise")
    for t in (0.1,) if smoke else (0.05, 0.1, 0.2, 0.3):
        m[f"teacache {t}"] = dict(cache=dict(kind="teacache", threshold=t, model=TEACACHE_MODEL))
    for t in (0.1,) if smoke else (0.03, 0.05, 0.1, 0.2):
        m[f"fbcache {t}"] = dict(cache=dict(kind="fbcache", threshold=t))
    if not smoke:
        m["svg"] = dict(attention=dict(name="svg", dense="sdpa"))
        # The defaults run dense at this 3 x 4 x 4 latent grid (one 2048-token chunk holds it all): chunks of
        # one frame (16 tokens) make the band sparse, the nearest thing to real sizes this model allows.
        for budget in (0.5, 0.34):
            svg = dict(name="svg", dense="sdpa", chunk=16, budget=budget)
            m[f"svg chunk 16, budget {budget}"] = dict(attention=svg)
        m["ulysses 2"] = dict(parallel=dict(ulysses=2))
        m["ring 2"] = dict(parallel=dict(ring=2))
    if device.startswith("cuda"):
        for a in ("fa3", "fa3-fp8", "sage"):
            m[f"{a} attention"] = dict(attention=a)
        m["fast (fp8 linears + fa3-fp8)"] = dict(linear="fp8-per-tensor", attention="fa3-fp8")
    keep = [k.strip() for k in only.split(",") if k.strip()]
    return {k: v for k, v in m.items() if k == "exact" or not keep or any(part in k for part in keep)}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of frames in [0, 1]; inf when equal."""
    mse = float((a.float() - b.float()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def generate(pipe, prompts, seed: int, steps: int, guidance: float) -> tuple[list[torch.Tensor], float, dict]:
    """Each prompt's frames [T, H, W, 3], the mean seconds per clip, and the summed cache counters."""
    from dit_rt.demo import DEMO_FRAMES, DEMO_SIZE

    clips, stats, t0 = [], {}, time.perf_counter()
    for p in prompts:
        out = pipe.generate(
            p,
            negative_prompt="",
            height=DEMO_SIZE,
            width=DEMO_SIZE,
            num_frames=DEMO_FRAMES,
            num_inference_steps=steps,
            guidance_scale=guidance,
            seed=seed,
            progress_bar=False,
        )
        clips.append(out.frames[0])
        for k, v in (out.stats or {}).items():
            if isinstance(v, (int, float)):
                stats[k] = stats.get(k, 0) + v
    return clips, (time.perf_counter() - t0) / len(prompts), stats


def _rank(rank: int, world: int, port: int, job: dict, out: str) -> None:
    """One process of a two-process mode: load with job["options"], generate, rank 0 saves the clips."""
    import dit_rt

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    device = f"cuda:{rank}" if job["device"].startswith("cuda") else "cpu"
    pipe = dit_rt.load(job["folder"], device=device, dtype=job["dtype"], **job["options"])
    result = generate(pipe, job["prompts"], job["seed"], job["steps"], job["guidance"])
    if rank == 0:
        torch.save(result, out)
    torch.distributed.destroy_process_group()


def launched(folder, device, dtype, options, prompts, seed, steps, guidance):
    """`generate` of a parallel mode, over two processes started here (fork)."""
    import torch.multiprocessing as mp

    if device.startswith("cuda") and torch.cuda.device_count() < 2:
        raise RuntimeError("needs 2 GPUs here; `--device cpu` measures it over gloo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = dict(folder=folder, device=device, dtype=dtype, options=options, prompts=prompts, seed=seed)
    job.update(steps=steps, guidance=guidance)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "clips.pt")
        mp.start_processes(_rank, args=(2, port, job, out), nprocs=2, start_method="fork")
        return torch.load(out)


def run(
    folder: str,
    device: str,
    dtype: str,
    prompts,
    seed: int,
    steps: int,
    guidance: float,
    smoke: bool,
    log,
    only: str = "",
):
    """One Row per mode; the first is the exact reference."""
    import dit_rt
    from dit_rt.clipcheck import check_clip

    rows, exact = [], None
    for name, options in modes(device, smoke, only).items():
        row = Row(name)
        try:
            if "parallel" in options:
                args = (folder, device, dtype, options, prompts, seed, steps, guidance)
                clips, row.seconds, stats = launched(*args)
            else:
                pipe = dit_rt.load(folder, device=device, dtype=dtype, **options)
                clips, row.seconds, stats = generate(pipe, prompts, seed, steps, guidance)
        except Exception as e:  # a mode this machine cannot run is a row of the report, not the end of it
            row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            rows.append(row)
            log(f"{name}: {row.error}")
            continue
        exact = exact or clips
        scores = [psnr(c, e) for c, e in zip(clips, exact)]
        row.psnr_mean = sum(scores) / len(scores)
        row.psnr_min = min(scores)
        row.passed = f"{sum(check_clip(c, p).ok for c, p in zip(clips, prompts))}/{len(prompts)}"
        if "skipped" in stats:
            row.skipped = f"{stats['skipped']}/{stats['skipped'] + stats.get('computed', 0)}"
        rows.append(row)
        log(f"{name}: psnr {row.psnr_mean:.1f} dB, {row.passed} pass, {row.seconds:.2f} s")
    return rows


def svg_heads(
    folder: str, device: str, dtype: str, prompts, seed: int, steps: int, guidance: float, svg_options
):
    """svg's error per head type on the trained model's own attention: a dense generation in which, at the
    middle step, every video self-attention call also runs svg (as configured, on the same q / k / v, as a
    layer past the dense first ones) and the relative L2 of its output against the dense one is taken per
    head, grouped by the type svg's profiling gave the head. Returns {type: dict(heads, mean_rel_err,
    max_rel_err)} (heads counted over layers, calls and batch rows)."""
    import dit_rt
    from dit_rt.ops.attention import AttentionContext, attention_context, svg

    pipe = dit_rt.load(folder, device=device, dtype=dtype, attention="sdpa")
    model = pipe.transformers[0]
    config = svg.SvgConfig.parse(dict(svg_options, dense="sdpa"))
    errors: dict[str, list[float]] = {"spatial": [], "temporal": []}
    at_step = steps // 2

    def recorder(base):
        def op(q, k, v, scale=None):
            out = base(q, k, v, scale)
            context = attention_context(model)
            if context.step == at_step:
                ctx = AttentionContext(grid=context.grid, step=1, num_steps=1)  # past any dense warm-up
                probe = svg.SvgAttention(config, base, ctx, dense_layer=False)
                sparse = probe(q, k, v, scale).float()
                dense = out.float()
                err = (sparse - dense).norm(dim=(1, 3)) / dense.norm(dim=(1, 3))  # [B, H]
                for e, temporal in zip(err.flatten().tolist(), probe.temporal.flatten().tolist()):
                    errors["temporal" if temporal else "spatial"].append(e)
            return out

        return op

    for m in svg.video_attention_modules(model):
        m.op = recorder(m.op)
    generate(pipe, prompts, seed, steps, guidance)
    return {
        kind: dict(
            heads=len(e), mean_rel_err=sum(e) / len(e) if e else None, max_rel_err=max(e, default=None)
        )
        for kind, e in errors.items()
    }


def table(rows: list[Row]) -> str:
    def db(x):
        return "-" if x is None else "exact" if math.isinf(x) else f"{x:.1f}"

    lines = [
        "| mode | PSNR mean (dB) | PSNR min (dB) | clip check | s / clip | cache skipped |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.mode} | - | - | - | - | {r.error} |")
        else:
            lines.append(
                f"| {r.mode} | {db(r.psnr_mean)} | {db(r.psnr_min)} | {r.passed} | {r.seconds:.2f} | "
                f"{r.skipped or '-'} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from dit_rt.demo import DEMO_GUIDANCE, DEMO_STEPS, tiny_model_folder

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a Hub-layout folder (default: the shipped tiny model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--steps", type=int, default=DEMO_STEPS)
    p.add_argument("--guidance", type=float, default=DEMO_GUIDANCE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--smoke", action="store_true", help="one prompt, three steps, a few modes")
    p.add_argument(
        "--svg-heads",
        action="store_true",
        help="also svg's error per head type (chunk 16, budgets 0.5 / 0.34)",
    )
    p.add_argument(
        "--only", default="", help="comma-separated parts of mode names to run (exact always runs)"
    )
    a = p.parse_args(argv)
    folder = a.model or str(tiny_model_folder())
    dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    prompts = PROMPTS[:1] if a.smoke else PROMPTS
    steps = 3 if a.smoke else a.steps

    def log(msg: str) -> None:
        print(msg, flush=True)

    rows = run(folder, a.device, dtype, prompts, a.seed, steps, a.guidance, a.smoke, log, a.only)
    print(
        f"\n{len(prompts)} prompts, {steps} steps, guidance {a.guidance}, seed {a.seed}, {a.device} {dtype}"
    )
    print(table(rows))
    heads = {}
    if a.svg_heads:
        print("\nsvg vs dense attention per head type, middle step (relative L2 per head):")
        for budget in (0.5, 0.34):
            options = dict(chunk=16, budget=budget)
            heads[budget] = svg_heads(folder, a.device, dtype, prompts, a.seed, steps, a.guidance, options)
            for kind, h in heads[budget].items():
                mean, worst = h["mean_rel_err"], h["max_rel_err"]
                err = "-" if mean is None else f"mean {mean:.3e}, max {worst:.3e}"
                print(f"  budget {budget}: {kind:8} heads {h['heads']:4}  {err}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(rows=[asdict(r) for r in rows], svg_heads=heads), f, indent=2)
    return 0 if all(not r.error for r in rows[:1]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
