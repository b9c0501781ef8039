"""Declarative checkpoint-key tables, one per source format.

A table is a tuple of (regex, replacement) rules. For each checkpoint key the first rule whose regex matches
(re.search) rewrites it with re.sub; a replacement of None marks the key as deliberately ignored; a key no
rule matches is kept as it is. Tables map a source format to the Diffusers names, which are the dit_rt module
names (the model's own `ckpt_key_map` then handles what differs, and the loader fuses projections).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

KeyMap = tuple[tuple[str, str | None], ...]

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

FORMATS: dict[str, KeyMap] = {"diffusers": DIFFUSERS, "wan-original": WAN_ORIGINAL}


def compile_map(table: KeyMap | str | None) -> list[tuple[re.Pattern, str | None]]:
    """A table (or the name of one in FORMATS) as compiled rules."""
    if isinstance(table, str):
        if table not in FORMATS:
            raise ValueError(f"unknown checkpoint format {table!r}; known: {', '.join(FORMATS)}")
        table = FORMATS[table]
    return [(re.compile(pattern), repl) for pattern, repl in (table or ())]


def map_key(rules: list[tuple[re.Pattern, str | None]], key: str) -> str | None:
    """The key rewritten by the first matching rule; None if that rule ignores it; unchanged if none match."""
    for pattern, repl in rules:
        if pattern.search(key):
            return None if repl is None else pattern.sub(repl, key)
    return key


def detect_format(keys: Iterable[str]) -> str:
    """'wan-original' if the keys look like the official Wan release, else 'diffusers'."""
    keys = set(keys)
    if any(re.search(r"(^|\.)blocks\.\d+\.self_attn\.q\.weight$", k) for k in keys):
        return "wan-original"
    return "diffusers"
