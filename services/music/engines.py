"""Music engines: ACE-Step 1.5 through diffusers' ``AceStepPipeline``.

:class:`AceStepEngine` (registry engine key ``ace_step``) serves the three
tasks of the contract with one pipeline:

* **text2music** (``/v1/music/generate``): a style prompt, optional lyrics and
  metadata in, ``duration_seconds`` of music out.
* **cover** (``/v1/music/cover``): the source song is encoded by the VAE and
  turned into ACE-Step's semantic tokens (the audio tokenizer and
  detokenizer), which shape the new song while the prompt and lyrics restyle
  it; ``audio_cover_strength`` (ACE-Step's own parameter, 0 to 1, default 1)
  blends in free text-to-music generation below 1 (one more transformer pass
  per step). No timbre reference is given: the model's learned silence
  latent stands in, so the prompt decides the sound. The output is exactly
  as long as the source.
* **repaint** (``/v1/music/repaint``): ACE-Step regenerates the latent frames
  of [start, end) with the rest of the song as context. The output is then
  spliced sample by sample: **outside [start, end) it is the source's samples,
  copied exactly**; inside it is the new audio, scaled to the source's
  loudness (the RMS ratio of source and model output outside the region,
  bounded to x0.25..x4, since the pipeline peak-normalises its output), with
  a linear crossfade over the first and last :data:`CROSSFADE_SECONDS`
  (20 ms; at most a quarter of the region) *inside* the region. The output
  is exactly as long as the source.

Weights come from the registry's directory (a diffusers ``AceStepPipeline``
directory such as ``ACE-Step/acestep-v15-turbo-diffusers``) or, for
``weights = "tiny"``, from a tiny random-weight model of the same
architecture (:mod:`services.music.tiny`); both go through
``AceStepPipeline.from_pretrained``.

Audio is float32 ``(channels, samples)`` at the model's rate (48 kHz stereo
for ACE-Step 1.5 and the tiny model). Sources are resampled to it (PyAV)
and mono sources are copied to both channels (more than two channels are
averaged first). Output is trimmed to the requested duration exactly (the
pipeline itself makes whole latent frames, one VAE hop each: 1920 samples,
40 ms) and delivered as 16-bit little-endian PCM, channels interleaved.

Request rules (all :class:`~services.common.errors.InvalidRequest`):
``prompt`` required, at most ``max_prompt_chars``; ``lyrics`` at most
:data:`MAX_LYRICS_CHARS` and empty when ``instrumental`` (ACE-Step then gets
its ``[Instrumental]`` lyric); ``bpm`` 30 to 300; ``key_scale`` a note A-G
with an optional ``#``/``b`` and ``major``/``minor`` ("C Major", "F# minor";
handed to the model as "C major"); ``time_signature`` "beats/unit" with beats
1 to 16 and unit 1, 2, 4, 8, 16 or 32 ("4/4"; the model gets the beats, as
ACE-Step's "4"); ``vocal_language`` an ISO 639 code or "unknown" ("en" by
default); ``duration_seconds`` from :data:`MIN_DURATION_SECONDS` to the
model's ``max_duration_seconds`` (ACE-Step 1.5's ten minutes in the shipped
registry), :data:`DEFAULT_DURATION_SECONDS` by default; sources from 1 s to
the same maximum; ``audio_cover_strength`` 0 to 1; a repaint region with
0 <= start < end <= the song's length and at least one latent frame long;
``num_inference_steps`` 1 to the model's ``max_steps``.

A request runs as one job on the engine's worker thread (a pipeline is not
thread-safe). Each denoising step is reported as :class:`Progress`; a
cancelled consumer stops the pipeline at its next step. The same seed gives
the same audio: the initial noise comes from a ``torch.Generator`` seeded per
request, and the VAE's posterior sampling of a source (which diffusers draws
from torch's global generator) runs under ``torch.random.fork_rng`` seeded
with the request's seed, so covers and repaints are repeatable as long as no
other engine in the same process draws from torch's global generator at the
same moment (true when music runs in its own process).
"""

from __future__ import annotations

import asyncio
import math
import re
import secrets
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.common.engine import EnginePool, EngineUnavailable, RegistryEngine, build_engine_pool
from services.common.errors import InvalidRequest, ProcessingError, quoted
from services.common.media.audio import AUDIO_LAYOUTS
from services.common.model_cache import MODEL_LOAD_LOCK
from services.common.registry import DEFAULT_MUSIC_MODEL, MAX_SEED, MUSIC, ModelSpec, Registry
from services.common.runner import JobOutcome, Progress, StepControl
from services.music.tiny import ensure_tiny_ace_step

#: Shortest song generated or accepted as a source, in seconds.
MIN_DURATION_SECONDS = 1.0
#: Length of a generated song when the request gives none (the contract's example).
DEFAULT_DURATION_SECONDS = 30.0
#: Longest song when the registry sets no ``max_duration_seconds`` (ACE-Step 1.5's ten minutes).
DEFAULT_MAX_DURATION_SECONDS = 600.0
#: Accepted tempo (ACE-Step's range).
MIN_BPM = 30
MAX_BPM = 300
#: Longest lyrics in characters (ACE-Step encodes at most 2048 lyric tokens).
MAX_LYRICS_CHARS = 4096
#: Longest prompt when the caller sets no limit (``settings.max_prompt_chars``' default).
DEFAULT_MAX_PROMPT_CHARS = 4000
#: Language of the lyrics when the request gives none.
DEFAULT_VOCAL_LANGUAGE = "en"
#: Length of the crossfade at each edge of a repainted region, inside the region.
CROSSFADE_SECONDS = 0.02
#: Bounds of the loudness match of a repainted region.
REPAINT_GAIN_RANGE = (0.25, 4.0)
#: Lyric ACE-Step is given for instrumental music.
INSTRUMENTAL_LYRICS = "[Instrumental]"
#: Time signature units accepted (the lower number), and the most beats per bar.
TIME_SIGNATURE_UNITS = (1, 2, 4, 8, 16, 32)
MAX_BEATS_PER_BAR = 16

#: Longest key_scale / time_signature / vocal_language accepted: checked before any
#: pattern runs (the patterns backtrack on long runs of spaces).
MAX_CONDITION_CHARS = 32

_KEY_SCALE = re.compile(r"^\s*([A-Ga-g])\s*([#b\u266f\u266d]?)\s+(major|minor)\s*$", re.IGNORECASE)
_TIME_SIGNATURE = re.compile(r"^\s*(\d{1,3})\s*/\s*(\d{1,3})\s*$")
_LANGUAGE = re.compile(r"^[a-z]{2,3}(-[a-z0-9]{2,8})?$")


class TaskType(StrEnum):
    """ACE-Step's task types that the contract exposes."""

    TEXT2MUSIC = "text2music"
    COVER = "cover"
    REPAINT = "repaint"


@dataclass(frozen=True)
class MusicConditions:
    """Checked and normalised text conditions of a request (what ACE-Step's prompt templates take)."""

    prompt: str
    lyrics: str = ""
    bpm: int | None = None
    #: "C major", "F# minor"; None: the model chooses.
    key_scale: str | None = None
    #: "4/4"; None: the model chooses.
    time_signature: str | None = None
    vocal_language: str = DEFAULT_VOCAL_LANGUAGE
    instrumental: bool = False

    @property
    def model_lyrics(self) -> str:
        return INSTRUMENTAL_LYRICS if self.instrumental else self.lyrics

    @property
    def model_time_signature(self) -> str | None:
        """ACE-Step's form: the beats per bar ("4" for 4/4)."""
        return self.time_signature.split("/")[0] if self.time_signature else None


def parse_key_scale(value: str) -> str | None:
    """ "C Major" / "f# minor" / "Bb MAJOR" -> "C major" / "F# minor" / "Bb major"; None when empty."""
    if not value.strip():
        return None
    found = _KEY_SCALE.match(value) if len(value) <= MAX_CONDITION_CHARS else None
    if found is None:
        raise InvalidRequest(
            f"Invalid key_scale '{quoted(value)}': use a note A-G with an optional '#' or 'b' and 'major' or "
            "'minor', e.g. 'C Major' or 'F# minor'"
        )
    note, accidental, mode = found.groups()
    accidental = {"\u266f": "#", "\u266d": "b"}.get(accidental, accidental)
    return f"{note.upper()}{accidental} {mode.lower()}"


def parse_time_signature(value: str) -> str | None:
    """ "4/4" -> "4/4"; None when empty."""
    if not value.strip():
        return None
    found = _TIME_SIGNATURE.match(value) if len(value) <= MAX_CONDITION_CHARS else None
    units = ", ".join(map(str, TIME_SIGNATURE_UNITS))
    message = (
        f"Invalid time_signature '{quoted(value)}': use beats/unit with 1 to {MAX_BEATS_PER_BAR} beats and a unit "
        f"of {units}, e.g. '4/4', '3/4' or '6/8'"
    )
    if found is None:
        raise InvalidRequest(message)
    beats, unit = int(found.group(1)), int(found.group(2))
    if not 1 <= beats <= MAX_BEATS_PER_BAR or unit not in TIME_SIGNATURE_UNITS:
        raise InvalidRequest(message)
    return f"{beats}/{unit}"


def music_conditions(
    *,
    prompt: str,
    lyrics: str = "",
    bpm: int | None = None,
    key_scale: str = "",
    time_signature: str = "",
    vocal_language: str = "",
    instrumental: bool = False,
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
) -> MusicConditions:
    """Checks a request's text conditions and normalises them (InvalidRequest on a bad one)."""
    if not prompt or not prompt.strip():
        raise InvalidRequest("'prompt' is required and must not be empty")
    if len(prompt) > max_prompt_chars:
        raise InvalidRequest(f"'prompt' is longer than {max_prompt_chars} characters")
    if len(lyrics) > MAX_LYRICS_CHARS:
        raise InvalidRequest(f"'lyrics' is longer than {MAX_LYRICS_CHARS} characters")
    if instrumental and lyrics.strip():
        raise InvalidRequest("'lyrics' must be empty when 'instrumental' is true")
    if bpm is not None and not MIN_BPM <= bpm <= MAX_BPM:
        raise InvalidRequest(f"'bpm' must be between {MIN_BPM} and {MAX_BPM}, not {bpm}")
    language = vocal_language.strip().lower() or DEFAULT_VOCAL_LANGUAGE
    if language != "unknown" and (len(language) > MAX_CONDITION_CHARS or not _LANGUAGE.match(language)):
        raise InvalidRequest(
            f"Invalid vocal_language '{quoted(vocal_language)}': use an ISO 639 language code such as 'en', 'zh' "
            "or 'ja', or 'unknown'"
        )
    return MusicConditions(
        prompt=prompt,
        lyrics=lyrics,
        bpm=bpm,
        key_scale=parse_key_scale(key_scale),
        time_signature=parse_time_signature(time_signature),
        vocal_language=language,
        instrumental=instrumental,
    )


def check_cover_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:  # also refuses NaN
        raise InvalidRequest(f"'audio_cover_strength' must be between 0 and 1, not {strength}")


def check_region_bounds(start: float, end: float | None) -> None:
    """The parts of a repaint region that do not depend on the song: 0 <= start < end."""
    if not start >= 0.0 or math.isinf(start):
        raise InvalidRequest(f"'start' must be 0 or more seconds, not {start}")
    if end is not None and (not end > start or math.isinf(end)):
        raise InvalidRequest(f"'end' ({end} s) must be after 'start' ({start} s)")


@dataclass(frozen=True)
class MusicRequest:
    """A checked music request (text conditions already normalised by :func:`music_conditions`).

    ``source`` is the decoded source song of a cover or repaint: float32
    ``(channels, samples)`` at the engine's sample rate and channel count
    (:func:`conform_audio`).
    """

    task: TaskType
    conditions: MusicConditions
    duration_seconds: float | None = None
    source: np.ndarray | None = None
    start_seconds: float = 0.0
    #: None: the end of the song.
    end_seconds: float | None = None
    cover_strength: float = 1.0
    seed: int | None = None
    steps: int | None = None


@dataclass(frozen=True)
class MusicResult:
    """Generated music: 16-bit little-endian PCM, channels interleaved, and how it was made."""

    pcm: bytes
    sample_rate: int
    channels: int
    samples: int
    seed: int
    model: str
    steps: int
    queue_ms: float
    inference_ms: float
    encode_ms: float

    @property
    def duration_seconds(self) -> float:
        return self.samples / self.sample_rate


def conform_audio(samples: np.ndarray, rate: int, *, sample_rate: int, channels: int) -> np.ndarray:
    """Decoded audio ``(frames, source channels)`` at ``rate`` -> float32 ``(channels, n)`` at ``sample_rate``.

    One channel is copied to every channel; more channels than wanted are
    averaged first. The rate is converted with FFmpeg's resampler (PyAV);
    audio already at the rate and channel count is returned unchanged.
    Blocking: run it off the event loop.
    """
    audio = np.ascontiguousarray(samples.T, dtype=np.float32)
    if audio.shape[0] != channels:
        mono = audio if audio.shape[0] == 1 else audio.mean(axis=0, keepdims=True, dtype=np.float32)
        audio = np.ascontiguousarray(np.repeat(mono, channels, axis=0))
    if rate == sample_rate:
        return audio
    import av

    layout = AUDIO_LAYOUTS[channels]
    frame = av.AudioFrame.from_ndarray(audio, format="fltp", layout=layout)
    frame.sample_rate = rate
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=sample_rate)
    parts = [f.to_ndarray() for f in resampler.resample(frame)]
    parts += [f.to_ndarray() for f in resampler.resample(None)]
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


def to_pcm16(audio: np.ndarray) -> bytes:
    """float32 ``(channels, n)`` in [-1, 1] -> 16-bit little-endian PCM, channels interleaved.

    The inverse of decoding 16-bit audio as ``sample / 32768``, so a decoded
    16-bit sample comes back exactly.
    """
    scaled = np.clip(np.round(audio * 32768.0), -32768, 32767).astype("<i2")
    return np.ascontiguousarray(scaled.T).tobytes()


def splice_repaint(source: np.ndarray, generated: np.ndarray, start: int, end: int, fade: int) -> np.ndarray:
    """The source with ``generated`` in samples [start, end), crossfaded over ``fade`` samples inside.

    Outside [start, end) the result is the source's samples exactly. The
    generated audio is first scaled to the source's loudness, measured outside
    the region (see the module docs).
    """
    outside = np.ones(source.shape[1], dtype=bool)
    outside[start:end] = False
    gain = 1.0
    if outside.any():
        src_rms = float(np.sqrt(np.mean(np.square(source[:, outside], dtype=np.float64))))
        gen_rms = float(np.sqrt(np.mean(np.square(generated[:, outside], dtype=np.float64))))
        if src_rms > 1e-6 and gen_rms > 1e-6:
            low, high = REPAINT_GAIN_RANGE
            gain = min(max(src_rms / gen_rms, low), high)
    result = source.copy()
    inner = np.clip(generated[:, start:end] * np.float32(gain), -1.0, 1.0)
    fade = max(0, min(fade, (end - start) // 2))
    if fade:
        ramp = (np.arange(1, fade + 1, dtype=np.float32) / np.float32(fade + 1))[None, :]
        inner[:, :fade] = source[:, start : start + fade] * (1 - ramp) + inner[:, :fade] * ramp
        tail = ramp[:, ::-1]
        inner[:, -fade:] = source[:, end - fade : end] * (1 - tail) + inner[:, -fade:] * tail
    result[:, start:end] = inner
    return result


def max_duration_seconds(spec: ModelSpec) -> float:
    """A music model's longest song: its ``max_duration_seconds``, else :data:`DEFAULT_MAX_DURATION_SECONDS`."""
    return float(spec.limits.max_duration_seconds or DEFAULT_MAX_DURATION_SECONDS)


class MusicEngine(RegistryEngine[MusicRequest, MusicResult]):
    """A music engine: ``sample_rate``, ``channels`` and ``hop`` (samples per latent frame) once loaded."""

    sample_rate: int = 0
    channels: int = 0
    hop: int = 0
    #: Whether the loaded weights can make covers.
    covers: bool = False

    @property
    def max_duration_seconds(self) -> float:
        return max_duration_seconds(self.spec)

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop if self.hop else 0.0

    def check_duration(self, seconds: float, what: str) -> None:
        most = self.max_duration_seconds
        if not MIN_DURATION_SECONDS <= seconds <= most:  # also refuses NaN
            raise InvalidRequest(
                f"{what} must be between {MIN_DURATION_SECONDS:g} and {most:g} seconds, not {seconds:g}"
            )

    def steps(self, requested: int | None) -> int:
        steps = self.spec.defaults.steps if requested is None else requested
        most = self.spec.limits.max_steps
        if not 1 <= steps <= most:
            raise InvalidRequest(f"'num_inference_steps' must be between 1 and {most}")
        return steps

    def check_request(self, request: MusicRequest) -> None:
        """Every rule that depends on the model or the source (the text conditions are checked already)."""
        self.steps(request.steps)
        if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
            raise InvalidRequest(f"'seed' must be between 0 and {MAX_SEED}")
        if request.task is TaskType.TEXT2MUSIC:
            duration = (
                DEFAULT_DURATION_SECONDS if request.duration_seconds is None else request.duration_seconds
            )
            self.check_duration(duration, "'duration'")
            return
        source = request.source
        if source is None or source.ndim != 2 or source.shape[0] != self.channels or not source.shape[1]:
            raise InvalidRequest("A source song is required")
        seconds = source.shape[1] / self.sample_rate
        self.check_duration(seconds, "The source song")
        if request.task is TaskType.COVER:
            check_cover_strength(request.cover_strength)
            if not self.covers:
                raise InvalidRequest(
                    f"Model '{self.spec.id}' cannot make covers: its weights have no audio tokenizer"
                )
            return
        check_region_bounds(request.start_seconds, request.end_seconds)
        end = seconds if request.end_seconds is None else request.end_seconds
        if request.start_seconds >= seconds or end > seconds + 0.5 / self.sample_rate:
            raise InvalidRequest(
                f"The region {request.start_seconds:g}-{end:g} s is beyond the end of the song "
                f"({seconds:g} s)"
            )
        if (end - request.start_seconds) * self.frames_per_second < 1.0:
            raise InvalidRequest(
                f"The region to repaint must be at least {1 / self.frames_per_second:g} seconds long "
                "(one frame of the model)"
            )


class AceStepEngine(MusicEngine):
    """ACE-Step 1.5 through ``diffusers.AceStepPipeline``."""

    def __init__(self, spec: ModelSpec, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        self.pipe: Any = None

    # --- lifecycle (worker thread) ---

    def load_blocking(self) -> None:
        from diffusers import AceStepPipeline

        self.prepare_pipeline_load()
        torch.set_flush_denormal(True)  # per thread: this worker thread runs every job
        with MODEL_LOAD_LOCK:
            directory: Path = self.weights_dir or ensure_tiny_ace_step(self.cache_dir, self.spec.id)
            pipe = AceStepPipeline.from_pretrained(directory, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        vae = pipe.vae.config
        self.sample_rate = int(pipe.sample_rate)
        self.channels = int(vae.audio_channels)
        self.hop = int(math.prod(vae.downsampling_ratios))
        if self.channels not in AUDIO_LAYOUTS:
            raise EngineUnavailable(f"its VAE makes {self.channels}-channel audio; 1 or 2 are supported")
        self.covers = pipe.audio_tokenizer is not None and pipe.audio_token_detokenizer is not None
        self.pipe = pipe

    def close_blocking(self) -> None:
        self.pipe = None

    # --- requests ---

    async def run(
        self, request: MusicRequest, *, request_id: str = ""
    ) -> AsyncGenerator[Progress | MusicResult, None]:
        self.require_ready()
        self.check_request(request)
        steps = self.steps(request.steps)
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)

        def job(control: StepControl) -> np.ndarray:
            return self.generate_blocking(request, seed, steps, control)

        outcome: JobOutcome[np.ndarray] | None = None
        label = f"{self.spec.id} {request.task} {steps} steps"
        async with aclosing(self.runner.stream(job, key=request_id, label=label)) as events:
            async for event in events:
                if isinstance(event, Progress):
                    yield event
                else:
                    outcome = event
        if outcome is None:  # the runner always ends with an outcome or an exception
            raise ProcessingError("Music generation ended without a result.")
        audio = outcome.value
        started = time.perf_counter()
        pcm = await asyncio.to_thread(to_pcm16, audio)
        yield MusicResult(
            pcm=pcm,
            sample_rate=self.sample_rate,
            channels=self.channels,
            samples=int(audio.shape[1]),
            seed=seed,
            model=self.spec.id,
            steps=steps,
            queue_ms=outcome.queue_ms,
            inference_ms=outcome.run_ms,
            encode_ms=(time.perf_counter() - started) * 1000,
        )

    def generate_blocking(
        self, request: MusicRequest, seed: int, steps: int, control: StepControl
    ) -> np.ndarray:
        """Runs the pipeline (worker thread) and shapes its output: float32 ``(channels, n)``."""
        conditions = request.conditions
        kwargs: dict[str, Any] = {
            "prompt": conditions.prompt,
            "lyrics": conditions.model_lyrics,
            "vocal_language": conditions.vocal_language,
            "bpm": conditions.bpm,
            "keyscale": conditions.key_scale,
            "timesignature": conditions.model_time_signature,
            "num_inference_steps": steps,
            "guidance_scale": self.spec.defaults.guidance_scale,
            "shift": float(self.spec.options.get("shift", 3.0)),
            "generator": torch.Generator(device="cpu").manual_seed(seed),
            "callback_on_step_end": control.diffusers_callback(steps),
            "output_type": "pt",
        }
        source = request.source
        if request.task is TaskType.TEXT2MUSIC or source is None:
            duration = (
                DEFAULT_DURATION_SECONDS if request.duration_seconds is None else request.duration_seconds
            )
            kwargs.update(task_type=TaskType.TEXT2MUSIC.value, audio_duration=duration)
            length = round(duration * self.sample_rate)
        else:
            length = source.shape[1]
            # Whole VAE hops in; the output is cut back to the source's length.
            padded = np.pad(source, ((0, 0), (0, -length % self.hop)))
            kwargs.update(
                task_type=request.task.value,
                src_audio=torch.from_numpy(padded),
                audio_duration=length / self.sample_rate,
            )
            if request.task is TaskType.COVER:
                kwargs["audio_cover_strength"] = request.cover_strength
            else:
                start_frame, end_frame = self._region_frames(request, length)
                # Frame centres, so the pipeline's int(seconds * frames per second) gives these frames.
                kwargs["repainting_start"] = (start_frame + 0.5) / self.frames_per_second
                kwargs["repainting_end"] = (end_frame + 0.5) / self.frames_per_second
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(seed)  # the VAE's posterior sampling of a source draws from here
            output = self.pipe(**kwargs).audios
        audio = output[0].float().cpu().numpy()[:, :length]
        if audio.shape[1] < length:  # never expected: the pipeline makes whole frames
            audio = np.pad(audio, ((0, 0), (0, length - audio.shape[1])))
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        if request.task is TaskType.REPAINT and source is not None:
            start, end = self._region_samples(request, length)
            fade = round(CROSSFADE_SECONDS * self.sample_rate)
            return splice_repaint(source, audio, start, end, min(fade, (end - start) // 4))
        return audio

    def _region_samples(self, request: MusicRequest, length: int) -> tuple[int, int]:
        start = min(length, round(request.start_seconds * self.sample_rate))
        end = length if request.end_seconds is None else round(request.end_seconds * self.sample_rate)
        return start, min(length, end)

    def _region_frames(self, request: MusicRequest, length: int) -> tuple[int, int]:
        """The latent frames covering the region's samples (start rounded down, end up)."""
        start, end = self._region_samples(request, length)
        frames = math.ceil(length / self.hop)
        return start // self.hop, min(frames, -(-end // self.hop))


#: Registry ``engine`` key -> engine class.
ENGINE_CLASSES: dict[str, type[MusicEngine]] = {"ace_step": AceStepEngine}


def build_music_pool(
    registry: Registry,
    *,
    cache_dir: Path,
    torch_threads: int | None = None,
    default: str = DEFAULT_MUSIC_MODEL,
) -> EnginePool[MusicEngine]:
    """One engine per music model of the registry (not loaded yet)."""
    return build_engine_pool(
        registry,
        registry.for_capability(MUSIC),
        ENGINE_CLASSES,
        service="music",
        cache_dir=cache_dir,
        torch_threads=torch_threads,
        default=default,
    )
