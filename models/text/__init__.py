"""Text encoders shared by the model families: T5/UMT5 (Wan, FLUX, Cosmos), the CLIP towers (FLUX's text
encoder, Wan I2V's image encoder), the Mistral-Small language stack (FLUX.2), the Qwen2.5-VL language stack
(Cosmos-Predict2.5), and their tokenizers."""

from dit_rt.models.text.clip import (
    CLIPTextConfig,
    CLIPTextEncoder,
    CLIPTextOutput,
    CLIPVisionConfig,
    CLIPVisionEncoder,
)
from dit_rt.models.text.mistral import Flux2PromptTokenizer, MistralTextConfig, MistralTextEncoder
from dit_rt.models.text.qwen import QwenPromptTokenizer, QwenTextConfig, QwenTextEncoder
from dit_rt.models.text.tokenizer import CLIPTokenizer, T5Tokenizer, prompt_clean, wan_text_embeddings
from dit_rt.models.text.umt5 import PRESETS, T5Config, T5Encoder, UMT5Config, UMT5Encoder

__all__ = [
    "CLIPTextConfig",
    "CLIPTextEncoder",
    "CLIPTextOutput",
    "CLIPTokenizer",
    "CLIPVisionConfig",
    "CLIPVisionEncoder",
    "Flux2PromptTokenizer",
    "MistralTextConfig",
    "MistralTextEncoder",
    "PRESETS",
    "QwenPromptTokenizer",
    "QwenTextConfig",
    "QwenTextEncoder",
    "T5Config",
    "T5Encoder",
    "T5Tokenizer",
    "UMT5Config",
    "UMT5Encoder",
    "prompt_clean",
    "wan_text_embeddings",
]
