"""Tiny random checkpoints in the Hub Diffusers layout, written by the reference implementations.

Every model test builds a tiny configuration of the diffusers / transformers class, saves it exactly as
`save_pretrained` does on the Hub (`model_index.json` + component folders), then loads the same folder
with dit_rt, so both sides run identical weights. Test-only: imports diffusers and transformers.
"""

from __future__ import annotations

from pathlib import Path

from dit_rt.demo import randomize as _randomize
from dit_rt.demo import tokenizer_json

TEXT_DIM = 32  # UMT5 d_model of the tiny text encoder
WAN_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=16,
    out_channels=16,
    text_dim=TEXT_DIM,
    freq_dim=32,
    ffn_dim=48,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)
WAN_VAE = dict(
    base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]
)
UMT5 = dict(
    d_model=TEXT_DIM,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
)


def make_tokenizer():
    """The demo's small Unigram tokenizer with a few whole words, as a transformers tokenizer."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    words = ("a", "the", "cat", "dog", "and", "of", "in", "on", "with", "baking", "cake")
    tok = Tokenizer.from_str(tokenizer_json(words))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def make_umt5(seed: int = 1):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=128, **UMT5)
    return _randomize(UMT5EncoderModel(config).eval(), seed)


def make_wan_transformer(seed: int = 2, **overrides):
    from diffusers import WanTransformer3DModel

    return _randomize(WanTransformer3DModel(**{**WAN_TRANSFORMER, **overrides}).eval(), seed)


def make_wan_vae(seed: int = 3):
    from diffusers import AutoencoderKLWan

    return _randomize(AutoencoderKLWan(**WAN_VAE).eval(), seed, std=0.1)


def make_unipc(flow_shift: float = 3.0):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=flow_shift,
    )


def make_wan_t2v(path: str | Path, *, two_experts: bool = False, boundary_ratio: float = 0.875):
    """Write a tiny Wan text-to-video pipeline (Wan2.1 layout; Wan2.2 A14B layout with `two_experts`)."""
    from diffusers import WanPipeline

    pipe = WanPipeline(
        tokenizer=make_tokenizer(),
        text_encoder=make_umt5(),
        vae=make_wan_vae(),
        scheduler=make_unipc(),
        transformer=make_wan_transformer(seed=2),
        transformer_2=make_wan_transformer(seed=4) if two_experts else None,
        boundary_ratio=boundary_ratio if two_experts else None,
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    return pipe


CLIP_VISION = dict(
    hidden_size=24,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=28,
    patch_size=7,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=16,
)


def make_wan_i2v(path: str | Path, *, wan22: bool = False):
    """Write a tiny Wan image-to-video pipeline: Wan2.1 I2V (CLIP image tokens) or Wan2.2 I2V A14B layout
    (two experts, no image encoder), both with the 36-channel transformer input."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    dim = WAN_TRANSFORMER["num_attention_heads"] * WAN_TRANSFORMER["attention_head_dim"]
    clip = dict(image_dim=CLIP_VISION["hidden_size"], added_kv_proj_dim=dim)
    kw = dict(in_channels=36) | ({} if wan22 else clip)
    encoder = processor = None
    if not wan22:
        encoder = _randomize(CLIPVisionModel(CLIPVisionConfig(**CLIP_VISION)).eval(), 5)
        processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    pipe = WanImageToVideoPipeline(
        tokenizer=make_tokenizer(),
        text_encoder=make_umt5(),
        vae=make_wan_vae(),
        scheduler=make_unipc(),
        transformer=make_wan_transformer(seed=6, **kw),
        transformer_2=make_wan_transformer(seed=7, **kw) if wan22 else None,
        image_encoder=encoder,
        image_processor=processor,
        boundary_ratio=0.9 if wan22 else None,
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    return pipe


# ------------------------------------------------------------------------------------------------ FLUX.1

FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels x 2x2 packing
    num_layers=2,  # two double blocks: First-Block Cache skips the stack after block 0
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=TEXT_DIM,  # the T5 width
    pooled_projection_dim=24,  # the CLIP width
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
FLUX_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),  # four levels: 8x downsampling, as FLUX.1's
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=4,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
CLIP_TEXT = dict(
    hidden_size=24,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=24,
    # FLUX.1's CLIP config keeps the legacy ids (eos 2): the pooled row is then the argmax of the ids, which
    # is `<|endoftext|>`, the largest id (as in the real vocabulary).
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
CLIP_WORDS = ("a", "the", "cat", "dog", "and", "of", "in", "on", "with", "baking", "cake", "red", "photo")


def make_clip_tokenizer():
    """A small CLIP BPE tokenizer laid out like openai/clip-vit-large-patch14's (demo.clip_bpe_vocab)."""
    from transformers import CLIPTokenizer

    from dit_rt.demo import clip_bpe_vocab

    vocab, merges = clip_bpe_vocab(CLIP_WORDS)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def make_clip_text(vocab_size: int, seed: int = 11):
    from transformers import CLIPTextConfig, CLIPTextModel

    return _randomize(CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, **CLIP_TEXT)).eval(), seed)


def make_t5(seed: int = 12):
    """A T5 v1.1 encoder (one relative-attention bias table, in layer 0) of the UMT5 test's size."""
    from transformers import T5Config, T5EncoderModel

    return _randomize(T5EncoderModel(T5Config(vocab_size=128, **UMT5)).eval(), seed)


def make_t5_tokenizer():
    from transformers import T5TokenizerFast

    base = make_tokenizer()
    return T5TokenizerFast(
        tokenizer_object=base._tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def make_flux_transformer(seed: int = 13, **overrides):
    from diffusers import FluxTransformer2DModel

    return _randomize(FluxTransformer2DModel(**{**FLUX_TRANSFORMER, **overrides}).eval(), seed)


def make_flux_vae(seed: int = 14):
    from diffusers import AutoencoderKL

    return _randomize(AutoencoderKL(**FLUX_VAE).eval(), seed, std=0.1)


def make_flow_euler():
    """FLUX.1-dev's scheduler config (dynamic shifting from the image token count)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def make_flux(path: str | Path):
    """Write a tiny FLUX.1 text-to-image pipeline (FLUX.1-dev's layout: CLIP + T5 encoders, the 16-channel
    AutoencoderKL, guidance-embedding transformer, dynamic-shift flow-match Euler)."""
    from diffusers import FluxPipeline

    clip_tokenizer = make_clip_tokenizer()
    pipe = FluxPipeline(
        scheduler=make_flow_euler(),
        vae=make_flux_vae(),
        text_encoder=make_clip_text(len(clip_tokenizer)),
        tokenizer=clip_tokenizer,
        text_encoder_2=make_t5(),
        tokenizer_2=make_t5_tokenizer(),
        transformer=make_flux_transformer(),
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    return pipe
