"""Tiny FLUX.2 text stack written by the references: a random `Mistral3ForConditionalGeneration` (32 text
layers, so that layers 30-31 and the final norm exist and must be skipped) and a small byte-level BPE
tokenizer laid out like Mistral's Tekken (`tokenizers` BPE + ByteLevel, the special tokens at Tekken's ids)
carrying Mistral-Small-3.1's chat template, in the two layouts dit_rt must read: tokenizer files with the
template (`save_pretrained` of the tokenizer) and a processor folder (`chat_template.json` +
`processor_config.json` beside the tokenizer files). Test-only: imports transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

from dit_rt.demo import randomize

# Tekken's first special tokens and their ids; the rest of the 1000 reserved ids are placeholders.
SPECIAL_TOKENS = {
    0: "<unk>",
    1: "<s>",
    2: "</s>",
    3: "[INST]",
    4: "[/INST]",
    10: "[IMG]",
    11: "<pad>",
    12: "[IMG_BREAK]",
    13: "[IMG_END]",
    17: "[SYSTEM_PROMPT]",
    18: "[/SYSTEM_PROMPT]",
}
NUM_SPECIAL = 20
VOCAB_SIZE = 600

# Tekken's pre-tokenizer split, as its tokenizer.json writes it.
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Test data: the chat template of mistralai/Mistral-Small-3.1-24B-Instruct-2503's processor (FLUX.2-dev's
# `tokenizer/`), the reference's configuration that dit_rt's Python rendering must reproduce.
_DEFAULT_SYSTEM = (
    '{%- set default_system_message = "You are Mistral Small 3, a Large Language Model (LLM) created by '
    "Mistral AI, a French startup headquartered in Paris.\\nYour knowledge base was last updated on "
    '2023-10-01. The current date is " + today + ".\\n\\nWhen you\'re not sure about some information, you '
    "say that you don't have the information and don't make up anything.\\nIf the user's question is not "
    "clear, ambiguous, or does not provide enough context for you to accurately answer the question, you do "
    'not try to answer it right away and you rather ask the user to clarify their request (e.g. \\"What are '
    'some good restaurants around me?\\" => \\"Where are you?\\" or \\"When is the next flight to Tokyo\\" '
    '=> \\"Where do you travel from?\\")" %}'
)
CHAT_TEMPLATE = (
    '{%- set today = strftime_now("%Y-%m-%d") %}\n'
    + _DEFAULT_SYSTEM
    + """

{{- bos_token }}

{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0]['content'] is string %}
        {%- set system_message = messages[0]['content'] %}
    {%- else %}
        {%- set system_message = messages[0]['content'][0]['text'] %}
    {%- endif %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = default_system_message %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}

{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- if message['content'] is string %}
            {{- '[INST]' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST]' }}
            {%- for block in message['content'] %}
                {%- if block['type'] == 'text' %}
                    {{- block['text'] }}
                {%- elif block['type'] in ['image', 'image_url'] %}
                    {{- '[IMG]' }}
                {%- else %}
                    {{- raise_exception('Only text and image blocks are supported in message content!') }}
                {%- endif %}
            {%- endfor %}
            {{- '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'system' %}
        {%- if message['content'] is string %}
            {{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}
        {%- else %}
            {{- '[SYSTEM_PROMPT]' + message['content'][0]['text'] + '[/SYSTEM_PROMPT]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {%- if message['content'] is string %}
            {{- message['content'] + eos_token }}
        {%- else %}
            {{- message['content'][0]['text'] + eos_token }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Only user, system and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}"""
)

# Corpus the tiny BPE is trained on: the system message and a few prompts' words, in several scripts.
_CORPUS = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation.",
    "a cat and a dog baking a cake in the kitchen, photo, 35mm, golden hour light",
    "Un chat et un chien préparent un gâteau. Café crème, déjà vu, naïve façade.",
    "猫と犬がケーキを焼いている。一只猫和一只狗在烤蛋糕。",
    "Кошка и собака пекут торт. 12345 67890 !!! ??? ... ---",
)

TEXT_CONFIG = dict(
    model_type="mistral",
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,  # heads x head_dim (64) differs from hidden_size, as in the 24B model (4096 vs 5120)
    rms_norm_eps=1e-5,
    rope_theta=1e9,
    sliding_window=None,
    max_position_embeddings=4096,
)
VISION_CONFIG = dict(
    model_type="pixtral",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    head_dim=8,
    image_size=28,
    patch_size=14,
)


def make_mistral3(seed: int = 31, std: float = 0.1, **text_overrides):
    """A random tiny Mistral3ForConditionalGeneration (eval, float32)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = {**TEXT_CONFIG, "vocab_size": VOCAB_SIZE, **text_overrides}
    cfg = Mistral3Config(text_config=text, vision_config=VISION_CONFIG)
    return randomize(Mistral3ForConditionalGeneration(cfg).eval(), seed, std=std)


def make_tekken_like():
    """A `tokenizers.Tokenizer`: byte-level BPE trained on `_CORPUS`, Tekken's split regex, the special tokens
    at Tekken's ids (placeholders `<SPECIAL_k>` in between), matched in raw text as added tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [SPECIAL_TOKENS.get(i, f"<SPECIAL_{i}>") for i in range(NUM_SPECIAL)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_TEKKEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    assert all(tok.token_to_id(t) == i for i, t in SPECIAL_TOKENS.items())
    return tok


def make_reference_tokenizer(padding_side: str = "right"):
    """Stands in for FLUX.2-dev's PixtralProcessor: a transformers fast tokenizer with the same template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=make_tekken_like(),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side=padding_side,
        chat_template=CHAT_TEMPLATE,
    )


def save_tokenizer(reference, folder: str | Path, layout: str = "tokenizer") -> Path:
    """Save `reference` in `folder`: "tokenizer" as `save_pretrained` writes it (template included);
    "processor" as a processor folder: tokenizer files without the template, which lives in
    `chat_template.json`, plus the processor's own config."""
    folder = Path(folder)
    reference.save_pretrained(str(folder))
    if layout == "processor":
        (folder / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        config["processor_class"] = "PixtralProcessor"
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
        processor = {"processor_class": "PixtralProcessor", "image_token": "[IMG]", "patch_size": 14}
        (folder / "processor_config.json").write_text(json.dumps(processor, indent=2))
    elif layout != "tokenizer":
        raise ValueError(f"layout {layout!r}: expected 'tokenizer' or 'processor'")
    return folder
