"""What a user feels: the whole `generate` of dit_rt next to the alternatives a user would pick, same GPU,
same checkpoint, same latents, and every run's frames against one float32 reference run.

    python tools/bench_e2e.py --model wan2.1-t2v-1.3b --steps 8 --out /tmp/e2e.json
    python tools/bench_e2e.py --model wan2.1-t2v-1.3b --steps 8 --runs ref          # later calls add runs
    python tools/bench_e2e.py --model wan2.1-i2v-14b-480p --steps 8 --frames 33
    python tools/bench_e2e.py --model flux.1-dev --steps 8 --runs ref                # FLUX.1: 1024x1024

1. A full-size random checkpoint in the Hub Diffusers layout is written once into `--workdir` (every
   component at its real configuration, written by the reference classes themselves; a small tokenizer).
2. Each run loads the pipeline (load time reported apart), warms up with one short `generate` (compilation,
   CUDA-graph capture), then times the whole `generate` (text encoding, every step with CFG, VAE decode,
   frames to the host) once per seed, from the same latents. Its frames are stored per seed.
3. The table compares every run's frames with the float32 run's (`ref`) of the same seed: relative L2 and
   PSNR, averaged over the seeds (>= 3: with random weights, one seed cannot tell a real precision gap from
   chaos over the steps), and each run's error over diffusers bf16's, seed by seed (mean and range). Each
   seed has its own prompt as well as its own latents, so that the seeds also sample the text encoder's
   error (`PROMPTS`). Runs accumulate in the work folder across invocations, so a long list can be split
   over several calls; the table and the JSON cover every run present.

Runs (`--runs`, comma separated; default: all that can run here):
  ref                 diffusers, everything float32 (the reference; TF32 off)
  diffusers           diffusers bf16, VAE (and Wan I2V's CLIP) float32 (Wan model cards; FLUX.1: all bf16)
  diffusers-compile   + `transformer.compile_repeated_blocks(fullgraph=True)`
  diffusers-fp8       + torchao float8 dynamic activation / weight, rowwise scales, + regional compile
  cache-dit           diffusers bf16 + cache-dit's DBCache (approximate: skips computation): its defaults,
                      or at <= 8 steps (its default warm-up is 8 steps) its own few-step recipe; it computes
                      the first 8 blocks, so it refuses models of <= 8 blocks such as --tiny's
  exact               dit_rt bf16, attention fa3 (sdpa off the GPU)
  exact-graphs        + compile=True, cuda_graphs=True
  fast                dit_rt fp8-per-tensor linears + fa3-fp8 attention + compile + CUDA graphs
`--diagnose` adds, per component (text encoder, one transformer forward, VAE decode), the error of dit_rt's
and diffusers' bf16 outputs against float32 on identical inputs: where a run rounds where the other does not.
`--tiny` uses the demo's tiny configurations (CPU smoke test of this script). On the CPU every run is float32
unless `--cpu-bf16`: then diffusers and dit_rt run in bf16 beside the float32 `ref`, a check on the CPU of
where a pipeline rounds (the kernels differ from the GPU's, the pipeline code does not).
New families add a `Family` entry (builder, diffusers pipeline class, latent shape).
FLUX.1 (`--model flux.1-dev`): text-to-image; the latents are FluxPipeline's packed tokens
[1, (H/16)(W/16), 64], the guidance is the embedded one (one transformer pass per step, no negative prompt),
and the image comes out as a one-frame clip (T = 1) so that the error columns are the same. `--diagnose`
covers Wan and the T5 Cosmos families (Predict2, 1.0).
Cosmos (`--model cosmos-predict2-2b-text2image`, `...-video2world` (the test picture conditions), the 14B
ones, `cosmos-1.0-diffusion-7b-text2world`): the DiT at its real configuration, the T5-11B encoder, the Wan
2.1 VAE or the Cosmos tokenizer, written without a safety checker component. diffusers' Cosmos pipelines
refuse to run without NVIDIA's guardrail, so its runs get a pass-through stand-in; where that path rounds
the frames to 8 bits (Predict2, 1.0) dit_rt's frames take the same rounding before they are compared.
diffusers' Cosmos DiT imports torchvision. Real sizes are long (a guided 704x1280x93 step of the 2B model is
~7 s in diffusers): `--steps`, `--frames` and `--runs` keep a call short. Predict2.5 (`cosmos-
predict2.5-2b`, Image2World from the test picture) has the Qwen2.5-VL-7B text stack at its real size.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling tools when imported by the tests

from bench_wan import VAE as WAN_VAE  # noqa: E402
from bench_wan import _hub_config, randomize_  # noqa: E402

# One prompt per seed (seed % 6): every seed then samples the text encoder's bf16 error too. With one prompt
# shared by all seeds that error is the same in every seed, and with random weights it is the largest in the
# pipeline (UMT5-XXL in bf16 is ~0.7 off float32), so the seeds agreed to 3 digits and could not tell a
# precision gap from where that one error happened to land (2026-12-06, BENCHMARKS.md).
PROMPTS = (
    "a cat and a dog baking a cake in a sunny kitchen",
    "a red sailboat crossing a stormy sea at dusk",
    "an old man playing chess in a quiet park",
    "a city street at night with neon signs and rain",
    "a robot arm stacking wooden blocks on a table",
    "snow falling on a mountain village in winter",
)
PROMPT = PROMPTS[0]  # the prompt of --diagnose


def prompt_of(seed: int) -> str:
    return PROMPTS[seed % len(PROMPTS)]


# The generator of each call beside the given latents: what else a pipeline draws (Cosmos Video2World's
# posterior sample of the conditioning frames), alike on both sides (dit_rt's `seed=` draws as diffusers'
# CPU generator does).
SAMPLE_SEED = 7
UMT5_XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
)
T5_V11_XXL = dict(  # FLUX.1's text_encoder_2 (spec C.2)
    UMT5_XXL, vocab_size=32128, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0
)
CLIP_VIT_L_TEXT = dict(  # FLUX.1's text_encoder: the CLIP ViT-L/14 text tower (spec C.5)
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    bos_token_id=0,  # the legacy ids of FLUX.1's config: the pooled row is the argmax of the ids
    eos_token_id=2,
    pad_token_id=1,
)
FLUX_TRANSFORMER = dict(  # FLUX.1-dev transformer/config.json (spec A.2)
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)
FLUX_VAE = dict(  # FLUX.1 vae/config.json (spec A.8.1)
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    act_fn="silu",
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
    sample_size=1024,
    force_upcast=True,
)
FLUX_SCHEDULER = dict(  # FLUX.1-dev scheduler_config.json: the shift follows the image token count
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
T5_11B = dict(  # Cosmos' text encoder: google-t5/t5-11b's encoder (ReLU FFN, one relative-bias table)
    UMT5_XXL, vocab_size=32128, d_model=1024, d_kv=128, d_ff=65536, num_heads=128, feed_forward_proj="relu",
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)  # fmt: skip
QWEN25_VL_7B_TEXT = dict(  # Cosmos-Predict2.5's text stack: Cosmos-Reason1-7B = Qwen2.5-VL-7B's shape
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    rope_parameters=dict(rope_type="default", mrope_section=[16, 24, 24], rope_theta=1e6),
)
QWEN25_VL_7B_VISION = dict(  # never run for text prompts, but part of the checkpoint diffusers loads
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=3584,
    fullatt_block_indexes=[7, 15, 23, 31],
)
# Qwen2.5-VL's chat template for text-only messages (the pipeline gives a system message: no default one).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
COSMOS25_SCHEDULER = dict(  # Predict2.5: UniPC on Karras flow sigmas 200 -> 0.01
    use_karras_sigmas=True,
    use_flow_sigmas=True,
    prediction_type="flow_prediction",
    sigma_max=200.0,
    sigma_min=0.01,
)
COSMOS1_SCHEDULER = dict(  # Cosmos-1.0-Diffusion-7B-Text2World scheduler_config.json (EDMEulerScheduler)
    sigma_min=0.002,
    sigma_max=80.0,
    sigma_data=0.5,
    sigma_schedule="karras",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    rho=7.0,
    final_sigmas_type="sigma_min",
)
CLIP_VIT_H = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=1024,
)


# ---------------------------------------------------------------------------------------------- checkpoint


def small_tokenizer():
    """The demo's small Unigram tokenizer, wrapped so that both transformers and dit_rt load it."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from dit_rt.demo import tokenizer_json

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json()),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def small_clip_tokenizer():
    """A small CLIP BPE tokenizer spelling the prompts' words (dit_rt.demo.clip_bpe_vocab)."""
    from transformers import CLIPTokenizer

    from dit_rt.demo import clip_bpe_vocab

    vocab, merges = clip_bpe_vocab(sorted({w for p in PROMPTS for w in p.split()}))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def small_qwen_tokenizer(words: tuple[str, ...] = ()):
    """The demo's small Unigram tokenizer (`words`: its vocabulary) with Qwen's chat markers and pad token,
    and the chat template: what Predict2.5's pipeline calls `apply_chat_template` on."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from dit_rt.demo import tokenizer_json

    spec = json.loads(tokenizer_json(words))
    spec["post_processor"] = None  # chat-templated text is tokenized without added special tokens
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<unk>"
    )
    out.chat_template = QWEN_CHAT_TEMPLATE
    return out


def qwen25_vl(text: dict, vision: dict, seed: int):
    """A random Qwen2.5-VL (text stack + vision tower) of the given shapes."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, bos_token_id=0, eos_token_id=1)
    return randomize_(Qwen2_5_VLForConditionalGeneration(config), seed)


def small_t5_tokenizer():
    """`small_tokenizer` as the T5TokenizerFast of FLUX.1's tokenizer_2 (pad 0, eos 1)."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(
        tokenizer_object=small_tokenizer()._tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


@dataclasses.dataclass(frozen=True)
class Family:
    pipeline: str  # the diffusers pipeline class
    build: Callable[[Path, str, bool, torch.device], None]  # (folder, alias, tiny, device)
    latent_shape: Callable[[int, int, int], tuple[int, ...]]  # (height, width, frames) -> one item's shape
    image: bool = False  # image-conditioned: a test picture goes with every call
    still: bool = False  # one image per call (no num_frames, `.images` -> T = 1)
    vae: str | None = "AutoencoderKLWan"  # the VAE class diffusers' bf16 runs load in float32 (None: bf16)
    negative: bool = True  # takes a negative prompt (FLUX.1's guidance is embedded: none)
    guardrail: bool = False  # Cosmos: diffusers runs only with a safety checker (a stand-in here)
    eight_bit: bool = False  # ... whose path rounds the frames to 8 bits (Predict2, 1.0; not Predict2.5's)


def _wan_latents(h: int, w: int, f: int) -> tuple[int, ...]:
    return (1, 16, (f - 1) // 4 + 1, h // 8, w // 8)


def build_wan(folder: Path, alias: str, tiny: bool, device: torch.device) -> None:
    """A Wan T2V / I2V pipeline at its real configuration (or the demo's tiny one), random weights,
    saved by diffusers' `save_pretrained` (transformer / text encoder bf16, VAE / image encoder fp32)."""
    import diffusers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        UMT5Config,
        UMT5EncoderModel,
    )

    from dit_rt import demo

    i2v = "i2v" in alias
    if tiny:
        transformer = {k: v for k, v in demo.TRANSFORMER.items() if k != "_class_name"}
        vae = {k: v for k, v in demo.VAE.items() if k != "_class_name"}
        text = {k: v for k, v in demo.TEXT_ENCODER.items() if k not in ("architectures", "model_type")}
        clip = dict(
            CLIP_VIT_H, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
        )
        if i2v:
            dim = transformer["num_attention_heads"] * transformer["attention_head_dim"]
            transformer |= dict(in_channels=36, image_dim=clip["hidden_size"], added_kv_proj_dim=dim)
    else:
        preset = "wan2.1-i2v-14b" if i2v else alias
        transformer, vae, text, clip = _hub_config(preset), dict(WAN_VAE), dict(UMT5_XXL), dict(CLIP_VIT_H)
    bf16 = torch.float32 if tiny else torch.bfloat16
    with torch.device(device), default_dtype(bf16):  # built in bf16: a 14B model built in fp32 and cast
        parts = dict(  # would need 84 GB at once
            transformer=randomize_(diffusers.WanTransformer3DModel(**transformer), 1),
            text_encoder=randomize_(UMT5EncoderModel(UMT5Config(**text)), 3),
        )
    with torch.device(device):
        parts["vae"] = randomize_(diffusers.AutoencoderKLWan(**vae), 2)
        if i2v:
            parts["image_encoder"] = randomize_(CLIPVisionModel(CLIPVisionConfig(**clip)), 4)
            parts["image_processor"] = CLIPImageProcessor(
                size={"shortest_edge": clip["image_size"]},
                crop_size={"height": clip["image_size"], "width": clip["image_size"]},
            )
    scheduler = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    cls = diffusers.WanImageToVideoPipeline if i2v else diffusers.WanPipeline
    cls(tokenizer=small_tokenizer(), scheduler=scheduler, **parts).save_pretrained(
        str(folder), safe_serialization=True
    )


def _flux_latents(h: int, w: int, f: int) -> tuple[int, ...]:
    """FluxPipeline's packed latents: one 64-wide token per 2x2 patch of the [16, H/8, W/8] VAE latent."""
    return (1, (h // 16) * (w // 16), 64)


def build_flux(folder: Path, alias: str, tiny: bool, device: torch.device) -> None:
    """A FLUX.1-dev pipeline at its real configuration (or tiny), random weights, saved by diffusers'
    `save_pretrained`, every component bf16 as on the Hub (tiny: fp32); small CLIP and T5 tokenizers."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    transformer, vae, clip, t5 = (
        dict(FLUX_TRANSFORMER),
        dict(FLUX_VAE),
        dict(CLIP_VIT_L_TEXT),
        dict(T5_V11_XXL),
    )
    if alias.endswith("schnell"):
        transformer["guidance_embeds"] = False
    if tiny:  # the tests' tiny FLUX.1 (tests/tiny_checkpoints.py), written here so tools need no tests/
        heads, head_dim = 2, 16
        transformer |= dict(
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=32,
            pooled_projection_dim=24,
            axes_dims_rope=[4, 6, 6],
        )
        vae |= dict(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4)
        clip |= dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)
        clip |= dict(projection_dim=24)
        t5 |= dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    clip_tokenizer = small_clip_tokenizer()
    if tiny:
        clip["vocab_size"] = len(clip_tokenizer)
    bf16 = torch.float32 if tiny else torch.bfloat16
    with torch.device(device), default_dtype(bf16):  # built in their storage dtype (see build_wan)
        parts = dict(
            transformer=randomize_(diffusers.FluxTransformer2DModel(**transformer), 1),
            vae=randomize_(diffusers.AutoencoderKL(**vae), 2),
            text_encoder=randomize_(CLIPTextModel(CLIPTextConfig(**clip)), 3),
            text_encoder_2=randomize_(T5EncoderModel(T5Config(**t5)), 4),
        )
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    pipe = diffusers.FluxPipeline(
        scheduler=scheduler, tokenizer=clip_tokenizer, tokenizer_2=small_t5_tokenizer(), **parts
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)


def pass_through_safety_checker():
    """A stand-in for NVIDIA's guardrail (a separate package diffusers' Cosmos pipelines will not run
    without): it passes every prompt and returns every frame unchanged, as diffusers' own tests do."""
    from diffusers import ConfigMixin, ModelMixin

    class PassThroughSafetyChecker(ModelMixin, ConfigMixin):
        def __init__(self):
            super().__init__()
            # Something to report a device and dtype from: diffusers asks every component for them.
            self.register_buffer("_anchor", torch.zeros(1), persistent=False)

        def check_text_safety(self, prompt: str) -> bool:
            return True

        def check_video_safety(self, frames):
            return frames

    return PassThroughSafetyChecker()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Modules built inside take `dtype` for their parameters."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def _cosmos_model(alias: str) -> str:
    """bench_cosmos' name of a catalog alias (its DiT preset, the size and VAE it runs at)."""
    import bench_cosmos

    return next(name for name, m in bench_cosmos.MODELS.items() if m.preset == alias)


def build_cosmos(folder: Path, alias: str, tiny: bool, device: torch.device) -> None:
    """A Cosmos-Predict2 Text2Image / Video2World, Predict2.5 or Cosmos-1.0 Text2World pipeline at its real
    configuration (or bench_cosmos' tiny one), random weights, saved by diffusers' `save_pretrained` in
    bf16 as on the Hub (tiny: fp32): the DiT, the T5-11B encoder (Predict2.5: Qwen2.5-VL-7B), the Wan 2.1
    VAE (1.0: the Cosmos tokenizer); no safety checker component (dit_rt runs none, diffusers gets a
    stand-in)."""
    import bench_cosmos
    import diffusers
    from transformers import T5Config, T5EncoderModel

    name = _cosmos_model(alias)
    transformer = bench_cosmos.hub_config(name, tiny)
    dtype = torch.float32 if tiny else torch.bfloat16
    qwen = transformer["use_crossattn_projection"]  # Predict2.5: the Qwen2.5-VL stack, not T5-11B
    tokenizer = small_qwen_tokenizer() if qwen else small_t5_tokenizer()
    # The DiT and the text encoder are built in their storage dtype: a 14B DiT built in float32 and then
    # cast would need 84 GB at once.
    with torch.device(device), default_dtype(dtype):
        parts = dict(transformer=randomize_(diffusers.CosmosTransformer3DModel(**transformer), 1))
        if qwen:
            text, vision = dict(QWEN25_VL_7B_TEXT), dict(QWEN25_VL_7B_VISION)
            if tiny:  # 2 layers x 24 = the tiny DiT's crossattn_proj_in_channels (48)
                text |= dict(vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48)
                text |= dict(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
                text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=[2, 2, 2])
                vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=24)
                vision["fullatt_block_indexes"] = [0]
            parts["text_encoder"] = qwen25_vl(text, vision, 3)
        else:
            t5 = dict(T5_11B)
            if tiny:
                t5 |= dict(vocab_size=128, d_model=transformer["text_embed_dim"], d_kv=16, d_ff=64)
                t5 |= dict(num_layers=2, num_heads=4)
            parts["text_encoder"] = randomize_(T5EncoderModel(T5Config(**t5)), 3)
    with torch.device(device):
        if bench_cosmos.MODELS[name].vae == "cosmos":
            vae = bench_cosmos.TINY_COSMOS_VAE if tiny else {}
            parts["vae"] = randomize_(diffusers.AutoencoderKLCosmos(**vae), 2).to(dtype)
            parts["scheduler"] = diffusers.EDMEulerScheduler(**COSMOS1_SCHEDULER)
        else:
            vae = bench_cosmos.TINY_WAN_VAE if tiny else WAN_VAE
            parts["vae"] = randomize_(diffusers.AutoencoderKLWan(**vae), 2)  # float32, as on the Hub
            if qwen:
                parts["scheduler"] = diffusers.UniPCMultistepScheduler(**COSMOS25_SCHEDULER)
            else:
                parts["scheduler"] = diffusers.FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True)
    cls = getattr(diffusers, family_of(alias).pipeline)
    pipe = cls(tokenizer=tokenizer, safety_checker=pass_through_safety_checker(), **parts)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    # No safety checker component: the Hub repos name NVIDIA's package there, which diffusers would import
    # even with a stand-in passed to `from_pretrained`; each diffusers run passes the stand-in instead.
    shutil.rmtree(folder / "safety_checker", ignore_errors=True)
    index = json.loads((folder / "model_index.json").read_text())
    del index["safety_checker"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def _cosmos1_latents(h: int, w: int, f: int) -> tuple[int, ...]:
    return (1, 16, (f - 1) // 8 + 1, h // 8, w // 8)  # the Cosmos tokenizer: 8x in time


PREDICT2 = dict(guardrail=True, eight_bit=True)  # and Cosmos-1.0
FAMILIES = {
    "wan-t2v": Family("WanPipeline", build_wan, _wan_latents),
    "wan-i2v": Family("WanImageToVideoPipeline", build_wan, _wan_latents, image=True),
    "flux-t2i": Family("FluxPipeline", build_flux, _flux_latents, still=True, vae=None, negative=False),
    "cosmos-t2i": Family(
        "Cosmos2TextToImagePipeline", build_cosmos, _wan_latents, still=True, vae=None, **PREDICT2
    ),
    "cosmos-v2w": Family(
        "Cosmos2VideoToWorldPipeline", build_cosmos, _wan_latents, image=True, vae=None, **PREDICT2
    ),
    "cosmos-t2w": Family("CosmosTextToWorldPipeline", build_cosmos, _cosmos1_latents, vae=None, **PREDICT2),
}
# Catalog entries whose family-task key above would pick the wrong pipeline.
BY_ALIAS = {
    "cosmos-predict2.5-2b": Family(
        "Cosmos2_5_PredictBasePipeline", build_cosmos, _wan_latents, image=True, vae=None, guardrail=True
    ),
}


def family_of(alias: str) -> Family:
    from dit_rt.catalog import lookup

    entry = lookup(alias)
    if entry is None or not entry.implemented:
        raise SystemExit(f"--model {alias}: not an implemented catalog alias (`dit-rt models`)")
    key = f"{entry.family}-{entry.task}"
    if entry.alias in BY_ALIAS:
        return BY_ALIAS[entry.alias]
    if key not in FAMILIES:
        raise SystemExit(f"--model {alias}: bench_e2e has no builder for {key} yet")
    return FAMILIES[key]


def test_image(height: int, width: int):
    """A deterministic picture (colour gradients and a disc) for image-conditioned runs."""
    from PIL import Image

    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    disc = (((x - 0.5) ** 2 + (y - 0.5) ** 2) < 0.05).float()
    rgb = torch.stack([x, y, 0.5 * (1 - x) + 0.5 * disc], dim=-1)
    return Image.fromarray((rgb * 255).round().to(torch.uint8).numpy())


# ---------------------------------------------------------------------------------------------- runs


@dataclasses.dataclass
class Job:
    folder: Path
    family: Family
    device: torch.device
    height: int
    width: int
    frames: int
    steps: int
    guidance: float
    seeds: list[int]
    negative: str
    bf16: bool = False  # the runs in bf16 off the GPU too (--cpu-bf16)

    def latents(self, seed: int) -> torch.Tensor:
        shape = self.family.latent_shape(self.height, self.width, self.frames)
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def common(self) -> dict:
        kw = dict(height=self.height, width=self.width, guidance_scale=self.guidance)
        if not self.family.still:  # FLUX: one image, the guidance embedded in the transformer's input
            kw["num_frames"] = self.frames
        if self.family.image:
            kw["image"] = test_image(self.height, self.width)
        return kw


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def diffusers_pipe(job: Job, name: str):
    import diffusers

    fp32 = name == "ref" or (job.device.type != "cuda" and not job.bf16)
    dtype = torch.float32 if fp32 else torch.bfloat16
    cls = getattr(diffusers, job.family.pipeline)
    extra = {}
    if job.family.vae:  # Wan: the VAE in float32 beside a bf16 pipeline
        vae_cls = getattr(diffusers, job.family.vae)
        extra["vae"] = vae_cls.from_pretrained(job.folder / "vae", torch_dtype=torch.float32)
        if (job.folder / "image_encoder").is_dir():  # Wan 2.1 I2V: CLIP in float32 too, as its model card
            from transformers import CLIPVisionModel

            path = job.folder / "image_encoder"
            extra["image_encoder"] = CLIPVisionModel.from_pretrained(path, torch_dtype=torch.float32)
    if job.family.guardrail:  # the Hub's entry names NVIDIA's package: a pass-through checker stands in
        extra["safety_checker"] = pass_through_safety_checker()
    pipe = cls.from_pretrained(job.folder, torch_dtype=dtype, **extra).to(job.device)
    pipe.set_progress_bar_config(disable=True)
    if name == "diffusers-fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        # activation_value_lb: torchao's rowwise scale is the row's amax / 448 with no floor, so an all-zero
        # row (Wan's text states are zero past the prompt) quantizes as 0 / 0 = NaN: the 2026-12-06 H100 run
        # without it gave NaN frames on every seed. A floor leaves every other row's scale as it is.
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), activation_value_lb=1e-12)
        bf16 = lambda m, fqn: isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.bfloat16  # noqa: E731
        quantize_(pipe.transformer, config, filter_fn=bf16)  # not the fp32-kept time embedder
    if name in ("diffusers-compile", "diffusers-fp8"):
        compile_blocks(pipe.transformer)
    if name == "cache-dit":
        import cache_dit

        cache_dit.enable_cache(pipe, cache_config=cache_dit_config(cache_dit, job.steps))

    negative = dict(negative_prompt=job.negative) if job.family.negative else {}

    def generate(latents: torch.Tensor, steps: int, prompt: str) -> torch.Tensor:
        if job.family.still:
            out = pipe(
                prompt=prompt,
                **negative,
                latents=latents.to(job.device),
                num_inference_steps=steps,
                output_type="pt",
                generator=torch.Generator().manual_seed(SAMPLE_SEED),
                **job.common(),
            ).images  # [B, C, H, W] in [0, 1]
            return out[0].permute(1, 2, 0).unsqueeze(0).float().cpu()  # one frame: [1, H, W, C]
        out = pipe(
            prompt=prompt,
            **negative,
            latents=latents.to(job.device),
            num_inference_steps=steps,
            output_type="pt",
            generator=torch.Generator().manual_seed(SAMPLE_SEED),
            **job.common(),
        ).frames  # [B, T, C, H, W] in [0, 1]
        return out[0].permute(0, 2, 3, 1).float().cpu()

    return pipe, generate


def cache_dit_config(cache_dit, steps: int):
    """cache-dit's default DBCache, or at <= 8 steps, where its default warm-up of 8 steps would cache
    nothing, cache-dit's own few-step recipe (its examples' 8-step Qwen-Image-Lightning settings: 4 warm-up
    steps, at most 2 cached steps and never two in a row, residual threshold 0.5), keeping its default of
    computing the first 8 blocks."""
    if steps > 8:
        return cache_dit.DBCacheConfig()
    return cache_dit.DBCacheConfig(
        max_warmup_steps=4 if steps > 4 else 2,
        max_cached_steps=2 if steps > 4 else 1,
        max_continuous_cached_steps=1,
        residual_diff_threshold=0.5 if steps > 4 else 0.8,
    )


def compile_blocks(transformer) -> None:
    """diffusers' regional compile: `compile_repeated_blocks`, or where the model names no repeated blocks
    (Cosmos) the same by hand on its `_no_split_modules` blocks."""
    if getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(fullgraph=True)
        return
    kinds = set(transformer._no_split_modules or ())
    blocks = [m for m in transformer.modules() if type(m).__name__ in kinds]
    if not blocks:
        raise RuntimeError(f"{type(transformer).__name__}: no repeated blocks to compile")
    for block in blocks:
        block.compile(fullgraph=True)


def eight_bit(frames: torch.Tensor) -> torch.Tensor:
    """Frames in [0, 1] through the 8-bit round trip of diffusers' Cosmos safety-checker path (clamp,
    x 255, truncate to uint8, / 255), so that dit_rt's frames are compared with diffusers' like for like."""
    return (frames.clamp(0, 1) * 255).to(torch.uint8).float() / 255


DIT_RT_RUNS = {
    "exact": dict(attention="fa3"),
    "exact-graphs": dict(attention="fa3", compile=True, cuda_graphs=True),
    "fast": dict(linear="fp8-per-tensor", attention="fa3-fp8", compile=True, cuda_graphs=True),
}


def dit_rt_pipe(job: Job, name: str):
    import dit_rt

    opts = dict(DIT_RT_RUNS[name])
    if job.device.type != "cuda":  # the CPU smoke test: the same path with what runs there
        opts = dict(attention="sdpa", dtype=torch.bfloat16 if job.bf16 else torch.float32)
    pipe = dit_rt.load(str(job.folder), device=job.device, **opts)

    def generate(latents: torch.Tensor, steps: int, prompt: str) -> torch.Tensor:
        out = pipe.generate(
            prompt,
            job.negative if job.family.negative else None,
            latents=latents,
            num_inference_steps=steps,
            seed=SAMPLE_SEED,
            progress_bar=False,
            **job.common(),
        )
        generate.timings = out.timings  # the phases of the latest call (text, steps, decode)
        return eight_bit(out.frames[0]) if job.family.eight_bit else out.frames[0]

    return pipe, generate


RUNS = {
    "ref": diffusers_pipe,
    "diffusers": diffusers_pipe,
    "diffusers-compile": diffusers_pipe,
    "diffusers-fp8": diffusers_pipe,
    "cache-dit": diffusers_pipe,
    **{name: dit_rt_pipe for name in DIT_RT_RUNS},
}


def run(job: Job, name: str, results: Path) -> dict:
    """Load, warm up, time one generate per seed; store the frames of each seed beside the result."""
    # float32 means float32 in the reference (no TF32 in matmuls or convolutions); the others keep
    # PyTorch's defaults, as a user has them.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = name != "ref"
    _release(job.device)
    _sync(job.device)
    t0 = time.perf_counter()
    pipe, generate = RUNS[name](job, name)
    _sync(job.device)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if name != "ref":  # compile / capture / lazy setup; the reference is not timed against anything
        generate(job.latents(job.seeds[0] + 1000), min(2, job.steps), prompt_of(job.seeds[0] + 1))
    _sync(job.device)
    warmup_s = time.perf_counter() - t0
    times, phases = [], []
    for seed in job.seeds:
        latents = job.latents(seed)
        _sync(job.device)
        t0 = time.perf_counter()
        frames = generate(latents, job.steps, prompt_of(seed))
        _sync(job.device)
        times.append(time.perf_counter() - t0)
        phases.append(getattr(generate, "timings", None))
        torch.save(frames.contiguous(), results / f"{name}.seed{seed}.pt")
    peak = torch.cuda.max_memory_allocated(job.device) / 2**30 if job.device.type == "cuda" else None
    record = dict(
        run=name,
        load_s=load_s,
        warmup_s=warmup_s,
        times_s=times,
        median_s=statistics.median(times),
        # dit_rt's runs: median seconds of each phase of generate (text encoding, steps, decode)
        phases_s={k: statistics.median(p[k] for p in phases) for k in phases[0]} if phases[0] else None,
        peak_gib=peak,
        seeds=job.seeds,
    )
    (results / f"{name}.json").write_text(json.dumps(record, indent=1))
    del pipe, generate
    _release(job.device)
    split = record["phases_s"]
    split = " (" + ", ".join(f"{k} {v:.2f}" for k, v in split.items()) + ")" if split else ""
    print(
        f"{name}: load {load_s:.1f} s, warm-up {warmup_s:.1f} s, generate {record['median_s']:.2f} s{split}"
    )
    return record


def frame_errors(frames: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative L2, PSNR in dB) of frames in [0, 1] against the reference's."""
    diff = frames.double() - ref.double()
    mse = diff.pow(2).mean().item()
    psnr = math.inf if mse == 0 else 10 * math.log10(1 / mse)
    return (diff.norm() / ref.double().norm()).item(), psnr


def table(results: Path, order: list[str]) -> list[dict]:
    """Every stored run with its errors against `ref`, seed by seed averaged; printed as a table. Where the
    diffusers bf16 run is stored too, each run's error is also divided by diffusers' seed by seed: the mean
    of those ratios and their range over the seeds (a range that straddles 1 is no evidence of a gap)."""
    rows = []
    records = {p.stem: json.loads(p.read_text()) for p in results.glob("*.json")}
    base = records.get("diffusers")
    for name in sorted(records, key=lambda n: order.index(n) if n in order else len(order)):
        r = records[name]
        errs = {}
        for seed in r["seeds"]:
            ref, mine = results / f"ref.seed{seed}.pt", results / f"{name}.seed{seed}.pt"
            if name != "ref" and ref.is_file() and mine.is_file():
                errs[seed] = frame_errors(torch.load(mine), torch.load(ref))
        r["rel_l2"] = statistics.mean(e[0] for e in errs.values()) if errs else None
        r["rel_l2_per_seed"] = [e[0] for e in errs.values()]
        r["psnr_db"] = statistics.mean(e[1] for e in errs.values()) if errs else None
        r["speedup_vs_diffusers"] = base["median_s"] / r["median_s"] if base else None
        r["_errs"] = errs
        rows.append(r)
    base_errs = next((r["_errs"] for r in rows if r["run"] == "diffusers"), {})
    for r in rows:
        ratios = [e[0] / base_errs[s][0] for s, e in r.pop("_errs").items() if base_errs.get(s, (0,))[0] > 0]
        r["rel_l2_vs_diffusers"] = statistics.mean(ratios) if ratios else None
        r["rel_l2_vs_diffusers_range"] = [min(ratios), max(ratios)] if ratios else None
    head = ("run", "load s", "generate s", "vs diffusers", "rel L2 vs fp32", "PSNR dB", "err / diffusers'")
    print("\n{:18} {:>7} {:>10} {:>12} {:>15} {:>8} {:>24}".format(*head))
    for r in rows:
        speed = f"{r['speedup_vs_diffusers']:.2f}x" if r["speedup_vs_diffusers"] else "-"
        err = f"{r['rel_l2']:.3e}" if r["rel_l2"] is not None else "-"
        psnr = f"{r['psnr_db']:.2f}" if r["psnr_db"] is not None else "-"
        ratio = "-"
        if r["rel_l2_vs_diffusers"] is not None:
            lo, hi = r["rel_l2_vs_diffusers_range"]
            ratio = f"{r['rel_l2_vs_diffusers']:.3f} [{lo:.3f}, {hi:.3f}]"
        cells = f"{r['run']:18} {r['load_s']:7.1f} {r['median_s']:10.2f} {speed:>12}"
        print(f"{cells} {err:>15} {psnr:>8} {ratio:>24}")
    return rows


# ---------------------------------------------------------------------------------------------- diagnose


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def diagnose(job: Job) -> dict:
    """Error against float32 of each component's bf16 output, dit_rt and diffusers, on identical inputs:
    text encoder (the prompt and the negative prompt), one transformer forward (the seed's latents, the
    float32 text embedding of the prompt), VAE decode (those latents). Wan and the T5 Cosmos families
    (Predict2 Text2Image / Video2World, 1.0)."""
    import diffusers

    import dit_rt

    pipeline = job.family.pipeline
    cosmos = pipeline.startswith("Cosmos")
    if not (pipeline.startswith("Wan") or cosmos) or pipeline.startswith("Cosmos2_5"):
        raise SystemExit(
            "--diagnose: Wan and the T5 Cosmos families only "
            "(FLUX.1, Predict2.5: bench_flux.py, bench_cosmos.py)"
        )
    out = {}
    cls = getattr(diffusers, pipeline)
    latents = job.latents(job.seeds[0]).to(job.device)
    prompts = dict(prompt=PROMPT, negative=job.negative)
    encode = dict(do_classifier_free_guidance=False, max_sequence_length=512, device=job.device)
    if cosmos:  # the first step's flow time, the padding mask every Cosmos pipeline passes (zeros)
        t = torch.tensor([0.5], device=job.device)
        kw = dict(padding_mask=latents.new_zeros(1, 1, job.height, job.width))
        if job.family.image:  # Video2World: the first latent frame conditions
            mask = latents.new_zeros(1, 1, *latents.shape[2:])
            mask[:, :, :1] = 1
            kw |= dict(condition_mask=mask, fps=16)
        elif not job.family.still:  # Cosmos-1.0 Text2World
            kw["fps"] = 16
    else:
        t = torch.tensor([999.0], device=job.device)
        kw = {}
    x = latents
    if job.family.image and not cosmos:  # Wan I2V: mask + condition channels
        x = torch.cat([latents, latents.new_zeros(1, 20, *latents.shape[2:])], 1)

    def reference(dtype, cond=None):
        """Text embeddings, one transformer forward and a decode by diffusers loaded in `dtype`."""
        extra = dict(safety_checker=pass_through_safety_checker()) if job.family.guardrail else {}
        pipe = cls.from_pretrained(job.folder, torch_dtype=dtype, **extra).to(job.device)
        emb = {k: pipe.encode_prompt(p, **encode)[0] for k, p in prompts.items()}
        args = {k: v.to(dtype) if v.is_floating_point() else v for k, v in kw.items() if torch.is_tensor(v)}
        args |= {k: v for k, v in kw.items() if not torch.is_tensor(v)}
        if job.family.image and not cosmos:
            g = torch.Generator().manual_seed(0)
            image = torch.randn(1, 257, pipe.transformer.config.image_dim, generator=g)
            args["encoder_hidden_states_image"] = image.to(job.device, dtype)
        with torch.no_grad():
            cond = (emb["prompt"] if cond is None else cond).to(dtype)  # the float32 embedding for both
            timestep = t.to(dtype) if cosmos else t
            noise = pipe.transformer(x.to(dtype), timestep, cond, return_dict=False, **args)[0]
            if cosmos:  # raw latents into the decoder: the normalization is the pipelines' arithmetic
                video = pipe.vae.decode(latents.to(dtype), return_dict=False)[0]
            else:
                c = pipe.vae.config
                mean = torch.tensor(c.latents_mean, device=job.device).view(1, -1, 1, 1, 1)
                std = torch.tensor(c.latents_std, device=job.device).view(1, -1, 1, 1, 1)
                video = pipe.vae.decode((latents * std + mean).to(dtype), return_dict=False)[0]
        del pipe
        _release(job.device)
        return emb, noise, video, args.get("encoder_hidden_states_image")

    emb32, noise32, video32, image32 = reference(torch.float32)
    emb16, noise16, video16, _ = reference(torch.bfloat16, emb32["prompt"])
    for k in prompts:
        out[f"text encoder ({k}): diffusers bf16"] = _rel(emb16[k], emb32[k])
    out["transformer: diffusers bf16"] = _rel(noise16, noise32)
    out["vae decode: diffusers bf16"] = _rel(video16, video32)

    attention = "fa3" if job.device.type == "cuda" else "sdpa"
    # the VAE in bf16 too: this compares components at one dtype (the pipelines' VAE dtype is a choice apart)
    pipe = dit_rt.load(
        str(job.folder), device=job.device, dtype=torch.bfloat16, vae_dtype="bfloat16", attention=attention
    )
    with torch.no_grad():
        for k, p in prompts.items():
            out[f"text encoder ({k}): dit_rt bf16"] = _rel(pipe.encode_prompt([p]), emb32[k])
        cond = emb32["prompt"].bfloat16()
        if cosmos:
            args = {k: v.bfloat16() if torch.is_tensor(v) else v for k, v in kw.items()}
            noise = pipe.transformers[0](x.bfloat16(), t.bfloat16(), cond, **args)
            video = pipe.vae.decode(latents.bfloat16())
        else:
            image = None if image32 is None else image32.bfloat16()
            noise = pipe.transformers[0](x.bfloat16(), t, cond, image)
            video = pipe.vae.decode(pipe.vae.denormalize_latents(latents.bfloat16()))
        out["transformer: dit_rt bf16"] = _rel(noise, noise32)
        out["vae decode: dit_rt bf16"] = _rel(video, video32)
    print("\nerror against float32, same inputs:")
    for k, v in out.items():
        print(f"  {k:40} {v:.3e}")
    return out


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="wan2.1-t2v-1.3b", help="catalog alias (its real configuration)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seeds", default="0,1,2", help="latent seeds; errors are averaged over them")
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated run names (see above)")
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--workdir", default="/tmp/dit_rt_e2e", help="checkpoint and per-run results")
    ap.add_argument("--out", help="write the table as JSON here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny configurations (CPU smoke test)")
    ap.add_argument("--diagnose", action="store_true", help="per-component bf16 error against float32")
    ap.add_argument("--cpu-bf16", action="store_true", help="off the GPU: the runs in bf16 (not float32)")
    a = ap.parse_args(argv)

    from dit_rt.catalog import lookup

    family = family_of(a.model)
    names = [n for n in a.runs.split(",") if n]
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        raise SystemExit(f"--runs: unknown {unknown}; known: {', '.join(RUNS)}")
    d = lookup(a.model).defaults
    device = torch.device(a.device)
    work = Path(a.workdir) / (a.model + ("-tiny" if a.tiny else ""))
    folder, results = work / "checkpoint", work / f"results-{a.steps}steps"
    results.mkdir(parents=True, exist_ok=True)
    if not (folder / "model_index.json").is_file():
        t0 = time.perf_counter()
        family.build(folder, a.model, a.tiny, device)
        _release(device)
        print(f"checkpoint written in {time.perf_counter() - t0:.1f} s: {folder}")
    job = Job(
        folder,
        family,
        device,
        a.height or (64 if a.tiny else d.height),
        a.width or (96 if a.tiny else d.width),
        1 if family.still else a.frames or (9 if a.tiny else d.num_frames),
        a.steps,
        d.guidance_scale if a.guidance is None else a.guidance,
        [int(s) for s in a.seeds.split(",")],
        d.negative_prompt,
        a.cpu_bf16,
    )
    if device.type == "cuda":  # the CUDA context and library handles: process start-up, not loading
        torch.ones(64, 64, device=device) @ torch.ones(64, 64, device=device)
        _sync(device)
    for name in names:
        try:
            run(job, name, results)
        except Exception as e:  # an alternative that cannot run this model (cache-dit, torchao) loses its row
            print(f"{name}: failed, no row: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            _release(device)
    diag = diagnose(job) if a.diagnose else None
    rows = table(results, list(RUNS))
    if a.out:
        env = dict(
            model=a.model,
            steps=a.steps,
            size=[job.height, job.width, job.frames],
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            torch=torch.__version__,
            date=time.strftime("%Y-%m-%d"),
        )
        Path(a.out).write_text(json.dumps(dict(env=env, runs=rows, diagnose=diag), indent=1))
    return rows


if __name__ == "__main__":
    main()
