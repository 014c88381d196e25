"""A tiny random-weight ACE-Step 1.5 of the real architecture, for hosts without the weights.

A music model whose registry entry says ``weights = "tiny"`` is built here on
first use: diffusers' ``AceStepPipeline`` with every real component class
(``AceStepTransformer1DModel``, ``AceStepConditionEncoder``,
``AutoencoderOobleck``, a ``Qwen3Model`` text encoder, the
``AceStepAudioTokenizer`` / ``AceStepAudioTokenDetokenizer`` pair that covers
need, and the offline Qwen-style tokenizer), small enough for a CPU, weights
drawn from a fixed seed. It is saved with ``save_pretrained`` into
``<model cache>/<model id>-tiny-v<N>`` and from then on loaded exactly like
real weights, with ``AceStepPipeline.from_pretrained``.

The audio side keeps the real model's timing: 48 kHz stereo, a VAE hop of
1920 samples (downsampling 2 x 4 x 4 x 6 x 10), so 25 latent frames per second,
as ACE-Step 1.5. The VAE's ``encoder_hidden_size`` is twice its
``decoder_input_channels`` (mean and scale), which repaint needs (MODELS.md).
The condition encoder's ``silence_latent`` (what the real converter fills
with the VAE encoding of silence, used as the timbre reference when there is
none) is the tiny VAE's own encoding of silence. The transformer says
``is_turbo``: like the default ACE-Step 1.5 turbo checkpoint it runs no
classifier-free guidance.

Bump :data:`TINY_VERSION` when the configuration changes; old builds are then
ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from services.common.model_cache import ensure_tiny_model_directory
from services.common.tiny_tokenizer import build_tiny_tokenizer

TINY_VERSION = 1
#: The seed every tiny model's weights are drawn from.
TINY_SEED = 0
#: Output sample rate and VAE hop of the tiny model (ACE-Step 1.5's).
TINY_SAMPLE_RATE = 48000
TINY_DOWNSAMPLING = (2, 4, 4, 6, 10)


def build_tiny_ace_step(directory: Path) -> None:
    """Saves a tiny ACE-Step 1.5 (``AceStepPipeline``) into ``directory``."""
    from diffusers import AutoencoderOobleck, FlowMatchEulerDiscreteScheduler
    from diffusers.models.transformers.ace_step_transformer import AceStepTransformer1DModel
    from diffusers.pipelines.ace_step import AceStepConditionEncoder, AceStepPipeline
    from diffusers.pipelines.ace_step.modeling_ace_step import (
        AceStepAudioTokenDetokenizer,
        AceStepAudioTokenizer,
    )
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tiny_tokenizer()
    attention: dict[str, Any] = {
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "sliding_window": 16,
    }
    acoustic = 8  # latent channels: the VAE's decoder input, the DiT's acoustic width
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        transformer = AceStepTransformer1DModel(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            in_channels=3 * acoustic,  # noisy latents + source latents + chunk mask
            audio_acoustic_hidden_dim=acoustic,
            patch_size=2,
            rope_theta=10000.0,
            is_turbo=True,
            model_version="turbo",
            **attention,
        )
        condition_encoder: Any = AceStepConditionEncoder(
            hidden_size=32,
            intermediate_size=64,
            text_hidden_dim=32,
            timbre_hidden_dim=acoustic,
            num_lyric_encoder_hidden_layers=2,
            num_timbre_encoder_hidden_layers=2,
            rope_theta=10000.0,
            **attention,
        )
        vae: Any = AutoencoderOobleck(
            encoder_hidden_size=2 * acoustic,
            downsampling_ratios=list(TINY_DOWNSAMPLING),
            channel_multiples=[1, 1, 2, 2, 4],
            decoder_channels=8,
            decoder_input_channels=acoustic,
            audio_channels=2,
            sampling_rate=TINY_SAMPLE_RATE,
        )
        text_encoder = Qwen3Model(
            Qwen3Config(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                vocab_size=len(tokenizer),
                max_position_embeddings=4096,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
        audio_tokenizer = AceStepAudioTokenizer(
            hidden_size=32,
            intermediate_size=64,
            audio_acoustic_hidden_dim=acoustic,
            pool_window_size=5,
            fsq_dim=32,
            num_attention_pooler_hidden_layers=2,
            **attention,
        )
        detokenizer = AceStepAudioTokenDetokenizer(
            hidden_size=32,
            intermediate_size=64,
            audio_acoustic_hidden_dim=acoustic,
            pool_window_size=5,
            num_attention_pooler_hidden_layers=2,
            **attention,
        )
        with torch.no_grad():
            hop = 1
            for ratio in TINY_DOWNSAMPLING:
                hop *= ratio
            # The encoding of silence, away from the edges, tiled over the whole buffer.
            silence = vae.encode(torch.zeros(1, 2, 8 * hop)).latent_dist.mean  # (1, C, 8)
            frame = silence[:, :, 4].reshape(1, 1, acoustic)
            condition_encoder.silence_latent.copy_(frame.expand_as(condition_encoder.silence_latent))
    pipe: Any = AceStepPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        condition_encoder=condition_encoder,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0),
        audio_tokenizer=audio_tokenizer,
        audio_token_detokenizer=detokenizer,
    )
    pipe.save_pretrained(directory)


def ensure_tiny_ace_step(cache_dir: Path, model_id: str) -> Path:
    """The tiny model's directory, built first when it is not there yet (blocking; hold
    :data:`~services.common.model_cache.MODEL_LOAD_LOCK`)."""
    return ensure_tiny_model_directory(cache_dir, model_id, build_tiny_ace_step, version=TINY_VERSION)
