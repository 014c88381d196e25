"""Image-to-video engines on diffusers' ``WanImageToVideoPipeline`` (Wan 2.2, TurboDiffusion).

The registry's ``engine`` key picks the class (:data:`ENGINE_CLASSES`):
``"wan_i2v"`` is :class:`WanI2VEngine`. Weights come from the registry's
directory (a diffusers ``WanImageToVideoPipeline`` layout: Wan 2.2 A14B's two
transformers, high-noise and low-noise, split at the pipeline's
``boundary_ratio``; its VAE and UMT5 text encoder), or, for
``weights = "tiny"``, from a tiny random-weight model of the same
architecture built on first use (:mod:`services.video.tiny`); both load
through the pipeline's own ``from_pretrained``.

One request is one job on the engine's worker thread (diffusers pipelines keep
per-call state and are not thread-safe):

1. The input image is scaled and centre-cropped to the output size
   (:func:`services.video.rules.video_size` chose it).
2. The pipeline denoises to latents (``output_type="latent"``). Each finished
   step is a :class:`~services.common.runner.Progress`; a cancelled consumer
   stops it at the next step. Samplers, both flow-matching Euler with the
   registry's ``options.shift`` (else the checkpoint scheduler's shift):
   ``use_ode`` runs the deterministic ODE step; otherwise the stochastic one
   (each step predicts the clean latents and re-noises them to the next noise
   level with fresh noise, as TurboDiffusion's default sampler does). Both
   draw every random number (initial noise, re-noising) from one
   ``torch.Generator`` seeded per request, so the same seed and inputs give
   the same video either way, byte for byte.
3. The latents are decoded by the VAE one latent frame at a time
   (:func:`decode_latents`: the VAE's own causal loop, which yields 1 frame,
   then 4 per latent frame), and every decoded frame goes straight to the
   H.264 encoder (:class:`services.common.media.video.Mp4Encoder`); the job checks
   for cancellation between latent frames. At no time are all frames held,
   neither as floats nor as bytes.

Timing: ``inference_ms`` is the job minus the time spent in the encoder
(denoising and VAE decoding), ``encode_ms`` the encoder's share.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image, ImageOps

from services.common.engine import EnginePool, EngineUnavailable, RegistryEngine
from services.common.engine import build_engine_pool as build_pool
from services.common.errors import InvalidRequest, ProcessingError
from services.common.media.video import MP4_MIME_TYPE, Mp4Encoder
from services.common.model_cache import MODEL_LOAD_LOCK, ensure_tiny_model_directory
from services.common.registry import (
    DEFAULT_VIDEO_MODEL,
    IMAGE_TO_VIDEO,
    MAX_SEED,
    ModelSpec,
    Registry,
)
from services.common.runner import Progress, StepControl
from services.video.rules import DEFAULT_SHIFT, FRAME_GROUP, VideoParams
from services.video.tiny import TINY_VERSION, build_tiny_wan_i2v


class SeededFlowMatchEulerScheduler(FlowMatchEulerDiscreteScheduler):  # type: ignore[misc]
    """Flow-matching Euler whose stochastic steps draw from the request's generator.

    ``WanImageToVideoPipeline`` calls ``scheduler.step`` without a generator;
    with ``stochastic_sampling`` the re-noising would then come from torch's
    global generator (not reproducible, shared by every thread). The engine
    sets :attr:`noise_generator` to the job's seeded generator instead.
    """

    noise_generator: torch.Generator | None = None

    def step(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("generator") is None:
            kwargs["generator"] = self.noise_generator
        return super().step(*args, **kwargs)  # type: ignore[misc]


def decode_latents(vae: Any, latents: torch.Tensor) -> Generator[torch.Tensor, None, None]:
    """Decodes Wan latents one latent frame at a time; yields pixel chunks ``(B, 3, t, H, W)`` in [-1, 1].

    The same computation as ``AutoencoderKLWan.decode`` (the pipeline's
    de-normalisation, then the VAE's causal loop over latent frames with its
    feature cache: 1 frame for the first latent frame, 4 for each next one),
    but each chunk is handed out as soon as it is decoded instead of being
    concatenated into the whole video. Blocking; the VAE's cache is cleared
    when the iterator ends or is closed.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    config = vae.config
    z = latents.to(dtype=vae.dtype)
    mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(z.device, z.dtype)
    inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(z.device, z.dtype)
    z = z / inverse_std + mean
    vae.clear_cache()
    try:
        x = vae.post_quant_conv(z)
        for index in range(x.shape[2]):
            vae._conv_idx = [0]
            out = vae.decoder(
                x[:, :, index : index + 1],
                feat_cache=vae._feat_map,
                feat_idx=vae._conv_idx,
                first_chunk=index == 0,
            )
            if config.patch_size is not None:
                out = unpatchify(out, patch_size=config.patch_size)
            yield torch.clamp(out, min=-1.0, max=1.0)
    finally:
        vae.clear_cache()


def to_rgb_frames(chunk: torch.Tensor) -> Iterator[np.ndarray]:
    """The frames of a decoded chunk ``(1, 3, t, H, W)`` in [-1, 1] as ``(H, W, 3)`` uint8 arrays.

    The same rounding as diffusers' video post-processing.
    """
    pixels = ((chunk[0] / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)  # (3, t, H, W)
    for index in range(pixels.shape[1]):
        yield np.ascontiguousarray(pixels[:, index].permute(1, 2, 0).numpy())


@dataclass(frozen=True)
class VideoRequest:
    """A checked image-to-video request: the decoded first frame and every setting filled."""

    image: Image.Image
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    steps: int
    guidance_scale: float
    use_ode: bool
    fps: float
    seed: int | None = None
    resolution: str = ""

    @classmethod
    def from_params(cls, params: VideoParams, *, image: Image.Image, width: int, height: int) -> VideoRequest:
        return cls(
            image=image,
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            width=width,
            height=height,
            num_frames=params.num_frames,
            steps=params.steps,
            guidance_scale=params.guidance_scale,
            use_ode=params.use_ode,
            fps=params.fps,
            seed=params.seed,
            resolution=params.resolution,
        )


@dataclass(frozen=True)
class VideoResult:
    """A finished video: the MP4 file, what it holds and how long each phase took."""

    mp4: bytes
    num_frames: int
    fps: float
    width: int
    height: int
    seed: int
    model: str
    steps: int
    use_ode: bool
    guidance_scale: float
    resolution: str
    queue_ms: float
    inference_ms: float
    encode_ms: float
    mime_type: str = MP4_MIME_TYPE

    @property
    def duration_seconds(self) -> float:
        return self.num_frames / self.fps


@dataclass(frozen=True)
class EncodedVideo:
    """An MP4 file, its frame count and the time spent in the H.264 encoder."""

    mp4: bytes
    frames: int
    encode_ms: float


class WanI2VEngine(RegistryEngine[VideoRequest, VideoResult]):
    """Wan 2.2 image-to-video through ``WanImageToVideoPipeline`` (see the module doc)."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        weights_dir: Path | None,
        cache_dir: Path,
        torch_threads: int | None = None,
    ) -> None:
        super().__init__(spec, weights_dir=weights_dir, cache_dir=cache_dir, torch_threads=torch_threads)
        #: The pipeline per sampler: ``True`` = ODE, ``False`` = stochastic (shared components).
        self.pipes: dict[bool, Any] = {}
        #: Output sides must be multiples of this (VAE spatial scale x patch size).
        self.pixel_multiple = 16
        #: Frames per latent frame (num_frames must be 1 more than a multiple).
        self.frame_group = FRAME_GROUP

    # --- lifecycle (worker thread) ---

    def load_blocking(self) -> None:
        from diffusers.utils import is_ftfy_available

        if not is_ftfy_available():
            raise EngineUnavailable(
                "the ftfy package is not installed (diffusers' Wan pipeline cleans prompts with it)"
            )
        self.prepare_pipeline_load()
        with MODEL_LOAD_LOCK:
            directory = self.weights_dir or ensure_tiny_model_directory(
                self.cache_dir, self.spec.id, build_tiny_wan_i2v, version=TINY_VERSION
            )
            self.pipes = self.load_pipelines(directory)
        pipe = self.pipes[True]
        patch = (pipe.transformer or pipe.transformer_2).config.patch_size
        self.pixel_multiple = int(pipe.vae_scale_factor_spatial) * int(patch[1])
        self.frame_group = int(pipe.vae_scale_factor_temporal)

    def load_pipelines(self, directory: Path) -> dict[bool, Any]:
        """The checkpoint's pipeline twice over the same components: ODE and stochastic sampler."""
        from diffusers import WanImageToVideoPipeline

        pipe = WanImageToVideoPipeline.from_pretrained(directory, local_files_only=True)
        shift = self.spec.options.get("shift")
        if shift is None:
            saved = pipe.scheduler.config
            shift = saved.get("shift", saved.get("flow_shift", DEFAULT_SHIFT))
        components = {name: value for name, value in pipe.components.items() if name != "scheduler"}
        pipes = {}
        for ode in (True, False):
            sampler = SeededFlowMatchEulerScheduler(shift=float(shift), stochastic_sampling=not ode)
            sampled: Any = WanImageToVideoPipeline(
                **components,
                scheduler=sampler,
                boundary_ratio=pipe.config.boundary_ratio,
                expand_timesteps=pipe.config.expand_timesteps,
            )
            sampled.set_progress_bar_config(disable=True)
            pipes[ode] = sampled
        return pipes

    def close_blocking(self) -> None:
        self.pipes = {}

    # --- requests ---

    def check_request(self, request: VideoRequest) -> None:
        """The loaded pipeline's own rules (size multiple, 4k+1 frames), checked before queueing."""
        m = self.pixel_multiple
        if request.width % m or request.height % m:
            raise InvalidRequest(
                f"The size {request.width}x{request.height} must be made of multiples of {m} "
                f"for the {self.spec.id} model"
            )
        if (request.num_frames - 1) % self.frame_group:
            raise InvalidRequest(
                f"'num_frames' must be {self.frame_group}k+1 for the {self.spec.id} model; "
                f"got {request.num_frames}"
            )

    async def run(
        self, request: VideoRequest, *, request_id: str = ""
    ) -> AsyncGenerator[Progress | VideoResult, None]:
        self.require_ready()
        self.check_request(request)
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)

        def job(control: StepControl) -> EncodedVideo:
            torch.set_flush_denormal(True)  # per thread: random tiny weights make denormals
            generator = torch.Generator(device="cpu").manual_seed(seed)
            with torch.inference_mode():
                return self.generate_blocking(request, generator, control)

        label = (
            f"{self.spec.id} {request.width}x{request.height} {request.num_frames} frames "
            f"{request.steps} steps {'ode' if request.use_ode else 'sde'}"
        )
        async with self.runner.start(job, key=request_id, label=label) as running:
            async for progress in running:
                yield progress
        outcome = running.outcome
        encoded = outcome.value
        if encoded.frames != request.num_frames:
            raise ProcessingError(
                f"The model produced {encoded.frames} frames instead of {request.num_frames}."
            )
        yield VideoResult(
            mp4=encoded.mp4,
            num_frames=encoded.frames,
            fps=request.fps,
            width=request.width,
            height=request.height,
            seed=seed,
            model=self.spec.id,
            steps=request.steps,
            use_ode=request.use_ode,
            guidance_scale=request.guidance_scale,
            resolution=request.resolution,
            queue_ms=outcome.queue_ms,
            inference_ms=max(0.0, outcome.run_ms - encoded.encode_ms),
            encode_ms=encoded.encode_ms,
        )

    def denoise_blocking(
        self, request: VideoRequest, generator: torch.Generator, control: StepControl
    ) -> torch.Tensor:
        """Runs the pipeline to latents (worker thread); reports each step to ``control``."""
        pipe = self.pipes[request.use_ode]
        size = (request.width, request.height)
        image = request.image.convert("RGB")
        if image.size != size:
            image = ImageOps.fit(image, size, Image.Resampling.LANCZOS)
        pipe.scheduler.noise_generator = generator
        try:
            output = pipe(
                image=image,
                prompt=request.prompt,
                negative_prompt=request.negative_prompt or None,
                height=request.height,
                width=request.width,
                num_frames=request.num_frames,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                generator=generator,
                output_type="latent",
                callback_on_step_end=control.diffusers_callback(request.steps),
            )
        finally:
            pipe.scheduler.noise_generator = None
        latents: torch.Tensor = output.frames
        return latents

    def generate_blocking(
        self, request: VideoRequest, generator: torch.Generator, control: StepControl
    ) -> EncodedVideo:
        """Denoises, then decodes latent frame by latent frame into the MP4 encoder (worker thread)."""
        latents = self.denoise_blocking(request, generator, control)
        return encode_latents_mp4(
            self.pipes[request.use_ode].vae,
            latents,
            width=request.width,
            height=request.height,
            fps=request.fps,
            check=control.check,
        )


def encode_latents_mp4(
    vae: Any,
    latents: torch.Tensor,
    *,
    width: int,
    height: int,
    fps: float,
    check: Callable[[], None] | None = None,
) -> EncodedVideo:
    """Decodes latents chunk by chunk straight into an MP4 (blocking; call under inference mode).

    Each latent frame's pixels are decoded (:func:`decode_latents`), turned
    into uint8 frames and encoded before the next is decoded; ``check`` runs
    between latent frames (it raises to stop, e.g. on cancellation).
    """
    encode_s = 0.0
    with Mp4Encoder(width, height, fps) as encoder:
        chunks = decode_latents(vae, latents)
        try:
            for chunk in chunks:
                for frame in to_rgb_frames(chunk):
                    started = time.perf_counter()
                    encoder.add(frame)
                    encode_s += time.perf_counter() - started
                del chunk
                if check is not None:
                    check()
        finally:
            chunks.close()
        started = time.perf_counter()
        mp4 = encoder.finish()
        encode_s += time.perf_counter() - started
        return EncodedVideo(mp4=mp4, frames=encoder.frames, encode_ms=encode_s * 1000)


#: Registry ``engine`` key -> engine class.
ENGINE_CLASSES: dict[str, type[WanI2VEngine]] = {"wan_i2v": WanI2VEngine}


def served_models(registry: Registry) -> list[ModelSpec]:
    """The registry's image-to-video models, in file order."""
    return registry.for_capability(IMAGE_TO_VIDEO)


def build_engine_pool(
    registry: Registry,
    *,
    cache_dir: Path,
    torch_threads: int | None = None,
    default: str = DEFAULT_VIDEO_MODEL,
    engine_classes: dict[str, type[WanI2VEngine]] | None = None,
) -> EnginePool[WanI2VEngine]:
    """One engine per image-to-video model of the registry (not loaded yet)."""
    return build_pool(
        registry,
        served_models(registry),
        ENGINE_CLASSES if engine_classes is None else engine_classes,
        service="video",
        cache_dir=cache_dir,
        torch_threads=torch_threads,
        default=default,
    )
