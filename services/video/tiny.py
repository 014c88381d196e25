"""A tiny random-weight Wan 2.2 image-to-video model of the real architecture, for hosts without the weights.

A video model whose registry entry says ``weights = "tiny"`` is built here on
first use (:func:`build_tiny_wan_i2v`): diffusers' ``WanImageToVideoPipeline``
with every real component class, small enough for a CPU, weights drawn from a
fixed seed. It is saved with ``save_pretrained`` into
``<model cache>/<model id>-tiny-v<N>`` and from then on loaded exactly like
real weights, with the pipeline's ``from_pretrained``.

Bump :data:`TINY_VERSION` when the configuration changes; old builds are then
ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from services.common.tiny_tokenizer import build_tiny_tokenizer
from services.video.rules import DEFAULT_SHIFT

#: Bump when the tiny configuration changes (old builds are then ignored).
TINY_VERSION = 1
#: The seed every tiny model's weights are drawn from.
TINY_SEED = 0


def build_tiny_wan_i2v(directory: Path) -> None:
    """Saves a tiny Wan 2.2 A14B-style image-to-video pipeline into ``directory``.

    The real architecture's parts, tiny: two ``WanTransformer3DModel``
    (high-noise and low-noise experts, ``boundary_ratio`` 0.9 as Wan2.2-I2V-A14B;
    2x2 patches, 36 input channels = 16 noisy latent + 4 first-frame mask + 16
    image-condition latent channels, no image encoder, as Wan 2.2), a
    ``UMT5EncoderModel`` text encoder with the offline tokenizer, and an
    ``AutoencoderKLWan`` with the A14B latent space (16 channels, spatial
    scale 8, temporal scale 4). To keep full-resolution work cheap on a CPU,
    the tiny VAE uses the Wan VAE's 2x2 patchify front end (as the Wan 2.2
    VAE does) and two down levels instead of three: 2 x 4 = the same spatial
    scale 8, so sizes, frame counts and token counts are those of the real
    model. ``rope_max_seq_len`` is the real 1024 (1920 px / 16 = 120 patches
    fit). The scheduler saved with it is flow-matching Euler.
    """
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanImageToVideoPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tiny_tokenizer()

    def transformer() -> Any:
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=36,
            out_channels=16,
            text_dim=32,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=1024,
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=32,
                d_kv=8,
                d_ff=37,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        ).eval()
        high_noise, low_noise = transformer(), transformer()
        vae = AutoencoderKLWan(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 1, 1],
            num_res_blocks=0,
            temperal_downsample=[True, True],
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=8,
            scale_factor_temporal=4,
        )
    pipe: Any = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=high_noise,
        transformer_2=low_noise,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=DEFAULT_SHIFT),
        image_encoder=None,
        image_processor=None,
        boundary_ratio=0.9,
    )
    pipe.save_pretrained(directory)
