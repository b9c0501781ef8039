"""The demo's checkpoints: the writer of tiny random Wan checkpoints (`dit-rt demo` and the tests), and the
folder of the trained tiny shapes model.

`dit-rt demo` writes a tiny random Wan checkpoint once into the user cache and runs the whole load ->
generate -> save path with no download; its output is noise. tools/train_tiny.py trains a Wan text-to-video
model of a few million parameters on procedural shape clips (Hub Diffusers layout, fp16) meant to ship in
`dit_rt/tiny/` (`tiny_model_folder`); it does not ship yet: the first CPU-trained weights do not pass the
clip check (dit_rt.clipcheck), see issue 23.

The writer is generic and the one place for tiny checkpoints: `write_checkpoint` (any components, Hub
layout), `randomize` and `tokenizer_json`, which the tests' diffusers-built reference checkpoints use too
(`tests/tiny_checkpoints.py`); `write_tiny_wan` / `tiny_wan_folder` give a random Wan checkpoint (its output
is noise). The safetensors files are written here rather than with `safetensors.torch.save_file`, which
needs numpy, an optional package a core install lacks.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

from dit_rt.clipcheck import DEMO_FRAMES, DEMO_GUIDANCE, DEMO_SIZE, DEMO_STEPS  # noqa: F401 (re-exported)

TEXT_DIM = 32
TRANSFORMER = dict(
    _class_name="WanTransformer3DModel",
    patch_size=[1, 2, 2],
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=16,
    out_channels=16,
    text_dim=TEXT_DIM,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
    pos_embed_seq_len=None,
)
VAE = dict(
    _class_name="AutoencoderKLWan",
    base_dim=8,
    z_dim=16,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    latents_mean=[0.0] * 16,
    latents_std=[1.0] * 16,
)
TEXT_ENCODER = dict(
    architectures=["UMT5EncoderModel"],
    model_type="umt5",
    vocab_size=128,
    d_model=TEXT_DIM,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new",
    is_gated_act=True,
    layer_norm_epsilon=1e-6,
    dropout_rate=0.0,
    pad_token_id=0,
    eos_token_id=1,
    tie_word_embeddings=False,
)
SCHEDULER = dict(
    _class_name="UniPCMultistepScheduler",
    num_train_timesteps=1000,
    solver_order=2,
    prediction_type="flow_prediction",
    predict_x0=True,
    solver_type="bh2",
    lower_order_final=True,
    disable_corrector=[],
    final_sigmas_type="zero",
    use_flow_sigmas=True,
    flow_shift=3.0,
    timestep_spacing="linspace",
    steps_offset=0,
)
INDEX = dict(
    _class_name="WanPipeline",
    boundary_ratio=None,
    expand_timesteps=False,
    scheduler=["diffusers", "UniPCMultistepScheduler"],
    text_encoder=["transformers", "UMT5EncoderModel"],
    tokenizer=["transformers", "T5TokenizerFast"],
    transformer=["diffusers", "WanTransformer3DModel"],
    transformer_2=[None, None],
    vae=["diffusers", "AutoencoderKLWan"],
)


TINY_MODEL = Path(__file__).resolve().parent / "tiny"


def tiny_model_folder() -> Path:
    """The shipped, trained tiny shapes model (Hub Diffusers layout)."""
    if not (TINY_MODEL / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{TINY_MODEL} holds no checkpoint: the package was installed without its data files "
            "(reinstall it, or write one with tools/train_tiny.py)"
        )
    return TINY_MODEL


def cache_dir() -> Path:
    root = os.environ.get("DIT_RT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dit_rt"
    )
    return Path(root)


def checkpoint_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under checkpoint key names: fused projections split back into their sources."""
    from dit_rt.ops import Linear

    state = {}
    fused = {name for name, m in model.named_modules() if isinstance(m, Linear) and m.sources}
    for name, module in model.named_modules():
        if name in fused:
            parent = name.rpartition(".")[0]
            for param in ("weight", "bias"):
                t = getattr(module, param)
                if t is None:
                    continue
                for src, part in zip(module.sources, t.split(module.splits, dim=0)):
                    state[f"{parent}.{src}.{param}" if parent else f"{src}.{param}"] = part.contiguous()
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] not in fused:
            state[key] = t.contiguous()
    return state


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write CPU tensors as one safetensors file (the layout loaders/safetensors_io.py documents)."""
    from dit_rt.loaders.safetensors_io import DTYPES

    codes = {dtype: code for code, dtype in DTYPES.items()}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for key, t in state.items():
        t = t.detach().to("cpu").contiguous()
        blobs.append(ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()))
        header[key] = dict(
            dtype=codes[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + len(blobs[-1])]
        )
        offset += len(blobs[-1])
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the tensor data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for blob in blobs:
            f.write(blob)


def randomize(module: torch.nn.Module, seed: int, std: float = 0.2, norm_std: float = 0.1) -> torch.nn.Module:
    """Give every parameter of `module` non-trivial random values (zero-initialised gates and biases would
    hide bugs): 1-D norm scales (names holding "norm" or ending in "gamma") 1 + N(0, norm_std), everything
    else N(0, std), drawn in parameter order from one seeded generator. The tests' reference models too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name or name.endswith("gamma")):
                p.copy_(1.0 + norm_std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return module


def clip_bpe_vocab(words) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small CLIP BPE vocabulary laid out like openai/clip-vit-large-patch14's: the 256 byte-level
    characters, the same with `</w>`, merges spelling each of `words` left to right ("c a" -> "ca",
    "ca t</w>" -> "cat</w>"), then the two special tokens (ids last: `<|endoftext|>` is the largest id, as
    the pooling of FLUX.1's CLIP config needs). Returns (vocab, merges)."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    vocab, merges = chars + [c + "</w>" for c in chars], []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merge = (parts[0], parts[1])
            if merge not in merges:
                merges.append(merge)
            parts = [merge[0] + merge[1]] + parts[2:]
            if parts[0] not in vocab:
                vocab.append(parts[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def tokenizer_json(words: tuple[str, ...] = ()) -> str:
    """A small SentencePiece-style Unigram tokenizer as `tokenizer.json` text (T5 conventions: pad 0, eos 1,
    unk 2, `</s>` appended): the special pieces, "▁" + each of `words`, then single characters."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pieces = ["<pad>", "</s>", "<unk>", "▁"] + ["▁" + w for w in words]
    pieces += list(string.ascii_letters + string.digits + string.punctuation)
    vocab = [(p, 0.0 if i < 3 else -1.0 - 0.01 * i) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return tok.to_str()


def write_checkpoint(folder: Path, index: dict, components: dict[str, dict[str, object]]) -> Path:
    """Write a checkpoint in the Hub Diffusers layout into `folder`: `model_index.json` (`index`) and one
    subfolder per component holding its files, by file name: an nn.Module as safetensors of its
    `checkpoint_state`, a dict as JSON, a str as text. Returns folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, files in components.items():
        (folder / name).mkdir(exist_ok=True)
        for file, content in files.items():
            path = folder / name / file
            if isinstance(content, torch.nn.Module):
                save_safetensors(checkpoint_state(content), path)
            elif isinstance(content, dict):
                path.write_text(json.dumps(content, indent=2))
            else:
                path.write_text(content)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_tiny_wan(folder: Path, seed: int = 0) -> Path:
    """Write the tiny random Wan T2V checkpoint (Hub Diffusers layout) into `folder`."""
    from dit_rt.models.text import UMT5Config, UMT5Encoder
    from dit_rt.models.wan import WanTransformer, WanTransformerConfig, WanVAE, WanVAEConfig

    models = {
        "transformer": (WanTransformer(WanTransformerConfig.from_config(TRANSFORMER)), TRANSFORMER),
        "vae": (WanVAE(WanVAEConfig.from_config(VAE)), VAE),
        "text_encoder": (UMT5Encoder(UMT5Config.from_config(TEXT_ENCODER)), TEXT_ENCODER),
    }
    components: dict[str, dict[str, object]] = {}
    for i, (name, (model, config)) in enumerate(models.items()):
        weights = "model.safetensors" if name == "text_encoder" else "diffusion_pytorch_model.safetensors"
        model = randomize(model, seed + i, std=0.05, norm_std=0.05)
        components[name] = {weights: model, "config.json": config}
    components["scheduler"] = {"scheduler_config.json": SCHEDULER}
    components["tokenizer"] = {"tokenizer.json": tokenizer_json()}
    return write_checkpoint(folder, INDEX, components)


def tiny_wan_folder() -> Path:
    """The demo checkpoint, written on first use. A failed write leaves nothing behind: no half-written
    checkpoint and no cache folder that this call created."""
    target = cache_dir() / "demo" / "tiny-wan-t2v"
    if (target / "model_index.json").is_file():
        return target
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-wan-"))
    try:
        write_tiny_wan(tmp)
        tmp.rename(target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and (target / "model_index.json").is_file():
            return target  # a concurrent writer won the race
        for p in created:  # innermost first
            try:
                p.rmdir()
            except OSError:  # not empty: someone else put something there meanwhile
                break
        raise
    return target
