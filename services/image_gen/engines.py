"""Text-to-image engines on diffusers pipelines.

The registry's ``engine`` key picks the class (:data:`ENGINE_CLASSES`):
``"zimage"`` runs ``ZImagePipeline`` (Z-Image-Turbo), ``"longcat"`` runs
``LongCatImagePipeline`` (LongCat-Image). Weights come from the registry's
directory, or, for ``weights = "tiny"``, from a tiny random-weight model of the
same architecture built on first use (:mod:`services.image_gen.tiny`); both are
loaded by the pipeline's own ``from_pretrained``.

A request runs as one job on the engine's worker thread (one at a time: a
diffusers pipeline keeps per-call state on itself and is not thread-safe).
Each finished denoising step is reported as :class:`Progress`; a cancelled
consumer stops the pipeline at its next step. A ``torch.Generator`` seeded
per request makes the same seed give the same pixels, and the fixed PNG
encoder (:func:`services.common.media.encode_image`) the same bytes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from transformers.utils import logging as transformers_logging

from services.common.engine import (
    MODEL_LOAD_LOCK,
    Engine,
    EnginePool,
    EngineUnavailable,
    JobOutcome,
    Progress,
    StepControl,
)
from services.common.errors import InvalidRequest, ProcessingError
from services.common.media import encode_image, image_mime_type
from services.common.registry import MAX_SEED, GenerationParams, ModelSpec, Registry
from services.image_gen.tiny import build_tiny_longcat, build_tiny_zimage, ensure_tiny_model

log = logging.getLogger(__name__)

CAPABILITY = "text-to-image"


@dataclass(frozen=True)
class ImageRequest:
    """A checked text-to-image request (every default already filled)."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    count: int
    seed: int | None = None
    output_format: str = "png"

    @classmethod
    def from_params(cls, params: GenerationParams) -> ImageRequest:
        return cls(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            width=params.width,
            height=params.height,
            steps=params.steps,
            guidance_scale=params.guidance_scale,
            count=params.count,
            seed=params.seed,
        )


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    mime_type: str
    width: int
    height: int


@dataclass(frozen=True)
class ImageResult:
    """The outcome of one request: encoded images and how long each phase took."""

    images: tuple[EncodedImage, ...]
    seed: int
    model: str
    steps: int
    queue_ms: float
    inference_ms: float
    encode_ms: float


class DiffusersImageEngine(Engine[ImageRequest, ImageResult]):
    """A text-to-image engine on one diffusers pipeline class."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        weights_dir: Path | None,
        cache_dir: Path,
        torch_threads: int | None = None,
    ) -> None:
        super().__init__(spec.id)
        self.spec = spec
        self.weights_dir = weights_dir
        self.cache_dir = cache_dir
        self.torch_threads = torch_threads
        self.pipe: Any = None
        #: Width and height must be multiples of this (VAE scale x 2x2 patching).
        self.pixel_multiple = 16

    # --- lifecycle (worker thread) ---

    def load_blocking(self) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)  # process-wide, like the setting
        if self.weights_dir is not None and not (self.weights_dir / "model_index.json").is_file():
            log.error("model %s: no model_index.json in %s", self.spec.id, self.weights_dir)
            raise EngineUnavailable(
                f"its weights directory '{self.spec.weights}' does not hold a diffusers pipeline"
            )
        diffusers_logging.disable_progress_bar()  # logs, not terminal bars, in a server
        transformers_logging.disable_progress_bar()
        with MODEL_LOAD_LOCK:
            directory = self.weights_dir or ensure_tiny_model(self.cache_dir, self.spec.id, self.build_tiny)
            self.pipe = self.load_pipeline(directory)
        self.pipe.set_progress_bar_config(disable=True)
        self.pixel_multiple = int(self.pipe.vae_scale_factor) * 2

    def build_tiny(self, directory: Path) -> None:
        """Saves a tiny random-weight model of the architecture into ``directory``."""
        raise NotImplementedError

    def load_pipeline(self, directory: Path) -> Any:
        """Loads the pipeline from a Hugging Face-layout directory (tiny or real weights)."""
        raise NotImplementedError

    def close_blocking(self) -> None:
        self.pipe = None

    # --- requests ---

    async def run(
        self, request: ImageRequest, *, request_id: str = ""
    ) -> AsyncGenerator[Progress | ImageResult, None]:
        if not self.ready:
            raise InvalidRequest(
                f"Model '{self.spec.id}' is not available on this server: "
                f"{self.unavailable_reason or 'the model is still loading'}"
            )
        m = self.pixel_multiple
        if request.width % m or request.height % m:
            raise InvalidRequest(
                f"The dimensions {request.width}x{request.height} must be multiples of {m} "
                f"for the {self.spec.id} model"
            )
        mime_type = image_mime_type(request.output_format)
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)

        def job(control: StepControl) -> list[Image.Image]:
            generator = torch.Generator(device="cpu").manual_seed(seed)
            with torch.inference_mode():
                return self.generate_blocking(request, generator, control)

        outcome: JobOutcome[list[Image.Image]] | None = None
        label = f"{self.spec.id} {request.width}x{request.height} x{request.count} {request.steps} steps"
        async with aclosing(self.runner.stream(job, key=request_id, label=label)) as events:
            async for event in events:
                if isinstance(event, Progress):
                    yield event
                else:
                    outcome = event
        if outcome is None:  # the runner always ends with an outcome or an exception
            raise ProcessingError("Image generation ended without a result.")

        def encode() -> list[EncodedImage]:
            return [
                EncodedImage(encode_image(img, request.output_format), mime_type, img.width, img.height)
                for img in outcome.value
            ]

        started = time.perf_counter()
        images = await asyncio.to_thread(encode)
        yield ImageResult(
            images=tuple(images),
            seed=seed,
            model=self.spec.id,
            steps=request.steps,
            queue_ms=outcome.queue_ms,
            inference_ms=outcome.run_ms,
            encode_ms=(time.perf_counter() - started) * 1000,
        )

    def generate_blocking(
        self, request: ImageRequest, generator: torch.Generator, control: StepControl
    ) -> list[Image.Image]:
        """Runs the pipeline (worker thread); reports steps to ``control``."""
        raise NotImplementedError


class ZImageEngine(DiffusersImageEngine):
    """Z-Image-Turbo through ``diffusers.ZImagePipeline``."""

    def build_tiny(self, directory: Path) -> None:
        build_tiny_zimage(directory)

    def load_pipeline(self, directory: Path) -> Any:
        from diffusers import ZImagePipeline

        return ZImagePipeline.from_pretrained(directory, local_files_only=True)

    def generate_blocking(
        self, request: ImageRequest, generator: torch.Generator, control: StepControl
    ) -> list[Image.Image]:
        output = self.pipe(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            width=request.width,
            height=request.height,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=request.count,
            generator=generator,
            callback_on_step_end=control.diffusers_callback(request.steps),
            output_type="pil",
        )
        return list(output.images)


class _ControlledProgressBar:
    """Stands in for diffusers' tqdm bar: each ``update`` is a finished step."""

    def __init__(self, control: StepControl | None, total: int | None) -> None:
        self._control = control
        self._total = total
        self._done = 0

    def __enter__(self) -> _ControlledProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        self._done += n
        if self._control is not None:
            self._control.step(self._done, self._total)

    def close(self) -> None:
        return None


def _longcat_pipeline_class() -> type[Any]:
    """``LongCatImagePipeline`` whose progress bar reports steps to a StepControl.

    ``LongCatImagePipeline.__call__`` takes no ``callback_on_step_end``, but like
    every diffusers pipeline it ticks ``self.progress_bar`` once per denoising
    step; this subclass routes those ticks to the running job.
    """
    from diffusers import LongCatImagePipeline

    class SteppedLongCatImagePipeline(LongCatImagePipeline):  # type: ignore[misc]
        step_control: StepControl | None = None

        def progress_bar(self, iterable: Any = None, total: int | None = None) -> Any:
            if iterable is not None:
                return iterable
            return _ControlledProgressBar(self.step_control, total)

    return SteppedLongCatImagePipeline


class LongCatEngine(DiffusersImageEngine):
    """LongCat-Image through ``diffusers.LongCatImagePipeline``.

    The pipeline's optional prompt rewriting (a VLM generating a longer prompt
    through ``text_processor``) is off: it needs the Qwen2-VL processor, which
    does not work without torchvision, and it would multiply the cost of a
    request. So the ``text_processor`` component is not loaded.
    """

    def build_tiny(self, directory: Path) -> None:
        build_tiny_longcat(directory)

    def load_pipeline(self, directory: Path) -> Any:
        return _longcat_pipeline_class().from_pretrained(
            directory, text_processor=None, local_files_only=True
        )

    def generate_blocking(
        self, request: ImageRequest, generator: torch.Generator, control: StepControl
    ) -> list[Image.Image]:
        self.pipe.step_control = control
        try:
            output = self.pipe(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                width=request.width,
                height=request.height,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                num_images_per_prompt=request.count,
                generator=generator,
                output_type="pil",
                enable_prompt_rewrite=False,
            )
        finally:
            self.pipe.step_control = None
        return list(output.images)


#: Registry ``engine`` key -> engine class.
ENGINE_CLASSES: dict[str, type[DiffusersImageEngine]] = {"zimage": ZImageEngine, "longcat": LongCatEngine}


def build_engine_pool(
    registry: Registry,
    *,
    cache_dir: Path,
    torch_threads: int | None = None,
    default: str = "z-image-turbo",
    engine_classes: dict[str, type[DiffusersImageEngine]] | None = None,
) -> EnginePool:
    """One engine per text-to-image model of the registry (not loaded yet)."""
    classes = ENGINE_CLASSES if engine_classes is None else engine_classes
    engines: dict[str, Engine[Any, Any]] = {}
    unavailable: dict[str, str] = {}
    for spec in registry.for_capability(CAPABILITY):
        cls = classes.get(spec.engine)
        if cls is None:
            unavailable[spec.id] = f"image_gen has no engine '{spec.engine}' (known: {', '.join(classes)})"
            continue
        engines[spec.id] = cls(
            spec,
            weights_dir=spec.weights_path(registry.path),
            cache_dir=cache_dir,
            torch_threads=torch_threads,
        )
    return EnginePool(engines, default=default, unavailable=unavailable)
