"""Tiny random FLUX.2 checkpoints in the Hub Diffusers layout, written by diffusers / transformers (tests).

The transformer, the VAE (8 latent channels instead of 32) and, for the whole pipeline, a
Mistral3ForConditionalGeneration whose text stack has 31 layers (Flux2Pipeline reads the hidden states after
layers 10, 20 and 30) with a small Unigram tokenizer carrying the Mistral-Small-3.1 chat template, saved as
diffusers' `Flux2Pipeline.save_pretrained` writes them. The real FLUX.2 tokenizer folder holds
PixtralProcessor files, which transformers cannot build here without torchvision; Flux2Pipeline only calls
`apply_chat_template`, so a tokenizer carrying the same template stands in for it.
"""

from __future__ import annotations

from pathlib import Path

from dit_rt.demo import randomize as _randomize

MISTRAL_HIDDEN = 16  # the tiny text stack's width: the transformer reads 3 x 16 features per token
LATENT_CHANNELS = 8  # the tiny VAE's latent channels; 2x2 patchified -> 32-wide tokens
FLUX2_TRANSFORMER = dict(
    patch_size=1,
    in_channels=4 * LATENT_CHANNELS,
    num_layers=2,  # two double blocks: First-Block Cache skips the stack after block 0
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=3 * MISTRAL_HIDDEN,
    timestep_guidance_channels=32,
    mlp_ratio=3.0,
    axes_dims_rope=(4, 4, 4, 4),
    rope_theta=2000,
    guidance_embeds=True,
)
FLUX2_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),  # four levels: 8x downsampling, as FLUX.2's
    layers_per_block=1,
    latent_channels=LATENT_CHANNELS,
    norm_num_groups=4,
    use_quant_conv=True,
    use_post_quant_conv=True,
    patch_size=(2, 2),
)


def make_flux2_transformer(seed: int = 21, **overrides):
    from diffusers import Flux2Transformer2DModel

    return _randomize(Flux2Transformer2DModel(**{**FLUX2_TRANSFORMER, **overrides}).eval(), seed)


def make_flux2_vae(seed: int = 22):
    """The VAE with random weights and random batch-norm statistics (the pipeline's latent normalizer)."""
    import torch
    from diffusers import AutoencoderKLFlux2

    vae = _randomize(AutoencoderKLFlux2(**FLUX2_VAE).eval(), seed, std=0.1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.3 * torch.randn(vae.bn.running_mean.shape, generator=g))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=g))
    return vae


def make_flux2_scheduler():
    """FLUX.2-dev's scheduler config (FLUX.1-dev's, copied by the conversion; mu comes from the pipeline)."""
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


# Mistral-Small-3.1's chat template (the FLUX.2 `tokenizer/` processor's), as transformers renders it.
MISTRAL_CHAT_TEMPLATE = (
    '{%- set today = strftime_now("%Y-%m-%d") %}'
    '{%- set default_system_message = "You are Mistral Small 3, a Large Language Model (LLM) created by '
    "Mistral AI, a French startup headquartered in Paris.\\nYour knowledge base was last updated on "
    '2023-10-01. The current date is " + today + "." %}'
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = default_system_message %}{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' }}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Only text and image blocks are supported in message content!') }}"
    "{%- endif %}{%- endfor %}{{- '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'system' %}"
    "{{- '[SYSTEM_PROMPT]' + (message['content'] if message['content'] is string else "
    "message['content'][0]['text']) + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- (message['content'] if message['content'] is string else message['content'][0]['text'])"
    " + eos_token }}"
    "{%- else %}{{- raise_exception('Only user, system and assistant roles are supported!') }}"
    "{%- endif %}{%- endfor %}"
)
# Whole words of Flux2Pipeline's system message and of the test prompts (others fall back to characters).
_TEXT = (
    "You are an AI that reasons about image descriptions. give structured responses focusing on object "
    "relationships, attribution and actions without speculation. a cat dog red photo baking cake on the"
)
WORDS = tuple(dict.fromkeys(_TEXT.split()))
SPECIAL = ("<s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]")
MISTRAL_TEXT = dict(
    model_type="mistral",
    hidden_size=MISTRAL_HIDDEN,
    intermediate_size=32,
    num_hidden_layers=31,  # Flux2Pipeline reads hidden_states[30]
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    rms_norm_eps=1e-5,
    rope_theta=1e9,
    max_position_embeddings=1024,
    sliding_window=None,
)
PIXTRAL_VISION = dict(
    model_type="pixtral",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    head_dim=8,
    image_size=32,
    patch_size=8,
)


def make_mistral_tokenizer():
    """A Unigram tokenizer with Mistral's special tokens and chat template, as a transformers tokenizer."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from dit_rt.demo import tokenizer_json

    tok = Tokenizer.from_str(tokenizer_json(WORDS))
    tok.add_special_tokens(list(SPECIAL))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = MISTRAL_CHAT_TEMPLATE
    return fast


def make_mistral3(vocab_size: int, seed: int = 23):
    """Mistral3ForConditionalGeneration with a 31-layer text stack and a one-layer Pixtral vision tower."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config=dict(MISTRAL_TEXT, vocab_size=vocab_size),
        vision_config=PIXTRAL_VISION,
        image_token_index=vocab_size - 1,  # [IMG], the last special token
    )
    return _randomize(Mistral3ForConditionalGeneration(config).eval(), seed)


def make_flux2(path: str | Path):
    """Write a tiny FLUX.2 pipeline (FLUX.2-dev's layout) into `path`; returns diffusers' Flux2Pipeline."""
    from diffusers import Flux2Pipeline

    tokenizer = make_mistral_tokenizer()
    pipe = Flux2Pipeline(
        scheduler=make_flux2_scheduler(),
        vae=make_flux2_vae(),
        text_encoder=make_mistral3(len(tokenizer)),
        tokenizer=tokenizer,
        transformer=make_flux2_transformer(),
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    return pipe
