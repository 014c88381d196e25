"""Voice cloning with Qwen3-TTS (engine key ``qwen3_tts``), streamed frame by frame.

The engine drives the upstream ``qwen-tts`` classes (``Qwen3TTSModel``, the
12 Hz speech tokenizer) the way the reference implementation does: the
reference recording becomes codec codes and a speaker embedding
(``create_voice_clone_prompt``, in-context mode, so ``ref_text`` is required),
the talker generates codec frames for the text, and the codec's decoder turns
frames into 24 kHz audio. Unlike ``generate_voice_clone``, which decodes once
at the end, a forward hook on the talker collects each frame as it is made and
every :data:`FRAMES_PER_CHUNK` frames are decoded with
:data:`LEFT_CONTEXT_FRAMES` frames of left context (the reference's own codes
at the start), so the first audio leaves after a few frames.

``qwen-tts`` 0.1.1 pins transformers 4.57.3, so the tts service runs in its
own environment (``.venv-tts``, built by the Makefile). The package imports
``torchaudio.compliance.kaldi`` for its 25 Hz tokenizer only; that import is
satisfied by a stand-in whose ``fbank`` raises, so models with the 25 Hz
tokenizer are refused at load time (the released Qwen3-TTS models use the
12 Hz one).

Without registry weights a tiny random-weight model of the real architecture
is built, saved with ``save_pretrained`` and loaded back through the same
``from_pretrained`` path real weights take. Its voice is noise, but every
stage runs: reference encoding, speaker embedding, generation, streaming
decode.
"""

from __future__ import annotations

import importlib.machinery
import io
import json
import logging
import sys
import types
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.engine import EngineUnavailable, RegistryEngine
from services.common.errors import InvalidRequest, quoted
from services.common.model_cache import MODEL_LOAD_LOCK, ensure_tiny_model_directory
from services.common.registry import ModelSpec
from services.common.runner import Progress, StepControl
from services.tts.engines import DEFAULT_MAX_CHARS, SpeechChunk, SpeechDone, pcm_of, stream_pcm

#: The contract's default language.
DEFAULT_LANGUAGE = "English"
#: Codec frames decoded together while streaming (12.5 frames/s: 320 ms of audio).
FRAMES_PER_CHUNK = 4
#: Frames of left context the decoder sees before each chunk (as upstream's chunked decode).
LEFT_CONTEXT_FRAMES = 25
#: Generation budget: frames per character of text, plus a fixed margin (12.5 frames/s;
#: speech runs at about 12-15 characters a second, so this allows a slow reading).
FRAMES_PER_CHARACTER = 2
EXTRA_FRAMES = 25
#: Bump when the tiny build changes, so old cached builds are not reused.
TINY_VERSION = 1
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


@dataclass(frozen=True)
class CloneRequest:
    """Say ``text`` in the voice of ``ref_audio`` (float32 mono at ``ref_rate``), which says ``ref_text``."""

    text: str
    ref_audio: Any
    ref_rate: int
    ref_text: str
    language: str = DEFAULT_LANGUAGE
    #: Seeds torch's sampling (process-wide RNG) for a repeatable result; 0 = not seeded.
    seed: int = 0


_TORCHAUDIO_NAMES = ("torchaudio", "torchaudio.compliance", "torchaudio.compliance.kaldi")


def _drop(record: logging.LogRecord) -> bool:
    return False


def import_qwen_tts() -> Any:
    """The ``qwen_tts`` package, imported with a stand-in for ``torchaudio.compliance.kaldi``.

    The stand-in is only in :data:`sys.modules` while ``qwen_tts`` imports, so
    nothing else (transformers' own availability checks included) ever sees a
    torchaudio that is not there.
    """
    if "qwen_tts" in sys.modules:
        return sys.modules["qwen_tts"]
    try:
        import transformers.utils.import_utils as import_utils
    except ImportError as exc:
        raise EngineUnavailable("transformers is not installed") from exc
    is_available = getattr(import_utils, "is_torchaudio_available", None)
    if callable(is_available):
        is_available()  # cached before the stand-in exists
    if all(name not in sys.modules for name in _TORCHAUDIO_NAMES):

        def fbank(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the 25 Hz Qwen3-TTS tokenizer needs torchaudio, which is not installed")

        modules = {name: types.ModuleType(name) for name in _TORCHAUDIO_NAMES}
        for name, module in modules.items():
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        modules["torchaudio.compliance.kaldi"].fbank = fbank  # type: ignore[attr-defined]
        modules["torchaudio"].compliance = modules["torchaudio.compliance"]  # type: ignore[attr-defined]
        modules["torchaudio.compliance"].kaldi = modules["torchaudio.compliance.kaldi"]  # type: ignore[attr-defined]
        sys.modules.update(modules)
        # Importing prints a flash-attn notice (for the 25 Hz tokenizer's Whisper encoder)
        # and `sox` warns that the SoX program is missing: neither is used here, so both
        # notices are dropped to keep `kiln up`'s console readable.
        sox_log = logging.getLogger("sox")
        sox_log.addFilter(_drop)
        try:
            with redirect_stdout(io.StringIO()):
                import qwen_tts
        except ImportError as exc:
            raise EngineUnavailable(
                f"qwen-tts cannot be imported ({exc}); the tts service runs in its own environment "
                "(make builds .venv-tts)"
            ) from exc
        finally:
            sox_log.removeFilter(_drop)
            for name in _TORCHAUDIO_NAMES:
                sys.modules.pop(name, None)
        return qwen_tts
    import qwen_tts

    return qwen_tts


def build_tiny_qwen3_tts(directory: Path) -> None:
    """Saves a tiny random-weight Qwen3-TTS Base model (talker, code predictor, speaker
    encoder, 12 Hz codec, text tokenizer) in the layout of the released checkpoints."""
    import torch
    from transformers import EncodecFeatureExtractor

    from services.common.tiny_tokenizer import build_tiny_tokenizer

    import_qwen_tts()
    from qwen_tts.core import Qwen3TTSTokenizerV2Config, Qwen3TTSTokenizerV2Model
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration, Qwen3TTSProcessor

    torch.manual_seed(0)
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


def frame_budget(text: str, limit: int) -> int:
    """How many codec frames a text may take: proportional to its length, at most ``limit``."""
    return max(1, min(limit, FRAMES_PER_CHARACTER * len(text) + EXTRA_FRAMES))


class CloneEngine(RegistryEngine[CloneRequest, SpeechChunk | SpeechDone]):
    """Qwen3-TTS Base: a reference recording's voice for any text, streamed."""

    def __init__(self, spec: ModelSpec, *, max_chars: int = DEFAULT_MAX_CHARS, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        self.model: Any = None
        self.sample_rate = 24000
        self.languages: tuple[str, ...] = ()
        self.max_chars = max_chars
        self.max_frames = 2048

    def model_directory(self) -> Path:
        if self.weights_dir is not None:
            self.require_weights_dir()
            return self.weights_dir
        return ensure_tiny_model_directory(
            self.cache_dir, self.spec.id, build_tiny_qwen3_tts, version=TINY_VERSION
        )

    def load_blocking(self) -> None:
        import torch

        qwen_tts = import_qwen_tts()
        self.apply_torch_threads()
        with MODEL_LOAD_LOCK:
            directory = self.model_directory()
            model = qwen_tts.Qwen3TTSModel.from_pretrained(
                str(directory), dtype=torch.float32, attn_implementation="eager", local_files_only=True
            )
        inner = model.model
        if inner.tts_model_type != "base":
            raise EngineUnavailable(
                f"a '{inner.tts_model_type}' model cannot clone voices (a Base model can)"
            )
        if inner.tokenizer_type != "qwen3_tts_tokenizer_12hz":
            raise EngineUnavailable(
                f"the {inner.tokenizer_type} speech tokenizer is not supported (12 Hz is)"
            )
        inner.eval()
        self.model = model
        self.sample_rate = int(inner.speech_tokenizer.get_output_sample_rate())
        self.languages = tuple(sorted(str(name).lower() for name in model.get_supported_languages() or ()))
        self.max_frames = int((model.generate_defaults or {}).get("max_new_tokens", 2048))
        # Encoding one second of silence compiles librosa's JIT kernels (cached on disk
        # afterwards), so the first request does not pay for them.
        import numpy as np

        with torch.inference_mode():
            model.create_voice_clone_prompt(
                ref_audio=(np.zeros(16000, dtype=np.float32), 16000), ref_text="warm up"
            )

    def close_blocking(self) -> None:
        self.model = None

    def language_names(self) -> list[str]:
        """The languages a request may ask for, capitalised as the contract writes them ("Auto" first)."""
        return [name.capitalize() for name in ("auto", *(n for n in self.languages if n != "auto"))]

    def check(self, text: str, ref_text: str, language: str) -> str:
        """Raises :class:`InvalidRequest` for an unusable request; returns the language to use."""
        for field, value in (("text", text), ("ref_text", ref_text)):
            if not value.strip():
                raise InvalidRequest(f"'{field}' must not be empty")
            if len(value) > self.max_chars:
                raise InvalidRequest(
                    f"'{field}' is {len(value)} characters long; the limit is {self.max_chars}"
                )
        language = language.strip() or DEFAULT_LANGUAGE
        if language.lower() != "auto" and language.lower() not in self.languages:
            raise InvalidRequest(
                f"Unsupported language '{quoted(language)}'. Supported languages: {', '.join(self.language_names())}"
            )
        return language

    async def clone(self, request: CloneRequest, *, request_id: str = "") -> AsyncGenerator[bytes, None]:
        """The PCM chunks of the cloned speech, as they are decoded."""
        async with aclosing(pcm_of(self.run(request, request_id=request_id))) as chunks:
            async for pcm in chunks:
                yield pcm

    async def run(
        self, request: CloneRequest, *, request_id: str = ""
    ) -> AsyncGenerator[Progress | SpeechChunk | SpeechDone, None]:
        language = self.check(request.text, request.ref_text, request.language)
        model = self.model
        budget = frame_budget(request.text, self.max_frames)

        def job(control: StepControl, emit: Callable[[bytes], None]) -> int:
            return self._clone(model, request, language, budget, control, emit)

        events = stream_pcm(self, job, sample_rate=self.sample_rate, request_id=request_id, label="clone")
        async with aclosing(events):
            async for event in events:
                yield event

    @staticmethod
    def _clone(
        model: Any,
        request: CloneRequest,
        language: str,
        budget: int,
        control: StepControl,
        emit: Callable[[bytes], None],
    ) -> int:
        """Generates on the worker thread; ``emit`` gets each chunk's PCM before its step is reported."""
        import numpy as np
        import torch

        inner = model.model
        if request.seed:
            torch.manual_seed(request.seed)
        with torch.inference_mode():
            items = model.create_voice_clone_prompt(
                ref_audio=(request.ref_audio, request.ref_rate), ref_text=request.ref_text
            )
            prompt = model._prompt_items_to_voice_clone_prompt(items)
            input_ids = model._tokenize_texts([model._build_assistant_text(request.text)])
            ref_ids = [model._tokenize_texts([model._build_ref_text(request.ref_text)])[0]]
            decoder = inner.speech_tokenizer.model.decoder
            upsample = int(decoder.total_upsample)
            context: list[Any] = list(items[0].ref_code)  # reference frames: the first chunk's left context
            reference_frames = len(context)
            state = {"decoded": reference_frames, "samples": 0, "chunks": 0}

            def decode(until: int) -> None:
                start = state["decoded"]
                left = max(0, start - LEFT_CONTEXT_FRAMES)
                codes = torch.stack(context[left:until]).T.unsqueeze(0)  # (1, groups, frames)
                wav = decoder(codes)[0, 0, (start - left) * upsample :]
                pcm = (wav.float().clamp(-1, 1).numpy() * 32767).round().astype(np.int16).tobytes()
                state["decoded"] = until
                state["samples"] += len(pcm) // 2
                state["chunks"] += 1
                emit(pcm)
                control.step(state["chunks"])

            def on_frame(module: Any, args: Any, output: Any) -> None:
                hidden = getattr(output, "hidden_states", None)
                codes = hidden[-1] if hidden else None
                if codes is None:  # the prefill step carries no frame
                    return
                context.append(codes[0].detach())
                if len(context) - state["decoded"] >= FRAMES_PER_CHUNK:
                    decode(len(context))
                else:
                    control.check()

            hook = inner.talker.register_forward_hook(on_frame)
            try:
                inner.generate(
                    input_ids=input_ids,
                    ref_ids=ref_ids,
                    voice_clone_prompt=prompt,
                    languages=[language],
                    non_streaming_mode=False,
                    **model._merge_generate_kwargs(max_new_tokens=budget),
                )
            finally:
                hook.remove()
            if len(context) > state["decoded"]:
                decode(len(context))
        return state["samples"]
