"""Tiny random-weight models of the real image generation and editing architectures.

A model whose registry entry says ``weights = "tiny"`` is built here on first
use: the real classes (``ZImagePipeline`` / ``LongCatImagePipeline`` /
``Flux2KleinPipeline`` with their transformer, VAE, Qwen text encoder and an
offline Qwen-style tokenizer) in a
configuration small enough for a CPU, with weights drawn from a fixed seed. It
is saved with ``save_pretrained`` into ``<model cache>/<model id>-tiny-v<N>``
(model ids such as ``black-forest-labs/FLUX.2-klein-4B`` become safe
directory names) and from then on loaded exactly like real weights, with the
pipeline's ``from_pretrained``. Building happens in a temporary directory that is renamed
into place at the end, so a crash never leaves half a model behind.

Bump :data:`TINY_VERSION` when a configuration changes; old builds are then
ignored (and may be deleted by hand).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from services.common.tiny_tokenizer import build_tiny_tokenizer

log = logging.getLogger(__name__)

TINY_VERSION = 1
#: The seed every tiny model's weights are drawn from.
TINY_SEED = 0


def _tiny_qwen3_config(tokenizer: Any) -> Any:
    """The tiny Qwen3 text encoder both Z-Image and FLUX.2-klein use (hidden size 16)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _tiny_vae() -> Any:
    """A 4-block KL VAE: scale factor 8 and 16 latent channels, like both real models'."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 8, 8],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )


def build_tiny_zimage(directory: Path) -> None:
    """Saves a tiny Z-Image-Turbo (``ZImagePipeline``) into ``directory``.

    Transformer as in MODELS.md, but ``axes_lens`` [1024, 128, 128]: axis 0
    holds the caption positions (up to ``max_sequence_length`` = 512) and the
    image's offset after them, axes 1-2 the latent grid after 2x2 patching
    (1792 px / 8 / 2 = 112 < 128). The VAE has four blocks, so its scale
    factor is 8 like the real model's.
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Model

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        transformer: Any = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=16,
            dim=32,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            norm_eps=1e-5,
            qk_norm=True,
            cap_feat_dim=16,
            rope_theta=256.0,
            t_scale=1000.0,
            axes_dims=[8, 4, 4],
            axes_lens=[1024, 128, 128],
        )
        with torch.no_grad():  # created with torch.empty: fill them, or the output is garbage
            transformer.x_pad_token.fill_(1.0)
            transformer.cap_pad_token.fill_(1.0)
        vae = _tiny_vae()
        text_encoder = Qwen3Model(_tiny_qwen3_config(tokenizer))
    pipe: Any = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(directory)


def build_tiny_longcat(directory: Path) -> None:
    """Saves a tiny LongCat-Image (``LongCatImagePipeline``) into ``directory``.

    The text encoder is a tiny ``Qwen2_5_VLForConditionalGeneration`` (the
    pipeline reads its last hidden state); the transformer takes packed 2x2
    latents of 16 channels (``in_channels`` 64) and the encoder's width as
    ``joint_attention_dim``. The ``text_processor`` (used only by the
    pipeline's optional prompt rewriting) is left out.
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        LongCatImagePipeline,
        LongCatImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tiny_tokenizer()
    ids: dict[str, Any] = {
        name: tokenizer.convert_tokens_to_ids(name)
        for name in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        config_cls: Any = Qwen2_5_VLConfig
        text_encoder = Qwen2_5_VLForConditionalGeneration(
            config_cls(
                text_config={
                    "hidden_size": 32,
                    "intermediate_size": 37,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 2,
                    "vocab_size": len(tokenizer),
                    "max_position_embeddings": 1024,
                    "rope_parameters": {
                        "rope_type": "default",
                        "rope_theta": 10000,
                        "mrope_section": [2, 1, 1],
                    },
                    "bos_token_id": None,
                    "eos_token_id": tokenizer.eos_token_id,
                    "pad_token_id": tokenizer.pad_token_id,
                },
                vision_config={
                    "depth": 1,
                    "hidden_size": 16,
                    "intermediate_size": 16,
                    "num_heads": 2,
                    "out_hidden_size": 32,
                    "patch_size": 14,
                    "spatial_merge_size": 2,
                    "temporal_patch_size": 2,
                    "fullatt_block_indexes": [0],
                    "window_size": 56,
                },
                bos_token_id=None,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                image_token_id=ids["<|image_pad|>"],
                video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"],
                vision_end_token_id=ids["<|vision_end|>"],
            )
        ).eval()
        transformer = LongCatImageTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 6, 6],
        )
        vae = _tiny_vae()
    pipe: Any = LongCatImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_processor=None,
        transformer=transformer,
    )
    pipe.save_pretrained(directory)


def build_tiny_flux2_klein(directory: Path, *, distilled: bool) -> None:
    """Saves a tiny FLUX.2 [klein] (``Flux2KleinPipeline``) into ``directory``.

    As in MODELS.md: a 4-block ``AutoencoderKLFlux2`` (scale factor 8, 4
    latent channels, so the transformer takes 2x2-patchified latents:
    ``in_channels`` = 4 x 4), a one-block ``Flux2Transformer2DModel`` and a
    two-layer ``Qwen3ForCausalLM`` text encoder. The real checkpoints differ
    only in the pipeline config: the distilled FLUX.2-klein-4B ships
    ``is_distilled = true`` (no classifier-free guidance: one transformer pass
    per step), the base FLUX.2-klein-base-4B ``false`` (guidance > 1 runs a
    second, unconditional pass). Neither uses guidance embeddings
    (``guidance_embeds = false``). ``joint_attention_dim`` equals the text
    encoder's width: the engine stacks one hidden layer (see
    :func:`services.image_gen.engines.klein_text_layers`).
    """
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3ForCausalLM

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=16,
            timestep_guidance_channels=256,
            axes_dims_rope=[4, 4, 4, 4],
            guidance_embeds=False,
        )
        text_encoder = Qwen3ForCausalLM(_tiny_qwen3_config(tokenizer))
        vae = AutoencoderKLFlux2(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=1,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    pipe: Any = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=distilled,
    )
    pipe.save_pretrained(directory)
