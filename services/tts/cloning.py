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
``torchaudio.compliance.kaldi`` and ``sox`` for its 25 Hz tokenizer only; those
imports are satisfied by stand-ins that raise when used, so models with the
25 Hz tokenizer are refused at load time (the released Qwen3-TTS models use the
12 Hz one).

Without registry weights a tiny random-weight model of the real architecture
(:mod:`services.tts.tiny`) is built, saved with ``save_pretrained`` and loaded
back through the same ``from_pretrained`` path real weights take. Its voice is
noise, but every stage runs: reference encoding, speaker embedding,
generation, streaming decode.
"""

from __future__ import annotations

import importlib.machinery
import io
import sys
import types
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.engine import EngineUnavailable, RegistryEngine
from services.common.model_cache import MODEL_LOAD_LOCK, ensure_tiny_model_directory
from services.common.registry import ModelSpec
from services.common.runner import Progress, StepControl
from services.tts.engines import SpeechChunk, SpeechDone, stream_pcm
from services.tts.rules import DEFAULT_LANGUAGE, DEFAULT_MAX_CHARS, check_clone, language_names
from services.tts.tiny import TINY_VERSION, build_tiny_qwen3_tts

#: Codec frames decoded together while streaming (12.5 frames/s: 320 ms of audio).
FRAMES_PER_CHUNK = 4
#: Frames of left context the decoder sees before each chunk (as upstream's chunked decode).
LEFT_CONTEXT_FRAMES = 25
#: Generation budget: frames per character of text, plus a fixed margin (12.5 frames/s;
#: speech runs at about 12-15 characters a second, so this allows a slow reading).
FRAMES_PER_CHARACTER = 2
EXTRA_FRAMES = 25


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


def _needs_25hz_tokenizer(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("the 25 Hz Qwen3-TTS tokenizer needs torchaudio and SoX, which are not installed")


def _stand_ins() -> dict[str, types.ModuleType]:
    """Modules that raise when used, for the 25 Hz tokenizer's imports that are not loaded yet.

    torchaudio is absent (it would pull a CUDA torch). The ``sox`` package, even when
    installed, runs ``sox -h`` through the shell as it is imported, which prints
    ``sox: not found`` on the console where the SoX program is missing.
    """
    names = [*_TORCHAUDIO_NAMES] if all(name not in sys.modules for name in _TORCHAUDIO_NAMES) else []
    if "sox" not in sys.modules:
        names.append("sox")
    modules = {name: types.ModuleType(name) for name in names}
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    if "torchaudio" in modules:
        modules["torchaudio.compliance.kaldi"].fbank = _needs_25hz_tokenizer  # type: ignore[attr-defined]
        modules["torchaudio"].compliance = modules["torchaudio.compliance"]  # type: ignore[attr-defined]
        modules["torchaudio.compliance"].kaldi = modules["torchaudio.compliance.kaldi"]  # type: ignore[attr-defined]
    if "sox" in modules:
        modules["sox"].Transformer = _needs_25hz_tokenizer  # type: ignore[attr-defined]
    return modules


def import_qwen_tts() -> Any:
    """The ``qwen_tts`` package, imported with stand-ins for ``torchaudio.compliance.kaldi`` and ``sox``.

    The stand-ins are only in :data:`sys.modules` while ``qwen_tts`` imports, so
    nothing else (transformers' own availability checks included) ever sees a
    torchaudio or sox that is not there.
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
    modules = _stand_ins()
    sys.modules.update(modules)
    try:
        # Importing prints a flash-attn notice (for the 25 Hz tokenizer's Whisper encoder),
        # not used here: dropped to keep `kiln up`'s console readable.
        with redirect_stdout(io.StringIO()):
            import qwen_tts
    except ImportError as exc:
        raise EngineUnavailable(
            f"qwen-tts cannot be imported ({exc}); the tts service runs in its own environment "
            "(make builds .venv-tts)"
        ) from exc
    finally:
        for name in modules:
            sys.modules.pop(name, None)
    return qwen_tts


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
        return language_names(self.languages)

    def check(self, text: str, ref_text: str, language: str) -> str:
        """Raises :class:`InvalidRequest` for an unusable request (:func:`services.tts.rules.check_clone`);
        returns the language to use."""
        return check_clone(text, ref_text, language, max_chars=self.max_chars, languages=self.languages)

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
