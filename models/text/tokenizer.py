"""T5/UMT5 tokenizer from the Hub `tokenizer/tokenizer.json` (the `tokenizers` library, no transformers),
the Wan prompt cleaning, and Wan's text-embedding recipe.

Prompt cleaning differs from diffusers' `prompt_clean` in one respect: diffusers first runs `ftfy.fix_text`
when ftfy happens to be installed. ftfy is not a dependency here, so mojibake ("cafÃ©") and other broken
Unicode pass through unrepaired; well-formed text (the normal case) cleans identically.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer


def prompt_clean(text: str) -> str:
    """Wan prompt cleaning: HTML-unescape twice, strip, collapse whitespace runs to one space."""
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class T5Tokenizer:
    """Encodes prompts as the Hub T5TokenizerFast does with `padding="max_length", truncation=True`.

    The end-of-sequence `</s>` comes from tokenizer.json's post-processor; truncation keeps room for it.
    """

    def __init__(self, tokenizer: Tokenizer, pad_token: str = "<pad>", padding_side: str = "right"):
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"tokenizer has no pad token {pad_token!r}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side {padding_side!r}: expected 'right' or 'left'")
        self.tokenizer, self.pad_token, self.pad_id, self.padding_side = (
            tokenizer,
            pad_token,
            pad_id,
            padding_side,
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> T5Tokenizer:
        """Load `folder/tokenizer.json`, taking pad token and side from `tokenizer_config.json` if present."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: dit_rt needs the fast-tokenizer file (tokenizer.json)"
            )
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text())
        pad = config.get("pad_token", "<pad>")
        pad = pad["content"] if isinstance(pad, dict) else pad  # older configs store an AddedToken dict
        return cls(Tokenizer.from_file(str(path)), pad, config.get("padding_side", "right"))

    def encode(self, prompts: list[str], max_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input_ids [B, max_length] int64, attention_mask [B, max_length] int64 (1 = token)."""
        tok = self.tokenizer
        tok.enable_truncation(max_length)
        tok.enable_padding(
            direction=self.padding_side, pad_id=self.pad_id, pad_token=self.pad_token, length=max_length
        )
        encodings = tok.encode_batch(list(prompts), add_special_tokens=True)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask


@torch.no_grad()
def wan_text_embeddings(
    encoder: torch.nn.Module,
    tokenizer: T5Tokenizer,
    prompts: str | list[str],
    max_length: int = 512,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Wan's prompt embeddings: [B, max_length, d_model], rows past each prompt's length set to zero.

    Prompts are cleaned, tokenized (padded to max_length, `</s>` appended) and encoded with the padding
    mask; then only each prompt's real tokens are kept, as WanPipeline._get_t5_prompt_embeds does.
    The encoder only sees the longest prompt's tokens: with the padding keys masked, the real rows do not
    depend on how many padding columns follow, and the rows past the length are zeroed anyway, so a short
    prompt costs a short forward instead of a 512-token one.
    """
    if tokenizer.padding_side != "right":
        raise ValueError("wan_text_embeddings needs a right-padding tokenizer (real tokens first)")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids, mask = tokenizer.encode([prompt_clean(p) for p in prompts], max_length)
    lens = mask.sum(dim=1)  # [B] real tokens incl. </s>
    n = int(lens.max())
    param = next(encoder.parameters())
    hidden = encoder(ids[:, :n].to(param.device), mask[:, :n].to(param.device))  # [B, n, d_model]
    out = hidden.new_zeros(len(prompts), max_length, hidden.shape[-1])
    keep = torch.arange(n, device=hidden.device)[None, :] < lens.to(hidden.device)[:, None]  # [B, n]
    out[:, :n] = torch.where(keep[..., None], hidden, 0.0)
    return out.to(device=device or hidden.device, dtype=dtype or hidden.dtype)
