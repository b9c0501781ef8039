"""Tokenizers with the `tokenizers` library only (no transformers): T5/UMT5 from the Hub
`tokenizer.json`, CLIP from `tokenizer.json` or, as FLUX.1-dev ships it, `vocab.json` + `merges.txt`;
the Wan prompt cleaning, and Wan's text-embedding recipe.

Prompt cleaning: diffusers (and Wan's own T5 wrapper) run `ftfy.fix_text` first. Its fixes of well-formed
text change what the model sees and are re-done here without ftfy (`fix_text`): full-width and half-width
forms to standard width (Wan's own default negative prompt is written with full-width commas, "，" -> ","),
curly quotes to straight ones, Latin ligatures split, terminal escapes and stray control characters
removed, NFC. Not re-done: ftfy's mojibake repair ("cafÃ©" -> "café"; C1 controls decoded as cp1252),
which guesses at broken encodings; such text passes through unrepaired.
"""

from __future__ import annotations

import html
import html.entities
import json
import logging
import re
import unicodedata
from pathlib import Path
from typing import ClassVar

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

log = logging.getLogger("dit_rt")


_LIGATURE_PAIRS = (
    "Ĳ=IJ ĳ=ij ŉ=ʼn Ǳ=DZ ǲ=Dz ǳ=dz Ǆ=DŽ ǅ=Dž ǆ=dž Ǉ=LJ ǈ=Lj ǉ=lj Ǌ=NJ ǋ=Nj ǌ=nj "
    "ﬀ=ff ﬁ=fi ﬂ=fl ﬃ=ffi ﬄ=ffl ﬅ=ſt ﬆ=st"
)


def _width_map() -> dict[int, str]:
    """Half-width and full-width forms (U+FF01..U+FFEF) -> their NFKC standard-width characters, and the
    ideographic space U+3000 -> a space: ftfy's `fix_character_width`."""
    table = {0x3000: " "}
    for i in range(0xFF01, 0xFFF0):
        if (standard := unicodedata.normalize("NFKC", chr(i))) != chr(i):
            table[i] = standard
    return table


# Latin ligatures and legacy digraphs -> their letters (ftfy's `fix_latin_ligatures`).
_LIGATURES = {ord(k): v for k, v in (pair.split("=") for pair in _LIGATURE_PAIRS.split(" "))}
_CONTROL = dict.fromkeys([*range(0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF])
_CONTROL |= dict.fromkeys(range(0xFFF9, 0xFFFD))
_WIDTH = _width_map()
_SINGLE_QUOTES, _DOUBLE_QUOTES = re.compile("[\u02bc\u2018-\u201b]"), re.compile("[\u201c-\u201f]")
_LINE_BREAKS = re.compile("\r\n|[\r\u2028\u2029\x85]")
_TERMINAL_ESCAPES = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")


def _html_entities() -> dict[str, str]:
    """HTML5 entities that end in ";", and all-caps forms of the lower-case ones that are not entities
    themselves ("&EACUTE;" -> "É"): what ftfy's `unescape_html` decodes."""
    table = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            table["&" + name] = char
            upper = "&" + name.upper()
            if name == name.lower() and html.unescape(upper) == upper:
                table[upper] = char.upper()
    return table


_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_ENTITIES = _html_entities()


def _unescape_entity(match: re.Match) -> str:
    text = match.group(0)
    if text in _ENTITIES:
        return _ENTITIES[text]
    if text.startswith("&#") and ";" not in (char := html.unescape(text)):
        return char
    return text


def fix_text(text: str) -> str:
    """ftfy.fix_text's repairs of well-formed text, in its order, line by line, each line until nothing
    changes; HTML entities are decoded until a line holds a "<" (see the module docstring for what is
    left out)."""
    out, unescape = [], True
    for line in re.findall(r"[^\n]*\n|[^\n]+", text):  # lines as ftfy cuts them: at "\n" only
        unescape = unescape and "<" not in line
        while True:
            before = line
            line = _ENTITY.sub(_unescape_entity, line) if unescape else line
            line = line.translate(_LIGATURES).translate(_WIDTH)
            line = _SINGLE_QUOTES.sub("'", _DOUBLE_QUOTES.sub('"', line))
            line = _LINE_BREAKS.sub("\n", line)
            line = _TERMINAL_ESCAPES.sub("", line).translate(_CONTROL)
            line = unicodedata.normalize("NFC", line)
            if line == before:
                break
        out.append(line)
    return "".join(out)


def prompt_clean(text: str) -> str:
    """Wan prompt cleaning: `fix_text`, HTML-unescape twice, strip, collapse whitespace runs to one space."""
    text = html.unescape(html.unescape(fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class _PaddedTokenizer:
    """A `tokenizers.Tokenizer` called as transformers calls it with `padding="max_length",
    truncation=True`: the special tokens come from the tokenizer's post-processor (unless a subclass renders
    them into its `texts`), and truncation keeps room for them."""

    default_max_length: ClassVar[int]
    default_pad_token: ClassVar[str]
    special_tokens: ClassVar[bool] = True  # added by the post-processor
    counted: ClassVar[str] = ""  # what the token count of the truncation warning includes beside the prompt

    def __init__(
        self,
        tokenizer: Tokenizer,
        pad_token: str | None = None,
        padding_side: str = "right",
        truncation_side: str = "right",
    ):
        pad_token = pad_token or self.default_pad_token
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"tokenizer has no pad token {pad_token!r}")
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("right", "left"):
                raise ValueError(f"{name} {side!r}: expected 'right' or 'left'")
        self.tokenizer, self.pad_token, self.pad_id = tokenizer, pad_token, pad_id
        self.padding_side, self.truncation_side = padding_side, truncation_side

    @classmethod
    def from_folder(cls, folder: str | Path):
        """Load `folder/tokenizer.json`; the pad token and the padding / truncation sides from
        `tokenizer_config.json` if present."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: dit_rt needs the fast-tokenizer file (tokenizer.json)"
            )
        config = _read_json(folder / "tokenizer_config.json")
        return cls(
            Tokenizer.from_file(str(path)),
            _token_text(config.get("pad_token")),
            config.get("padding_side", "right"),
            config.get("truncation_side", "right"),
        )

    def texts(self, prompts: list[str]) -> list[str]:
        """What is tokenized for the prompts (a chat template renders them)."""
        return list(prompts)

    def encode(self, prompts: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input_ids [B, max_length] int64, attention_mask [B, max_length] int64 (1 = token).

        max_length defaults to the class's `default_max_length` (T5: 512, CLIP: 77)."""
        max_length = max_length or self.default_max_length
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tok, texts, special = self.tokenizer, self.texts(prompts), self.special_tokens
        tok.enable_truncation(max_length, direction=self.truncation_side)
        tok.enable_padding(
            direction=self.padding_side, pad_id=self.pad_id, pad_token=self.pad_token, length=max_length
        )
        encodings = tok.encode_batch(texts, add_special_tokens=special)
        cut = [i for i, e in enumerate(encodings) if e.overflowing]
        if cut:  # said once per call, as diffusers does: a silently ignored end of a prompt misleads
            tok.no_truncation()
            tok.no_padding()
            lengths = {i: len(tok.encode(texts[i], add_special_tokens=special).ids) for i in cut}
            which = (lambda i: "the prompt") if len(prompts) == 1 else (lambda i: f"prompt {i}")
            log.warning(
                "%s (the text encoder reads max_sequence_length=%d tokens%s)",
                "; ".join(
                    f"{which(i)} has {n} tokens, the last {n - max_length} dropped"
                    for i, n in lengths.items()
                ),
                max_length,
                self.counted,
            )
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value) -> str | None:
    return value["content"] if isinstance(value, dict) else value  # older configs store AddedToken dicts


class T5Tokenizer(_PaddedTokenizer):
    """Encodes prompts as the Hub T5TokenizerFast does with `padding="max_length", truncation=True`.

    The end-of-sequence `</s>` comes from tokenizer.json's post-processor; truncation keeps room for it.
    """

    default_max_length = 512
    default_pad_token = "<pad>"

    # The tokenizer classes for which transformers 5 (the reference) builds the pre-tokenizer itself, whatever
    # tokenizer.json holds: whitespace runs split words and vanish (leading, trailing and repeated spaces,
    # tabs, newlines), then Metaspace. Under a file's plain Metaspace (what transformers keeps for a generic
    # fast tokenizer) a trailing space is a "▁" token of its own and a tab an unknown one.
    whitespace_split_classes: ClassVar[tuple[str, ...]] = ("T5Tokenizer", "T5TokenizerFast")

    @classmethod
    def from_folder(cls, folder: str | Path) -> T5Tokenizer:
        out = super().from_folder(folder)
        if (
            _read_json(Path(folder) / "tokenizer_config.json").get("tokenizer_class")
            in cls.whitespace_split_classes
        ):
            out.tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.WhitespaceSplit(),
                    pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
                ]
            )
        return out


# CLIP's pre-tokenizer split (what the original `clip.simple_tokenizer` regex keeps): the special tokens,
# English contractions, letter runs, single digits, runs of other non-space symbols.
_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def build_clip_tokenizer(vocab: str | Path, merges: str | Path, *, bos: str, eos: str, unk: str) -> Tokenizer:
    """CLIP's byte-level BPE from `vocab.json` + `merges.txt`, as transformers' CLIPTokenizer builds it.

    Text is NFC-normalised, whitespace runs become one space, then lowercased; words are split by
    `_CLIP_SPLIT`, mapped to byte-level characters, and BPE-merged with "</w>" marking the end of a word;
    the post-processor wraps the ids as `bos ... eos`.
    """
    bpe = BPE.from_file(
        str(vocab), str(merges), continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=unk
    )
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    ids = {t: bpe.token_to_id(t) for t in (bos, eos)}
    if None in ids.values():
        raise ValueError(f"{vocab}: the special tokens {bos!r} / {eos!r} are not in the vocabulary")
    # Matched in the raw text before the split, so a prompt that spells one out gets its id.
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=True) for t in dict.fromkeys((bos, eos, unk))]
    )
    tok.post_processor = processors.RobertaProcessing(
        (eos, ids[eos]), (bos, ids[bos]), trim_offsets=False, add_prefix_space=False
    )
    return tok


class CLIPTokenizer(_PaddedTokenizer):
    """Encodes prompts as transformers' CLIPTokenizer does with `padding="max_length", max_length=77,
    truncation=True` (FluxPipeline's call): `<|startoftext|>`, at most 75 tokens, `<|endoftext|>`, then
    the pad token (`<|endoftext|>` for OpenAI's ViT-L/14) up to 77."""

    default_max_length = 77
    default_pad_token = "<|endoftext|>"

    @classmethod
    def from_folder(cls, folder: str | Path) -> CLIPTokenizer:
        """Load `folder/tokenizer.json` if present, else build the BPE from `vocab.json` + `merges.txt`
        (FLUX.1-dev's `tokenizer/`); special tokens from `tokenizer_config.json` /
        `special_tokens_map.json`."""
        folder = Path(folder)
        config = _read_json(folder / "special_tokens_map.json") | _read_json(folder / "tokenizer_config.json")
        special = {
            name: _token_text(config.get(f"{name}_token", default))
            for name, default in (
                ("bos", "<|startoftext|>"),
                ("eos", "<|endoftext|>"),
                ("unk", "<|endoftext|>"),
            )
        }
        pad = _token_text(config.get("pad_token", special["eos"]))
        if (folder / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tok = build_clip_tokenizer(folder / "vocab.json", folder / "merges.txt", **special)
        else:
            raise FileNotFoundError(f"{folder}: no tokenizer.json, nor vocab.json + merges.txt")
        return cls(tok, pad, config.get("padding_side", "right"))


@torch.no_grad()
def wan_text_embeddings(
    encoder: torch.nn.Module,
    tokenizer: T5Tokenizer,
    prompts: str | list[str],
    max_length: int = 512,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    clean: bool = True,
) -> torch.Tensor:
    """Wan's prompt embeddings: [B, max_length, d_model], rows past each prompt's length set to zero. Cosmos
    (Predict2, 1.0) embeds its T5 prompts the same way without the cleaning (clean=False).

    Prompts are cleaned (`prompt_clean`), tokenized (padded to max_length, `</s>` appended) and encoded with
    the padding mask; then only each prompt's real tokens are kept, as WanPipeline._get_t5_prompt_embeds does.
    The encoder sees all max_length tokens, as the reference's does: with the padding keys masked the real
    rows are the same in exact arithmetic whatever follows them, but not in bf16, where the attention over
    512 keys rounds otherwise than over the prompt's few (a tiny T5 on the CPU: 5.5e-3 apart). The longer
    pass is ~5 TFLOP for UMT5-XXL, once per prompt (not timed; the text phase measured 0.03 s before).
    """
    if tokenizer.padding_side != "right":
        raise ValueError("wan_text_embeddings needs a right-padding tokenizer (real tokens first)")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids, mask = tokenizer.encode([prompt_clean(p) for p in prompts] if clean else prompts, max_length)
    lens = mask.sum(dim=1)  # [B] real tokens incl. </s>
    param = next(encoder.parameters())
    hidden = encoder(ids.to(param.device), mask.to(param.device))  # [B, max_length, d_model]
    keep = torch.arange(max_length, device=hidden.device)[None, :] < lens.to(hidden.device)[:, None]
    out = torch.where(keep[..., None], hidden, 0.0)
    return out.to(device=device or hidden.device, dtype=dtype or hidden.dtype)
