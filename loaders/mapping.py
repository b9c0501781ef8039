"""Declarative checkpoint-key tables, one per source format.

A table is a tuple of (regex, replacement) rules, or (regex, replacement, transform) where the tensor
itself needs rewriting on the way in (transform: stored tensor -> the tensor the model holds, e.g.
`swap_halves`, or `conv1x1_as_linear` which also changes the shape: the loader checks shapes on meta).
For each checkpoint key the first rule whose regex matches (re.search) rewrites it with re.sub; a
replacement of None marks the key as deliberately ignored; a key no rule matches is kept as it is.
Tables map a source format to the Diffusers names, which are the dit_rt module names (the model's own
`ckpt_key_map` then handles what differs, and the loader fuses projections), or to a fused projection's
own name where the source stores it fused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch

Transform = Callable[[torch.Tensor], torch.Tensor]
KeyMap = tuple[tuple[str, str | None] | tuple[str, str | None, Transform], ...]


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """The two halves of dim 0 exchanged: a modulation stored (shift, scale) read as (scale, shift)."""
    a, b = t.chunk(2)
    return torch.cat([b, a])


# Diffusers layout: module names are the checkpoint keys, nothing to rewrite.
DIFFUSERS: KeyMap = ()

# The official Wan 2.1 / 2.2 single-file release (`Wan2.1-T2V-1.3B/diffusion_pytorch_model.safetensors`,
# sharded for 14B), optionally under ComfyUI's `model.diffusion_model.` prefix; spec wan-cosmos.md A.2.
# Original block norms are ordered norm1, norm3 (the affine cross-attention norm), norm2; Diffusers calls the
# affine one norm2, and norm1 / norm2-original carry no parameters.
_P = r"^(?:model\.diffusion_model\.)?"
_B = _P + r"blocks\.(\d+)\."
WAN_ORIGINAL: KeyMap = (
    (_P + r"time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (_P + r"time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (_P + r"time_projection\.1\.", "condition_embedder.time_proj."),
    (_P + r"text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (_P + r"text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (_P + r"img_emb\.proj\.0\.", "condition_embedder.image_embedder.norm1."),
    (_P + r"img_emb\.proj\.1\.", "condition_embedder.image_embedder.ff.net.0.proj."),
    (_P + r"img_emb\.proj\.3\.", "condition_embedder.image_embedder.ff.net.2."),
    (_P + r"img_emb\.proj\.4\.", "condition_embedder.image_embedder.norm2."),
    (_P + r"img_emb\.emb_pos$", "condition_embedder.image_embedder.pos_embed"),
    (_P + r"head\.modulation$", "scale_shift_table"),
    (_P + r"head\.head\.", "proj_out."),
    (_P + r"patch_embedding\.", "patch_embedding."),
    (_B + r"modulation$", r"blocks.\1.scale_shift_table"),
    (_B + r"self_attn\.q\.", r"blocks.\1.attn1.to_q."),
    (_B + r"self_attn\.k\.", r"blocks.\1.attn1.to_k."),
    (_B + r"self_attn\.v\.", r"blocks.\1.attn1.to_v."),
    (_B + r"self_attn\.o\.", r"blocks.\1.attn1.to_out.0."),
    (_B + r"self_attn\.norm_([qk])\.", r"blocks.\1.attn1.norm_\2."),
    (_B + r"cross_attn\.q\.", r"blocks.\1.attn2.to_q."),
    (_B + r"cross_attn\.k\.", r"blocks.\1.attn2.to_k."),
    (_B + r"cross_attn\.v\.", r"blocks.\1.attn2.to_v."),
    (_B + r"cross_attn\.o\.", r"blocks.\1.attn2.to_out.0."),
    (_B + r"cross_attn\.norm_([qk])\.", r"blocks.\1.attn2.norm_\2."),
    (_B + r"cross_attn\.k_img\.", r"blocks.\1.attn2.add_k_proj."),
    (_B + r"cross_attn\.v_img\.", r"blocks.\1.attn2.add_v_proj."),
    (_B + r"cross_attn\.norm_k_img\.", r"blocks.\1.attn2.norm_added_k."),
    (_B + r"norm3\.", r"blocks.\1.norm2."),
    (_B + r"ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
    (_B + r"ffn\.2\.", r"blocks.\1.ffn.net.2."),
)

# The Black Forest Labs single-file FLUX.1 release (`flux1-dev.safetensors`), optionally under ComfyUI's
# `model.diffusion_model.` prefix; spec flux-encoders-schedulers.md A.4. BFL stores the projections fused
# (`qkv`, a single block's `linear1` = q | k | v | mlp-in): they map whole onto dit_rt's fused Linears
# (`attn.to_qkv`, `attn.add_qkv`, `qkv_mlp`). The final modulation is stored (shift, scale); diffusers reads
# (scale, shift).
_D = _P + r"double_blocks\.(\d+)\."
_S = _P + r"single_blocks\.(\d+)\."
FLUX_ORIGINAL: KeyMap = (
    (_P + r"img_in\.", "x_embedder."),
    (_P + r"txt_in\.", "context_embedder."),
    (_P + r"time_in\.in_layer\.", "time_text_embed.timestep_embedder.linear_1."),
    (_P + r"time_in\.out_layer\.", "time_text_embed.timestep_embedder.linear_2."),
    (_P + r"guidance_in\.in_layer\.", "time_text_embed.guidance_embedder.linear_1."),
    (_P + r"guidance_in\.out_layer\.", "time_text_embed.guidance_embedder.linear_2."),
    (_P + r"vector_in\.in_layer\.", "time_text_embed.text_embedder.linear_1."),
    (_P + r"vector_in\.out_layer\.", "time_text_embed.text_embedder.linear_2."),
    (_D + r"img_mod\.lin\.", r"transformer_blocks.\1.norm1.linear."),
    (_D + r"txt_mod\.lin\.", r"transformer_blocks.\1.norm1_context.linear."),
    (_D + r"img_attn\.qkv\.", r"transformer_blocks.\1.attn.to_qkv."),
    (_D + r"txt_attn\.qkv\.", r"transformer_blocks.\1.attn.add_qkv."),
    (_D + r"img_attn\.norm\.query_norm\.scale$", r"transformer_blocks.\1.attn.norm_q.weight"),
    (_D + r"img_attn\.norm\.key_norm\.scale$", r"transformer_blocks.\1.attn.norm_k.weight"),
    (_D + r"txt_attn\.norm\.query_norm\.scale$", r"transformer_blocks.\1.attn.norm_added_q.weight"),
    (_D + r"txt_attn\.norm\.key_norm\.scale$", r"transformer_blocks.\1.attn.norm_added_k.weight"),
    (_D + r"img_attn\.proj\.", r"transformer_blocks.\1.attn.to_out.0."),
    (_D + r"txt_attn\.proj\.", r"transformer_blocks.\1.attn.to_add_out."),
    (_D + r"img_mlp\.0\.", r"transformer_blocks.\1.ff.net.0.proj."),
    (_D + r"img_mlp\.2\.", r"transformer_blocks.\1.ff.net.2."),
    (_D + r"txt_mlp\.0\.", r"transformer_blocks.\1.ff_context.net.0.proj."),
    (_D + r"txt_mlp\.2\.", r"transformer_blocks.\1.ff_context.net.2."),
    (_S + r"modulation\.lin\.", r"single_transformer_blocks.\1.norm.linear."),
    (_S + r"linear1\.", r"single_transformer_blocks.\1.qkv_mlp."),
    (_S + r"linear2\.", r"single_transformer_blocks.\1.proj_out."),
    (_S + r"norm\.query_norm\.scale$", r"single_transformer_blocks.\1.attn.norm_q.weight"),
    (_S + r"norm\.key_norm\.scale$", r"single_transformer_blocks.\1.attn.norm_k.weight"),
    (_P + r"final_layer\.linear\.", "proj_out."),
    (_P + r"final_layer\.adaLN_modulation\.1\.", "norm_out.linear.", swap_halves),
)


def conv1x1_as_linear(t: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv weight [out, in, 1, 1] as the Linear weight [out, in] it equals; biases pass unchanged."""
    return t.flatten(1) if t.ndim > 2 else t


# The Black Forest Labs / LDM autoencoder (`ae.safetensors` of FLUX.1) -> diffusers `AutoencoderKL` names;
# spec flux-encoders-schedulers.md A.8.5. The decoder's `up` levels count from the output side, diffusers'
# `up_blocks` from the latent side: level k is up_blocks.(3 - k) for FLUX.1's four levels. The mid-block
# attention's q/k/v/proj_out are 1x1 convs there, Linears in diffusers.
_VAE_LEVELS = 4
_MID = r"^(encoder|decoder)\.mid\."
FLUX_VAE_ORIGINAL: KeyMap = (
    (_MID + r"block_1\.", r"\1.mid_block.resnets.0."),
    (_MID + r"block_2\.", r"\1.mid_block.resnets.1."),
    (_MID + r"attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (_MID + r"attn_1\.([qkv])\.", r"\1.mid_block.attentions.0.to_\2.", conv1x1_as_linear),
    (_MID + r"attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0.", conv1x1_as_linear),
    (
        r"^encoder\.down\.(\d+)\.block\.(\d+)\.nin_shortcut\.",
        r"encoder.down_blocks.\1.resnets.\2.conv_shortcut.",
    ),
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^encoder\.down\.(\d+)\.downsample\.conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv."),
    *(
        rule
        for k in range(_VAE_LEVELS)
        for rule in (
            (
                rf"^decoder\.up\.{k}\.block\.(\d+)\.nin_shortcut\.",
                rf"decoder.up_blocks.{_VAE_LEVELS - 1 - k}.resnets.\1.conv_shortcut.",
            ),
            (rf"^decoder\.up\.{k}\.block\.(\d+)\.", rf"decoder.up_blocks.{_VAE_LEVELS - 1 - k}.resnets.\1."),
            (
                rf"^decoder\.up\.{k}\.upsample\.conv\.",
                f"decoder.up_blocks.{_VAE_LEVELS - 1 - k}.upsamplers.0.conv.",
            ),
        )
    ),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
)

FORMATS: dict[str, KeyMap] = {
    "diffusers": DIFFUSERS,
    "wan-original": WAN_ORIGINAL,
    "flux-original": FLUX_ORIGINAL,
    "flux-vae-original": FLUX_VAE_ORIGINAL,
}

Rule = tuple[re.Pattern, str | None, Transform | None]


def compile_map(table: KeyMap | str | None) -> list[Rule]:
    """A table (or the name of one in FORMATS) as compiled rules (pattern, replacement, transform)."""
    if isinstance(table, str):
        if table not in FORMATS:
            raise ValueError(f"unknown checkpoint format {table!r}; known: {', '.join(FORMATS)}")
        table = FORMATS[table]
    return [(re.compile(rule[0]), rule[1], rule[2] if len(rule) > 2 else None) for rule in (table or ())]


def map_key_transform(rules: list[Rule], key: str) -> tuple[str | None, Transform | None]:
    """(`map_key(rules, key)`, the matching rule's tensor transform or None)."""
    for pattern, repl, fn in rules:
        if pattern.search(key):
            return (None, None) if repl is None else (pattern.sub(repl, key), fn)
    return key, None


def map_key(rules: list[Rule], key: str) -> str | None:
    """The key rewritten by the first matching rule; None if that rule ignores it; unchanged if none match."""
    return map_key_transform(rules, key)[0]


def detect_format(keys: Iterable[str]) -> str:
    """'wan-original' / 'flux-original' / 'flux-vae-original' if the keys look like the official Wan / BFL
    FLUX.1 transformer / BFL autoencoder release, else 'diffusers'."""
    keys = set(keys)
    if any(re.search(r"(^|\.)blocks\.\d+\.self_attn\.q\.weight$", k) for k in keys):
        return "wan-original"
    if any(re.search(r"(^|\.)double_blocks\.\d+\.img_attn\.qkv\.weight$", k) for k in keys):
        return "flux-original"
    if any(re.search(r"^encoder\.down\.\d+\.block\.\d+\.conv1\.weight$", k) for k in keys):
        return "flux-vae-original"
    return "diffusers"
