"""A tiny random-weight Qwen3.5 vision-language model for CPU hosts and tests.

A ``qwen3_5`` model whose registry entry says ``weights = "tiny"`` is built
here on first use: the real ``transformers.Qwen3_5ForConditionalGeneration``
(hybrid ``linear_attention`` / ``full_attention`` text layers, a ViT with
2 x 2 patch merging, interleaved multimodal RoPE) in a configuration small
enough for a CPU, with weights drawn from a fixed seed, plus the offline
Qwen-style tokenizer of :mod:`services.common.tiny_tokenizer` (ChatML
template, Qwen's vision tokens) and a ``Qwen2VLImageProcessorPil`` whose pixel
bounds keep an image to at most 16 tokens.

Layout (what :class:`services.llm.engines.Qwen35Engine` loads, for tiny and
real weights alike)::

    <dir>/config.json, model.safetensors   Qwen3_5ForConditionalGeneration.save_pretrained
    <dir>/tokenizer.json ...                the tokenizer (AutoTokenizer)
    <dir>/preprocessor_config.json          Qwen2VLImageProcessorPil.save_pretrained

Bump :data:`TINY_VERSION` when the configuration changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from services.common.tiny_tokenizer import build_tiny_tokenizer

TINY_VERSION = 1
#: The seed the tiny weights are drawn from.
TINY_SEED = 0
#: Pixel bounds of the tiny image processor: 32x32 to 128x128 pixels, so 1 to 16 image tokens
#: (patch 16, 2 x 2 merge).
TINY_MIN_PIXELS = 32 * 32
TINY_MAX_PIXELS = 128 * 128
#: The tiny model's position range (RoPE works beyond it; the registry's ``context`` is the limit).
TINY_MAX_POSITIONS = 262144


def tiny_qwen3_5(tokenizer: Any) -> Any:
    """A tiny ``Qwen3_5ForConditionalGeneration`` (random weights from the current torch RNG)."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    ids = {
        token: tokenizer.convert_tokens_to_ids(token)
        for token in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    }
    config = Qwen3_5Config(
        text_config={
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "head_dim": 8,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_hidden_layers": 2,
            "layer_types": ["linear_attention", "full_attention"],
            "max_position_embeddings": TINY_MAX_POSITIONS,
            "tie_word_embeddings": True,
            "initializer_range": 0.2,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000,
                "mrope_section": [2, 1, 1],
                "mrope_interleaved": True,
            },
            "linear_conv_kernel_dim": 2,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "linear_num_key_heads": 4,
            "linear_num_value_heads": 8,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 32,
            "out_hidden_size": 32,
            "num_heads": 4,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 16,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    return Qwen3_5ForConditionalGeneration(config).eval()


def tiny_image_processor() -> Any:
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS},
    )


def build_tiny_qwen3_5(directory: Path) -> None:
    """Saves a tiny Qwen3.5 VLM (model, tokenizer, image processor) into ``directory``."""
    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = tiny_qwen3_5(tokenizer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    tiny_image_processor().save_pretrained(directory)
