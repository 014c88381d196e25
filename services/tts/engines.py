"""Speech engines: text in, 16-bit mono PCM out, sentence by sentence.

:class:`PiperEngine` (engine key ``piper``) speaks with a Piper voice shipped in
a Python package: the registry's ``options.voice_package`` names the package
and ``options.voice_file`` the ``.onnx`` voice inside it (its ``.onnx.json``
config sits next to it). The voice loads on the engine's worker thread.
:meth:`PiperEngine.synthesize` yields each sentence's PCM as soon as Piper has
produced it; the speaking rate maps to Piper's ``length_scale`` (``1 / speed``).
Closing the iterator stops the synthesis before the next sentence.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.common.engine import EnginePool, EngineUnavailable, RegistryEngine, build_engine_pool
from services.common.registry import VOICE_CLONE, ModelSpec, Registry
from services.common.runner import Progress, StepControl
from services.tts.rules import DEFAULT_MAX_CHARS, check_speech

if TYPE_CHECKING:
    from services.tts.cloning import CloneEngine

#: The registry capability of speech models.
SPEECH = "speech"
#: The voice used when a request names none.
DEFAULT_SPEECH_MODEL = "piper-joe"


@dataclass(frozen=True)
class SpeechRequest:
    """What to say and how fast (1.0 is the voice's own rate)."""

    text: str
    speed: float = 1.0


@dataclass(frozen=True)
class SpeechChunk:
    """One sentence's audio: 16-bit little-endian mono PCM."""

    pcm: bytes


@dataclass(frozen=True)
class SpeechDone:
    """The end of a synthesis."""

    samples: int
    sample_rate: int
    queue_ms: float
    synthesis_ms: float


#: A speech job, run on the engine's worker thread: it hands each chunk's PCM to
#: ``emit``, then reports a step on ``control``; it returns the samples produced.
PcmJob = Callable[[StepControl, Callable[[bytes], None]], int]


async def stream_pcm(
    engine: RegistryEngine[Any, Any], job: PcmJob, *, sample_rate: int, request_id: str, label: str
) -> AsyncGenerator[Progress | SpeechChunk | SpeechDone, None]:
    """Runs ``job`` on the engine's worker: a :class:`SpeechChunk` per step as it is
    reported (in order), then :class:`SpeechDone`. Closing the iterator cancels the job."""
    produced: collections.deque[bytes] = collections.deque()
    started = time.perf_counter()
    async with engine.runner.start(
        lambda control: job(control, produced.append), key=request_id, label=label
    ) as running:
        async for _ in running:
            yield SpeechChunk(produced.popleft())
    outcome = running.outcome
    yield SpeechDone(
        samples=int(outcome.value),
        sample_rate=sample_rate,
        queue_ms=outcome.queue_ms,
        synthesis_ms=(time.perf_counter() - started) * 1000 - outcome.queue_ms,
    )


async def pcm_of(
    events: AsyncGenerator[Progress | SpeechChunk | SpeechDone, None],
) -> AsyncGenerator[bytes, None]:
    """The PCM of a :func:`stream_pcm` stream's chunks (closing this closes that)."""
    async with aclosing(events):
        async for event in events:
            if isinstance(event, SpeechChunk):
                yield event.pcm


@dataclass(frozen=True)
class VoiceInfo:
    """A voice's language and sample rate, read from its config."""

    language: str
    sample_rate: int


def package_directory(package: str) -> Path:
    """The directory of an installed Python package (where a packaged voice lives)."""
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        raise EngineUnavailable(f"the Python package '{package}' that holds the voice is not installed")
    return Path(next(iter(found.submodule_search_locations)))


def voice_path(spec: ModelSpec) -> Path:
    """The ``.onnx`` voice of a speech model (``options.voice_package`` / ``options.voice_file``)."""
    voice_file = str(spec.options.get("voice_file", ""))
    if not voice_file:
        raise EngineUnavailable("the piper engine needs options.voice_file")
    path = package_directory(str(spec.options.get("voice_package", ""))) / voice_file
    if not path.is_file():
        raise EngineUnavailable(f"the voice file {path} is missing")
    return path


def voice_info(spec: ModelSpec) -> VoiceInfo:
    """Language and sample rate of a speech model, from its voice config (blocking, cheap)."""
    config = json.loads(Path(f"{voice_path(spec)}.json").read_text(encoding="utf-8"))
    language = str(spec.options.get("language") or config.get("language", {}).get("code", ""))
    return VoiceInfo(language=language, sample_rate=int(config["audio"]["sample_rate"]))


class SpeechEngine(RegistryEngine[SpeechRequest, SpeechChunk | SpeechDone]):
    """A speech engine: :meth:`synthesize` streams PCM; ``sample_rate`` once loaded."""

    sample_rate: int = 0
    language: str = ""

    def __init__(self, spec: ModelSpec, *, max_chars: int = DEFAULT_MAX_CHARS, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        #: The longest text to speak (``max_speech_chars``).
        self.max_chars = max_chars

    def check(self, text: str, speed: float = 1.0) -> None:
        check_speech(text, speed, max_chars=self.max_chars)


class PiperEngine(SpeechEngine):
    """A Piper voice from an installed package, one sentence at a time."""

    def __init__(self, spec: ModelSpec, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        self.voice: Any = None

    def load_blocking(self) -> None:
        try:
            from piper import PiperVoice
        except ImportError as exc:
            raise EngineUnavailable("piper-tts is not installed") from exc
        path = voice_path(self.spec)
        self.voice = PiperVoice.load(path)
        self.sample_rate = int(self.voice.config.sample_rate)
        self.language = voice_info(self.spec).language

    def close_blocking(self) -> None:
        self.voice = None

    async def run(
        self, request: SpeechRequest, *, request_id: str = ""
    ) -> AsyncGenerator[Progress | SpeechChunk | SpeechDone, None]:
        self.check(request.text, request.speed)
        from piper import SynthesisConfig

        voice = self.voice
        config = SynthesisConfig(length_scale=voice.config.length_scale / request.speed)

        def job(control: StepControl, emit: Callable[[bytes], None]) -> int:
            samples = 0
            for index, chunk in enumerate(voice.synthesize(request.text, syn_config=config), start=1):
                pcm = chunk.audio_int16_bytes
                samples += len(pcm) // 2
                emit(pcm)
                control.step(index)
            return samples

        events = stream_pcm(
            self, job, sample_rate=self.sample_rate, request_id=request_id, label="synthesize"
        )
        async with aclosing(events):
            async for event in events:
                yield event


def engine_classes() -> dict[str, type[SpeechEngine] | type[CloneEngine]]:
    """Engine key (registry ``engine``) -> class: Piper voices and Qwen3-TTS cloning."""
    from services.tts.cloning import CloneEngine

    return {"piper": PiperEngine, "qwen3_tts": CloneEngine}


def build_speech_pool(
    registry: Registry,
    *,
    cache_dir: Path,
    max_chars: int = DEFAULT_MAX_CHARS,
    default: str = DEFAULT_SPEECH_MODEL,
    torch_threads: int | None = None,
) -> EnginePool[SpeechEngine | CloneEngine]:
    """One engine per speech and voice-cloning model of the registry (not loaded yet)."""

    return build_engine_pool(
        registry,
        [*registry.for_capability(SPEECH), *registry.for_capability(VOICE_CLONE)],
        engine_classes(),
        service="tts",
        cache_dir=cache_dir,
        torch_threads=torch_threads,
        default=default,
        options={"max_chars": max_chars},
    )
