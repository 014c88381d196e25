"""A tiny random-weight SAM3 (detector and point tracker) for CPU hosts and tests.

A ``sam3`` model whose registry entry says ``weights = "tiny"`` is built here on
first use: the real transformers classes, ``Sam3Model`` (text prompts: ViT
backbone, CLIP text encoder, DETR encoder/decoder, mask decoder) and
``Sam3TrackerModel`` (point and box prompts: SAM2-style prompt encoder and mask
decoder), in a configuration small enough for a CPU, with weights drawn from a
fixed seed (variance-preserving, see :func:`variance_preserving_init`), plus the offline Qwen-style tokenizer of
:mod:`services.common.tiny_tokenizer` standing in for SAM3's CLIP tokenizer.

Layout (the one :class:`services.segmentation.engines.Sam3Engine` loads, for
tiny and real weights alike)::

    <dir>/tokenizer.json ...      the tokenizer (AutoTokenizer)
    <dir>/detector/config.json    Sam3Model.save_pretrained
    <dir>/tracker/config.json     Sam3TrackerModel.save_pretrained

A real ``facebook/sam3`` checkpoint (one ``sam3_video`` config that both
classes load from) works too: without the two sub-directories the engine loads
both models from ``<dir>`` itself.

Both models take 224 x 224 inputs (patch 14, so a 16 x 16 grid); the tracker's
feature pyramid is 64/32/16 (scale factors 4, 2, 1, as the real model's
288/144/72 at 1008 px) and its prompt encoder uses the same ``image_size`` and
patch size, so point coordinates in model-input pixels and the 16 x 16 image
embedding agree. Bump :data:`TINY_VERSION` when a
configuration changes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from services.common.tiny_tokenizer import build_tiny_tokenizer

TINY_VERSION = 1
#: The seed every tiny model's weights are drawn from.
TINY_SEED = 0
#: Input side of the tiny models (the real SAM3 uses 1008).
TINY_IMAGE_SIZE = 224
#: Longest text prompt in tokens (CLIP's context, as in SAM3).
TINY_TEXT_LENGTH = 32
#: Sub-directories of a saved model.
DETECTOR_DIR = "detector"
TRACKER_DIR = "tracker"


def _vit() -> Any:
    from transformers import Sam3ViTConfig

    return Sam3ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_channels=3,
        image_size=TINY_IMAGE_SIZE,
        patch_size=14,
        window_size=8,
        global_attn_indexes=[0, 1],
    )


def tiny_detector(tokenizer: Any) -> Any:
    """A tiny ``Sam3Model`` (random weights from the current torch RNG)."""
    from transformers import (
        Sam3Config,
        Sam3DETRDecoderConfig,
        Sam3DETREncoderConfig,
        Sam3GeometryEncoderConfig,
        Sam3MaskDecoderConfig,
        Sam3Model,
        Sam3VisionConfig,
    )

    config = Sam3Config(
        vision_config=Sam3VisionConfig(backbone_config=_vit(), fpn_hidden_size=32, scale_factors=[2.0, 1.0]),
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "projection_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": TINY_TEXT_LENGTH,
            "hidden_act": "gelu",
            # The tiny vocabulary's ids, not CLIP's 49406/49407.
            "bos_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        geometry_encoder_config=Sam3GeometryEncoderConfig(
            hidden_size=32,
            num_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
        ),
        detr_encoder_config=Sam3DETREncoderConfig(
            hidden_size=32, num_layers=1, num_attention_heads=4, intermediate_size=64
        ),
        detr_decoder_config=Sam3DETRDecoderConfig(
            hidden_size=32, num_layers=1, num_queries=5, num_attention_heads=4, intermediate_size=64
        ),
        mask_decoder_config=Sam3MaskDecoderConfig(hidden_size=32, num_upsampling_stages=2),
    )
    return Sam3Model(config).eval()


def tiny_tracker() -> Any:
    """A tiny ``Sam3TrackerModel`` (random weights from the current torch RNG)."""
    from transformers import (
        Sam3TrackerConfig,
        Sam3TrackerMaskDecoderConfig,
        Sam3TrackerModel,
        Sam3TrackerPromptEncoderConfig,
        Sam3VisionConfig,
    )

    config = Sam3TrackerConfig(
        vision_config=Sam3VisionConfig(
            backbone_config=_vit(),
            fpn_hidden_size=32,
            scale_factors=[4.0, 2.0, 1.0],
            backbone_feature_sizes=[[64, 64], [32, 32], [16, 16]],
        ),
        prompt_encoder_config=Sam3TrackerPromptEncoderConfig(
            image_size=TINY_IMAGE_SIZE,
            patch_size=14,
            mask_input_channels=8,
            hidden_size=32,
            num_point_embeddings=4,
            hidden_act="gelu",
        ),
        mask_decoder_config=Sam3TrackerMaskDecoderConfig(
            hidden_size=32,
            hidden_act="relu",
            mlp_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            attention_downsample_rate=2,
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
        ),
    )
    return Sam3TrackerModel(config).eval()


def variance_preserving_init(model: Any) -> None:
    """Redraws every weight matrix and kernel from ``N(0, 1 / fan_in)`` (LeCun normal).

    The configs' default (``N(0, 0.02)``) shrinks activations layer after
    layer, so a two-layer random network answers the same for every image
    (SAM3 scores all about 0.2508). With variance-preserving weights the
    tiny model's scores and masks depend on the image, as a real model's do:
    that is what the found / not-found rule and the tests need. Biases and
    norms keep their defaults.
    """
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 1.0 / math.sqrt(parameter[0].numel()))


def build_tiny_sam3(directory: Path) -> None:
    """Saves a tiny SAM3 (tokenizer, ``detector/``, ``tracker/``) into ``directory``."""
    tokenizer = build_tiny_tokenizer(model_max_length=TINY_TEXT_LENGTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        detector = tiny_detector(tokenizer)
        variance_preserving_init(detector)
        tracker = tiny_tracker()
        variance_preserving_init(tracker)
    tokenizer.save_pretrained(directory)
    detector.save_pretrained(directory / DETECTOR_DIR)
    tracker.save_pretrained(directory / TRACKER_DIR)
