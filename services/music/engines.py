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

The request rules live in :mod:`services.music.rules`; :meth:`MusicEngine.check_request`
applies those that need the model or the decoded source.

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
import secrets
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.common.engine import EnginePool, EngineUnavailable, RegistryEngine, build_engine_pool
from services.common.errors import InvalidRequest
from services.common.media.audio import AUDIO_LAYOUTS
from services.common.model_cache import MODEL_LOAD_LOCK
from services.common.registry import DEFAULT_MUSIC_MODEL, MAX_SEED, MUSIC, ModelSpec, Registry
from services.common.runner import Progress, StepControl
from services.music import rules
from services.music.rules import DEFAULT_DURATION_SECONDS, MusicConditions, max_duration_seconds
from services.music.tiny import ensure_tiny_ace_step

#: Length of the crossfade at each edge of a repainted region, inside the region.
CROSSFADE_SECONDS = 0.02
#: Bounds of the loudness match of a repainted region.
REPAINT_GAIN_RANGE = (0.25, 4.0)


class TaskType(StrEnum):
    """ACE-Step's task types that the contract exposes."""

    TEXT2MUSIC = "text2music"
    COVER = "cover"
    REPAINT = "repaint"


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
        rules.check_duration(seconds, what, most=self.max_duration_seconds)

    def steps(self, requested: int | None) -> int:
        return rules.check_steps(requested, default=self.spec.defaults.steps, most=self.spec.limits.max_steps)

    def check_request(self, request: MusicRequest) -> None:
        """Every rule (:mod:`services.music.rules`) that depends on the model or the source (the
        text conditions are checked already)."""
        self.steps(request.steps)
        rules.check_seed(request.seed)
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
            rules.check_cover_strength(request.cover_strength)
            rules.check_covers(self.spec.id, covers=self.covers)
            return
        rules.check_region_bounds(request.start_seconds, request.end_seconds)
        end = rules.check_region_in_song(
            request.start_seconds, request.end_seconds, seconds, sample_rate=self.sample_rate
        )
        rules.check_region_length(request.start_seconds, end, frames_per_second=self.frames_per_second)


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

        label = f"{self.spec.id} {request.task} {steps} steps"
        async with self.runner.start(job, key=request_id, label=label) as running:
            async for progress in running:
                yield progress
        outcome = running.outcome
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
