"""A tiny random-weight Qwen3-TTS Base model of the real architecture, for hosts without the weights.

A voice-cloning model whose registry entry says ``weights = "tiny"`` is built
here on first use (:func:`build_tiny_qwen3_tts`): the upstream ``qwen-tts``
classes (talker, code predictor, speaker encoder, the 12 Hz speech tokenizer)
and the offline Qwen-style text tokenizer, small enough for a CPU, weights
drawn from a fixed seed, in the layout of the released checkpoints. It is
saved with ``save_pretrained`` into ``<model cache>/<model id>-tiny-v<N>`` and
from then on loaded exactly like real weights, through
``Qwen3TTSModel.from_pretrained``. Its voice is noise, but every stage runs.

Piper voices need no tiny build: real, small voices ship in registry packages.

Bump :data:`TINY_VERSION` when the configuration changes; old builds are then
ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Bump when the tiny build changes, so old cached builds are not reused.
TINY_VERSION = 1
#: The seed the tiny model's weights are drawn from.
TINY_SEED = 0
#: The languages of the released Qwen3-TTS models (the tiny build speaks the same list).
QWEN3_TTS_LANGUAGES = (
    "chinese",
    "english",
    "japanese",
    "korean",
    "german",
    "french",
    "russian",
    "portuguese",
    "spanish",
    "italian",
)


def build_tiny_qwen3_tts(directory: Path) -> None:
    """Saves a tiny random-weight Qwen3-TTS Base model (talker, code predictor, speaker
    encoder, 12 Hz codec, text tokenizer) in the layout of the released checkpoints."""
    import torch
    from transformers import EncodecFeatureExtractor

    from services.common.tiny_tokenizer import build_tiny_tokenizer

    # Imported here, not at the top: the engine module imports this one.
    from services.tts.cloning import import_qwen_tts

    import_qwen_tts()
    from qwen_tts.core import Qwen3TTSTokenizerV2Config, Qwen3TTSTokenizerV2Model
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration, Qwen3TTSProcessor

    torch.manual_seed(TINY_SEED)
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(["<tts_pad>", "<tts_text_bos>", "<tts_text_eod>"], special_tokens=True)
    tokenizer.add_tokens(["assistant"])  # "<|im_start|>assistant\n" must be three tokens, as in Qwen's
    token_id = tokenizer.convert_tokens_to_ids
    # Codec codes are 0..2047; control tokens and languages live in the talker's
    # top 1024 ids (generation suppresses them, but for end-of-speech).
    codebook = 2048
    config = Qwen3TTSConfig(
        talker_config={
            "vocab_size": codebook + 1024,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "num_code_groups": 4,
            "text_hidden_size": 32,
            "text_vocab_size": len(tokenizer),
            "spk_id": {},
            "spk_is_dialect": {},
            "codec_language_id": {name: codebook + 2 + i for i, name in enumerate(QWEN3_TTS_LANGUAGES)},
            "codec_eos_token_id": codebook + 100,
            "codec_think_id": codebook + 101,
            "codec_nothink_id": codebook + 102,
            "codec_think_bos_id": codebook + 103,
            "codec_think_eos_id": codebook + 104,
            "codec_pad_id": codebook + 105,
            "codec_bos_id": codebook + 106,
            "rope_scaling": {"rope_type": "default", "mrope_section": [2, 1, 1], "interleaved": True},
            "code_predictor_config": {
                "vocab_size": codebook,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 8,
                "num_code_groups": 4,
            },
        },
        speaker_encoder_config={
            "mel_dim": 128,
            "enc_dim": 32,
            "enc_channels": [16, 16, 16, 16, 48],
            "enc_attention_channels": 8,
            "enc_se_channels": 8,
        },
        tts_model_type="base",
        tokenizer_type="qwen3_tts_tokenizer_12hz",
        tts_model_size="tiny",
        im_start_token_id=token_id("<|im_start|>"),
        im_end_token_id=token_id("<|im_end|>"),
        tts_pad_token_id=token_id("<tts_pad>"),
        tts_bos_token_id=token_id("<tts_text_bos>"),
        tts_eos_token_id=token_id("<tts_text_eod>"),
    )
    codec = Qwen3TTSTokenizerV2Model(
        Qwen3TTSTokenizerV2Config(
            encoder_config={
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "head_dim": 8,
                "intermediate_size": 64,
                "codebook_size": codebook,
                "codebook_dim": 16,
                "num_filters": 8,
                "num_residual_layers": 1,
                "upsampling_ratios": [8, 6, 5, 4],
                "num_quantizers": 4,
                "num_semantic_quantizers": 1,
                "frame_rate": 12.5,
                "sampling_rate": 24000,
                "upsample_groups": 32,
                "vector_quantization_hidden_dimension": 16,
            },
            decoder_config={
                "codebook_size": codebook,
                "hidden_size": 32,
                "latent_dim": 32,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_quantizers": 4,
                "decoder_dim": 32,
                "upsample_rates": [8, 5, 4, 3],
                "upsampling_ratios": [2, 2],
                "sliding_window": 8,
                "codebook_dim": 16,
            },
            encoder_valid_num_quantizers=4,
        )
    )
    Qwen3TTSForConditionalGeneration(config).save_pretrained(directory)
    Qwen3TTSProcessor(tokenizer=tokenizer).save_pretrained(directory)
    codec.save_pretrained(directory / "speech_tokenizer")
    EncodecFeatureExtractor(feature_size=1, sampling_rate=24000).save_pretrained(
        directory / "speech_tokenizer"
    )
    # The released checkpoints' generation defaults (generation_config.json).
    defaults = {
        "do_sample": True,
        "top_k": 50,
        "top_p": 1.0,
        "temperature": 0.9,
        "repetition_penalty": 1.05,
        "subtalker_dosample": True,
        "subtalker_top_k": 50,
        "subtalker_top_p": 1.0,
        "subtalker_temperature": 0.9,
        "max_new_tokens": 2048,
    }
    (directory / "generation_config.json").write_text(json.dumps(defaults, indent=2), encoding="utf-8")
    # The speaker encoder's sub-config is not a registered model type of its own.
    saved = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    saved.get("speaker_encoder_config", {}).pop("model_type", None)
    (directory / "config.json").write_text(json.dumps(saved, indent=2), encoding="utf-8")
