"""FLUX.2-dev on one GPU: peak memory and time of whole generations, from `dit_rt.load` to the image.

    python tools/bench_flux2_memory.py --steps 4 --out /tmp/flux2_mem.json            # H200
    python tools/bench_flux2_memory.py --tiny --device cpu --steps 1                  # CPU smoke

The checkpoint is FLUX.2-dev in the Hub layout at its real configuration (the 32B transformer, the
Mistral-Small 3.x text stack with all 40 layers, the VAE; a small tokenizer), every weight zero and every
safetensors file sparse: ~115 GB of tensors take no disk blocks and read at memory speed, so `dit_rt.load`
runs as on the real files (header checks, the memory check, quantize-on-load, offload) on a machine whose
disk cannot hold them. Zeros make the image meaningless, not the memory; the vision tower, which dit_rt
never reads, is left out of the text encoder's file.

Runs, each in a fresh process (peaks from a clean allocator), the same prompt and 1024x1024:
- fp8: `linear="fp8-per-tensor"` (transformer and text encoder quantized at load); target peak <= 72 GiB;
- offload: bf16 with `offload="block"` (transformer and text encoder); target peak <= 40 GiB at <= 1.3x
  the resident run's generate time;
- offload-resident: the same with `resident_gib=32` (`--resident-gib`; the leading blocks that fit stay on
  the GPU);
- offload-auto: `resident_gib="auto"` (as many leading blocks as the card's free memory holds; on an 80 GB
  card the whole transformer);
- resident: bf16, everything on the GPU (the time baseline; needs ~100 GiB).
`--random` fills the transformer's weights with random values after loading (zeros run GEMMs faster than
real weights: the resident run gets faster and the offload runs' time ratio worse than with real weights).
Peak = torch's max reserved bytes over load + generate; host peak = the process's max RSS (pinned blocks
included); load and generate seconds apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_e2e import FLUX_SCHEDULER  # noqa: E402
from bench_flux import FLUX2_TRANSFORMER, FLUX2_VAE, TINY_FLUX2, TINY_FLUX2_VAE  # noqa: E402

from dit_rt.models.text.mistral import MistralTextConfig  # noqa: E402

RUNS = {
    "fp8": dict(linear="fp8-per-tensor"),
    "offload": dict(offload="block"),
    # the 8 double and the first 19 single blocks stay (31.9 GiB); 29 single blocks (26.5 GiB) stream per
    # step, ~0.56 s at ~50 GB/s against ~0.45 s of compute; weights on the GPU ~35.5 GiB
    "offload-resident": dict(offload=dict(name="block", resident_gib=32)),
    # as many leading blocks as the card holds: on an 80 GB card the whole transformer, the text encoder
    # streamed once per prompt (the bf16 run that fits an H100 at near-resident speed)
    "offload-auto": dict(offload=dict(name="block", resident_gib="auto")),
    "resident": dict(),
}
TARGET_GIB = {"fp8": 72, "offload": 40, "offload-resident": 40}
# Mistral-Small 3.x text_config: the defaults of dit_rt's own config (spec flux-encoders-schedulers.md B.6)
MISTRAL = {k: v for k, v in dataclasses.asdict(MistralTextConfig()).items() if k != "output_layers"}
MISTRAL |= dict(model_type="mistral", max_position_embeddings=131072)
TINY_MISTRAL = dict(
    MISTRAL, hidden_size=16, intermediate_size=32, num_hidden_layers=31, num_attention_heads=2
)
TINY_MISTRAL |= dict(num_key_value_heads=1, head_dim=8, vocab_size=256)
# FLUX.2-dev's scheduler_config.json is FLUX.1-dev's (the pipeline computes its own mu)
SCHEDULER = dict(FLUX_SCHEDULER, _class_name="FlowMatchEulerDiscreteScheduler")
INDEX = dict(
    _class_name="Flux2Pipeline",
    scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"],
    text_encoder=["transformers", "Mistral3ForConditionalGeneration"],
    tokenizer=["transformers", "PreTrainedTokenizerFast"],
    transformer=["diffusers", "Flux2Transformer2DModel"],
    vae=["diffusers", "AutoencoderKLFlux2"],
)
PROMPT = "a photo of a red cat baking a cake"
SHARD_BYTES = 10 * 2**30  # the Hub's shards are a few GB each; sparse, their size costs nothing


# ---------------------------------------------------------------------------------------------- checkpoint


def mistral_shapes(c: dict) -> dict[str, tuple[str, list[int]]]:
    """Key -> (dtype, shape) of the Mistral3 text stack as transformers saves it (`language_model.*`)."""
    d, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd, ff = c["head_dim"], c["intermediate_size"]
    shapes = {"language_model.model.embed_tokens.weight": [c["vocab_size"], d]}
    for i in range(c["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": [d],
            p + "post_attention_layernorm.weight": [d],
            p + "self_attn.q_proj.weight": [heads * hd, d],
            p + "self_attn.k_proj.weight": [kv * hd, d],
            p + "self_attn.v_proj.weight": [kv * hd, d],
            p + "self_attn.o_proj.weight": [d, heads * hd],
            p + "mlp.gate_proj.weight": [ff, d],
            p + "mlp.up_proj.weight": [ff, d],
            p + "mlp.down_proj.weight": [d, ff],
        }
    shapes["language_model.model.norm.weight"] = [d]
    shapes["language_model.lm_head.weight"] = [c["vocab_size"], d]
    return {k: ("BF16", v) for k, v in shapes.items()}


def diffusers_shapes(cls_name: str, config: dict) -> dict[str, tuple[str, list[int]]]:
    """Key -> (safetensors dtype, shape) of a diffusers model at `config`, built on the meta device."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, cls_name)(**config)
    return {
        k: ("BF16" if v.dtype.is_floating_point else "I64", list(v.shape))
        for k, v in model.state_dict().items()
    }


BYTES = {"BF16": 2, "I64": 8}


def write_sparse(folder: Path, stem: str, shapes: dict[str, tuple[str, list[int]]]) -> int:
    """safetensors shards of zeros holding `shapes` (+ an index when sharded): each file a header and a hole.
    Returns the tensor bytes."""
    shards, current, size = [], {}, 0
    for key, (dtype, shape) in shapes.items():
        n = BYTES[dtype] * math.prod(shape)
        if current and size + n > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[key] = (dtype, shape)
        size += n
    shards.append(current)
    names = (
        [f"{stem}.safetensors"]
        if len(shards) == 1
        else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, (dtype, shape) in shard.items():
            n = BYTES[dtype] * math.prod(shape)
            header[key] = dict(dtype=dtype, shape=shape, data_offsets=[offset, offset + n])
            offset += n
            weight_map[key] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)  # the tensors: a hole reading as zeros
        total += offset
    if len(names) > 1:
        index = dict(metadata=dict(total_size=total), weight_map=weight_map)
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def tokenizer_json() -> str:
    """A small Unigram tokenizer with the special tokens the FLUX.2 prompt template writes."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    special = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    pieces = special + ["▁" + w for w in PROMPT.split()] + list("abcdefghijklmnopqrstuvwxyz.,▁")
    tok = Tokenizer(models.Unigram([(p, -1.0 - 0.01 * i) for i, p in enumerate(pieces)], unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens(special)
    return tok.to_str()


def build(folder: Path, tiny: bool) -> dict[str, int]:
    """Write the sparse checkpoint into `folder` (once: an existing model_index.json is kept)."""
    if (folder / "model_index.json").is_file():
        return json.loads((folder / "bytes.json").read_text())
    text = TINY_MISTRAL if tiny else MISTRAL
    transformer = dict(TINY_FLUX2 if tiny else FLUX2_TRANSFORMER, _class_name="Flux2Transformer2DModel")
    vae = dict(TINY_FLUX2_VAE if tiny else FLUX2_VAE, _class_name="AutoencoderKLFlux2")
    text_config = dict(
        architectures=["Mistral3ForConditionalGeneration"],
        model_type="mistral3",
        text_config=text,
        vision_config=dict(model_type="pixtral", hidden_size=1024, num_hidden_layers=24, patch_size=14),
        image_token_index=10,
        tie_word_embeddings=False,
    )
    parts = {
        "transformer": (transformer, "diffusion_pytorch_model", diffusers_shapes("Flux2Transformer2DModel", {
            k: v for k, v in transformer.items() if not k.startswith("_")})),
        "vae": (vae, "diffusion_pytorch_model", diffusers_shapes("AutoencoderKLFlux2", {
            k: v for k, v in vae.items() if not k.startswith("_")})),
        "text_encoder": (text_config, "model", mistral_shapes(text)),
    }  # fmt: skip
    sizes = {}
    for name, (config, stem, shapes) in parts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(config, indent=1))
        sizes[name] = write_sparse(folder / name, stem, shapes)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=1))
    (folder / "tokenizer").mkdir(exist_ok=True)
    (folder / "tokenizer" / "tokenizer.json").write_text(tokenizer_json())
    (folder / "bytes.json").write_text(json.dumps(sizes))
    (folder / "model_index.json").write_text(json.dumps(INDEX, indent=1))
    return sizes


# ---------------------------------------------------------------------------------------------- runs


@torch.no_grad()
def randomize_in_place(model: torch.nn.Module) -> None:
    """Random values in every floating weight of `model` wherever it lives (the GPU, or the page-locked host
    copy of an offloaded block): matrices N(0, 1 / fan_in), vectors 1. Zero weights make GEMMs faster than
    real ones (a resident FLUX.2 step took ~0.3 s where the forward bench's random weights take ~0.44 s), so
    the copies an offload run cannot hide behind compute weigh more than they would."""
    g = {}
    for p in model.parameters():
        if p.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            continue  # quantized codes
        if p.ndim < 2:
            p.fill_(1.0)
            continue
        gen = g.setdefault(p.device, torch.Generator(p.device).manual_seed(0))
        p.normal_(0, p[0].numel() ** -0.5, generator=gen)


def one_run(folder: str, name: str, device: str, steps: int, size: int, random: bool = False) -> dict:
    """Load with RUNS[name], warm up with one step, time a `steps`-step generation (this process only);
    `random`: the transformer's weights randomized after loading."""
    import dit_rt

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    pipe = dit_rt.load(folder, device=device, dtype="bfloat16" if cuda else "float32", **RUNS[name])
    load_s = time.perf_counter() - t0
    if random:
        randomize_in_place(pipe.transformer)
    loaded = torch.cuda.max_memory_reserved(dev) / 2**30 if cuda else None
    kw = dict(height=size, width=size, seed=0, progress_bar=False, output_type="frames")
    pipe.generate(PROMPT, num_inference_steps=1, **kw)  # warm-up: kernels, allocator, offload buffers
    if cuda:
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    out = pipe.generate(PROMPT, num_inference_steps=steps, **kw)
    if cuda:
        torch.cuda.synchronize(dev)
    generate_s = time.perf_counter() - t0
    return dict(
        run=name,
        options=RUNS[name],
        load_s=round(load_s, 2),
        generate_s=round(generate_s, 3),
        # seconds of text encoding, the steps and the decode (device-synchronized at each end)
        phases_s={k: round(v, 3) for k, v in out.timings.items()},
        steps=steps,
        peak_after_load_gib=None if loaded is None else round(loaded, 2),
        peak_gib=round(torch.cuda.max_memory_reserved(dev) / 2**30, 2) if cuda else None,
        peak_allocated_gib=round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if cuda else None,
        host_peak_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1),  # KiB on Linux
        image=list(out.frames.shape),
        target_gib=TARGET_GIB.get(name),
        random_transformer=random,
    )


def table(rows: list[dict]) -> str:
    resident = next((r["generate_s"] for r in rows if r.get("run") == "resident" and "error" not in r), None)
    lines = [
        "| run | load s | generate s | vs resident | peak GiB (after load / whole) | host GiB | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | - | - | - | - | - | {r['error'][:100]} |")
            continue
        ratio = f"{r['generate_s'] / resident:.2f}x" if resident else "-"
        target = f"<= {r['target_gib']} GiB" + (" (1.3x time)" if r["run"].startswith("offload") else "")
        lines.append(
            f"| {r['run']} | {r['load_s']} | {r['generate_s']} | {ratio} | "
            f"{r['peak_after_load_gib']} / {r['peak_gib']} | {r['host_peak_gib']} | "
            f"{target if r['target_gib'] else '-'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated: {', '.join(RUNS)}")
    p.add_argument("--steps", type=int, default=4, help="denoising steps of the timed generation")
    p.add_argument("--size", type=int, help="image height and width (default 1024; tiny 64)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workdir", default="/tmp/dit_rt_flux2_sparse", help="where the sparse checkpoint goes")
    p.add_argument("--tiny", action="store_true", help="tiny configurations (CPU smoke test)")
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument(
        "--random",
        action="store_true",
        help="randomize the transformer's weights after loading (zeros run GEMMs faster than real weights)",
    )
    p.add_argument("--resident-gib", type=float, default=32, help="the offload-resident run's budget")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this one in this process, print JSON
    a = p.parse_args(argv)
    size = a.size or (64 if a.tiny else 1024)
    RUNS["offload-resident"] = dict(offload=dict(name="block", resident_gib=a.resident_gib))
    folder = Path(a.workdir) / ("tiny" if a.tiny else "flux.2-dev")
    if a.one:
        row = one_run(str(folder), a.one, a.device, a.steps, size, a.random)
        print("ROW " + json.dumps(row), flush=True)
        return []
    names = [n for n in a.runs.split(",") if n]
    if not names or any(n not in RUNS for n in names):
        raise SystemExit(f"--runs: choose from {', '.join(RUNS)}")
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sizes = build(folder, a.tiny)
    gib = {k: round(v / 2**30, 1) for k, v in sizes.items()}
    print(f"sparse checkpoint {folder}: {gib} GiB of bf16 tensors ({time.perf_counter() - t0:.1f} s)")
    rows = []
    for name in names:
        cmd = [sys.executable, __file__, "--one", name, "--steps", str(a.steps), "--size", str(size)]
        cmd += ["--device", a.device, "--workdir", a.workdir, "--resident-gib", str(a.resident_gib)]
        cmd += (["--tiny"] if a.tiny else []) + (["--random"] if a.random else [])
        run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        found = [line[4:] for line in run.stdout.splitlines() if line.startswith("ROW ")]
        if run.returncode == 0 and found:
            rows.append(json.loads(found[-1]))
        else:
            tail = (run.stderr or run.stdout).strip().splitlines()
            rows.append(dict(run=name, error=f"rc {run.returncode}: {tail[-1] if tail else ''}"))
            print(run.stderr[-3000:], file=sys.stderr)
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if a.out:
        env = dict(device=torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu")
        env |= dict(torch=torch.__version__, date=time.strftime("%Y-%m-%d"), checkpoint_gib=gib)
        Path(a.out).write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
