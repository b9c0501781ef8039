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
