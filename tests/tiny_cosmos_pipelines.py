"""Tiny random Cosmos-Predict2 / Predict2.5 pipelines in the Hub Diffusers layout, written by diffusers 0.42.1
(test-only: imports diffusers and transformers).

`make_cosmos2_t2i`, `make_cosmos2_v2w` and `make_cosmos25` build diffusers' `Cosmos2TextToImagePipeline`,
`Cosmos2VideoToWorldPipeline` and `Cosmos2_5_PredictBasePipeline` from tiny random components, save them,
and return the reference pipeline. diffusers refuses to run these pipelines without NVIDIA's guardrail, so
the reference side gets `PassThroughSafetyChecker` (as diffusers' own tests do); the saved model_index.json
then names the guardrail the way the Hub repos do, `["cosmos_guardrail", "CosmosSafetyChecker"]`.

`reference_stand_ins` gives the reference modules the two torchvision calls they make (the DiT's nearest
resize of the padding mask, Predict2.5's `to_tensor`): no CPU torchvision wheel is installed here.
"""

from __future__ import annotations

import contextlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from tiny_checkpoints import make_t5, make_t5_tokenizer, make_wan_vae
from tiny_cosmos import (
    COSMOS_PREDICT2,
    COSMOS_PREDICT2_V2W,
    COSMOS_PREDICT25,
    make_cosmos_transformer,
    torchvision_stand_in,
)

from dit_rt.demo import randomize as _randomize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from bench_e2e import pass_through_safety_checker, small_qwen_tokenizer  # noqa: E402

GUARDRAIL_ENTRY = ["cosmos_guardrail", "CosmosSafetyChecker"]
QWEN_HIDDEN, QWEN_LAYERS = 24, 2  # 2 x 24 = COSMOS_PREDICT25's crossattn_proj_in_channels (48)
QWEN_WORDS = ("a", "the", "cat", "dog", "robot", "arm", "You", "are", "helpful", "assistant", "image")


def _save(pipe, path: str | Path):
    """save_pretrained, then name the guardrail as the Hub repos do."""
    pipe.save_pretrained(str(path), safe_serialization=True)
    index_path = Path(path) / "model_index.json"
    index = json.loads(index_path.read_text())
    index["safety_checker"] = GUARDRAIL_ENTRY
    index_path.write_text(json.dumps(index, indent=2))
    return pipe


def _predict2_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True)


def make_cosmos2_t2i(path: str | Path):
    from diffusers import Cosmos2TextToImagePipeline

    pipe = Cosmos2TextToImagePipeline(
        text_encoder=make_t5(),
        tokenizer=make_t5_tokenizer(),
        transformer=make_cosmos_transformer(COSMOS_PREDICT2, seed=31),
        vae=make_wan_vae(),
        scheduler=_predict2_scheduler(),
        safety_checker=pass_through_safety_checker(),
    )
    return _save(pipe, path)


def make_cosmos2_v2w(path: str | Path):
    from diffusers import Cosmos2VideoToWorldPipeline

    pipe = Cosmos2VideoToWorldPipeline(
        text_encoder=make_t5(),
        tokenizer=make_t5_tokenizer(),
        transformer=make_cosmos_transformer(COSMOS_PREDICT2_V2W, seed=32),
        vae=make_wan_vae(),
        scheduler=_predict2_scheduler(),
        safety_checker=pass_through_safety_checker(),
    )
    return _save(pipe, path)


def make_qwen_tokenizer():
    """The demo's Unigram tokenizer with Qwen's chat markers and pad token added, and the chat template."""
    return small_qwen_tokenizer(QWEN_WORDS)


def make_qwen(vocab_size: int, seed: int = 33):
    """A tiny Qwen2.5-VL (text stack + a one-block vision tower that text prompts never reach)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(
        vocab_size=vocab_size,
        hidden_size=QWEN_HIDDEN,
        intermediate_size=48,
        num_hidden_layers=QWEN_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        rope_parameters=dict(rope_type="default", mrope_section=[2, 2, 2], rope_theta=10000.0),
        bos_token_id=0,
        eos_token_id=1,
    )
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=QWEN_HIDDEN,
        fullatt_block_indexes=[0],
    )
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, bos_token_id=0, eos_token_id=1)
    return _randomize(Qwen2_5_VLForConditionalGeneration(config).eval(), seed)


def make_cosmos25(path: str | Path):
    from diffusers import Cosmos2_5_PredictBasePipeline, UniPCMultistepScheduler

    tokenizer = make_qwen_tokenizer()
    pipe = Cosmos2_5_PredictBasePipeline(
        text_encoder=make_qwen(len(tokenizer)),
        tokenizer=tokenizer,
        transformer=make_cosmos_transformer(COSMOS_PREDICT25, seed=34),
        vae=make_wan_vae(),
        scheduler=UniPCMultistepScheduler(
            use_karras_sigmas=True,
            use_flow_sigmas=True,
            prediction_type="flow_prediction",
            sigma_max=200.0,
            sigma_min=0.01,
        ),
        safety_checker=pass_through_safety_checker(),
    )
    return _save(pipe, path)


def _to_tensor(image) -> torch.Tensor:
    """torchvision's `to_tensor` for a PIL image: [C, H, W] float32 in [0, 1]."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float().div(255)


@contextlib.contextmanager
def reference_stand_ins():
    """Within the block the diffusers Cosmos modules see stand-ins for the torchvision calls they make."""
    import diffusers.pipelines.cosmos.pipeline_cosmos2_5_predict as predict25

    missing = object()
    saved = getattr(predict25, "torchvision", missing)
    functional = types.SimpleNamespace(to_tensor=_to_tensor)
    predict25.torchvision = types.SimpleNamespace(transforms=types.SimpleNamespace(functional=functional))
    try:
        with torchvision_stand_in():
            yield
    finally:
        if saved is missing:
            del predict25.torchvision
        else:
            predict25.torchvision = saved
