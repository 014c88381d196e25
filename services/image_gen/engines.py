"""Text-to-image and image editing engines on diffusers pipelines.

The registry's ``engine`` key picks the class (:data:`ENGINE_CLASSES`):

* ``"zimage"``: ``ZImagePipeline`` (Z-Image-Turbo); text-to-image only.
* ``"longcat"``: ``LongCatImagePipeline`` (LongCat-Image) for text-to-image and
  ``LongCatImageEditPipeline`` on the same components for edits of one input
  image. That pipeline always renders about one megapixel at the input's
  aspect ratio, so its output is fitted (scaled and centre-cropped, Lanczos)
  to the requested size. No masks.
* ``"flux2-klein"``: ``Flux2KleinPipeline`` (FLUX.2 [klein], distilled or base:
  the checkpoint's ``is_distilled`` decides whether guidance runs) for
  text-to-image and multi-reference edits (``image=[...]``), and
  ``Flux2KleinInpaintPipeline`` on the same components for edits with a mask.

Weights come from the registry's directory, or, for ``weights = "tiny"``, from
a tiny random-weight model of the same architecture built on first use
(:mod:`services.image_gen.tiny`); both are loaded by the pipeline's own
``from_pretrained``.

Input images and masks arrive decoded (``PIL.Image``); the servicer decodes
untrusted bytes through :mod:`services.common.media`. Masks follow OpenAI's
rule: a mask the size of the first input whose transparent (alpha 0) pixels
are repainted. The inpainting output keeps the opaque area's pixels exactly
(the generated image is composited over the input through the mask), as an
OpenAI edit does.

A request runs as one job on the engine's worker thread (one at a time: a
diffusers pipeline keeps per-call state on itself and is not thread-safe).
Each finished denoising step is reported as :class:`Progress`; a cancelled
consumer stops the pipeline at its next step. A ``torch.Generator`` seeded
per request makes the same seed give the same pixels, and the fixed encoders
(:func:`services.common.media.image.encode_image`) the same bytes, metadata
included.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

from services.common.engine import EnginePool, EngineUnavailable, RegistryEngine
from services.common.engine import build_engine_pool as build_pool
from services.common.errors import InvalidRequest
from services.common.media.image import encode_image, image_mime_type
from services.common.model_cache import MODEL_LOAD_LOCK, ensure_tiny_model_directory
from services.common.registry import (
    IMAGE_EDIT,
    MAX_SEED,
    TEXT_TO_IMAGE,
    ModelSpec,
    Registry,
)
from services.common.runner import Progress, StepControl
from services.image_gen.rules import GenerationParams
from services.image_gen.tiny import (
    TINY_VERSION,
    build_tiny_flux2_klein,
    build_tiny_longcat,
    build_tiny_zimage,
)

#: What this service's models do.
CAPABILITIES = (TEXT_TO_IMAGE, IMAGE_EDIT)


@dataclass(frozen=True)
class ImageRequest:
    """A checked text-to-image or edit request (every default already filled).

    ``inputs`` are the decoded input images of an edit (empty: text-to-image);
    ``mask`` an optional decoded mask (transparent pixels are repainted).
    """

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    count: int
    seed: int | None = None
    output_format: str = "png"
    #: Write prompt, negative prompt, model, seed and steps into the files.
    embed_metadata: bool = False
    inputs: tuple[Image.Image, ...] = ()
    mask: Image.Image | None = None

    @classmethod
    def from_params(
        cls,
        params: GenerationParams,
        *,
        inputs: tuple[Image.Image, ...] = (),
        mask: Image.Image | None = None,
    ) -> ImageRequest:
        return cls(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            width=params.width,
            height=params.height,
            steps=params.steps,
            guidance_scale=params.guidance_scale,
            count=params.count,
            seed=params.seed,
            output_format=params.output_format,
            embed_metadata=params.embed_metadata,
            inputs=inputs,
            mask=mask,
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


def check_mask_has_alpha(mask: Image.Image) -> None:
    """Refuses a mask that cannot mark anything (no alpha channel, no transparent colour); O(1)."""
    if "A" not in mask.getbands() and "transparency" not in mask.info:
        raise InvalidRequest(
            "The mask must have an alpha channel: its fully transparent pixels mark the area to edit."
        )


def repaint_area(mask: Image.Image) -> Image.Image:
    """An OpenAI-style mask as a diffusers one: ``L``, 255 where alpha is 0 (repaint), else 0.

    Raises :class:`InvalidRequest` for a mask without transparency or without
    a single transparent pixel. Reads every pixel: call it off the event loop.
    """
    check_mask_has_alpha(mask)
    alpha = mask.convert("RGBA").getchannel("A")
    area = alpha.point(lambda a: 255 if a == 0 else 0)
    if area.getbbox() is None:
        raise InvalidRequest("The mask has no fully transparent pixels, so there is nothing to edit.")
    return area


class DiffusersImageEngine(RegistryEngine[ImageRequest, ImageResult]):
    """An image engine on diffusers pipelines: text-to-image, and edits where the class allows."""

    #: Whether the engine edits input images, and how many it takes at most.
    max_inputs: int = 0
    #: Why it cannot edit (shown to callers who try).
    no_edit_reason: str = "it only generates images from text"
    #: Whether edits may carry a mask.
    masks: bool = False
    #: Smallest input side and most extreme input aspect ratio the pipeline accepts.
    min_input_side: int = 64
    max_input_aspect: float = 8.0

    def __init__(
        self,
        spec: ModelSpec,
        *,
        weights_dir: Path | None,
        cache_dir: Path,
        torch_threads: int | None = None,
    ) -> None:
        super().__init__(spec, weights_dir=weights_dir, cache_dir=cache_dir, torch_threads=torch_threads)
        self.pipe: Any = None
        #: Width and height must be multiples of this (VAE scale x 2x2 patching).
        self.pixel_multiple = 16

    # --- lifecycle (worker thread) ---

    def load_blocking(self) -> None:
        self.prepare_pipeline_load()
        with MODEL_LOAD_LOCK:
            directory = self.weights_dir or ensure_tiny_model_directory(
                self.cache_dir, self.spec.id, self.build_tiny, version=TINY_VERSION
            )
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
        self.require_ready()
        self.check_request(request)
        mime_type = image_mime_type(request.output_format)
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)

        def job(control: StepControl) -> list[Image.Image]:
            generator = torch.Generator(device="cpu").manual_seed(seed)
            with torch.inference_mode():
                return self.generate_blocking(request, generator, control)

        label = f"{self.spec.id} {request.width}x{request.height} x{request.count} {request.steps} steps"
        async with self.runner.start(job, key=request_id, label=label) as running:
            async for progress in running:
                yield progress
        outcome = running.outcome

        metadata = (
            {
                "prompt": request.prompt,
                "negative_prompt": request.negative_prompt,
                "model": self.spec.id,
                "seed": str(seed),
                "steps": str(request.steps),
            }
            if request.embed_metadata
            else None
        )

        def encode() -> list[EncodedImage]:
            return [
                EncodedImage(
                    encode_image(img, request.output_format, metadata), mime_type, img.width, img.height
                )
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

    def check_request(self, request: ImageRequest) -> None:
        """The engine's own rules (output multiple, inputs, mask), checked before queueing."""
        m = self.pixel_multiple
        if request.width % m or request.height % m:
            raise InvalidRequest(
                f"The dimensions {request.width}x{request.height} must be multiples of {m} "
                f"for the {self.spec.id} model"
            )
        if not request.inputs:
            if request.mask is not None:
                raise InvalidRequest("A mask needs an input image to apply to")
            return
        if not self.max_inputs:
            raise InvalidRequest(f"Model '{self.spec.id}' cannot edit images: {self.no_edit_reason}")
        if len(request.inputs) > self.max_inputs:
            raise InvalidRequest(
                f"Too many input images: {len(request.inputs)}; the {self.spec.id} model accepts "
                f"at most {self.max_inputs}"
            )
        for index, image in enumerate(request.inputs):
            width, height = image.size
            if min(width, height) < self.min_input_side:
                raise InvalidRequest(
                    f"Input image {index + 1} is {width}x{height} pixels; the {self.spec.id} model needs "
                    f"at least {self.min_input_side} pixels on each side"
                )
            if max(width, height) / min(width, height) > self.max_input_aspect:
                raise InvalidRequest(
                    f"Input image {index + 1} is {width}x{height} pixels; the {self.spec.id} model accepts "
                    f"aspect ratios up to {self.max_input_aspect:g}:1"
                )
        if request.mask is not None:
            if not self.masks:
                raise InvalidRequest(f"The mask parameter is not supported by model {self.spec.id}")
            first = request.inputs[0]
            if request.mask.size != first.size:
                raise InvalidRequest(
                    f"The mask is {request.mask.width}x{request.mask.height} pixels; it must be the size "
                    f"of the first input image ({first.width}x{first.height})"
                )
            check_mask_has_alpha(request.mask)  # the pixels are read in the job, off the event loop

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


def _stepped(base: type[Any]) -> type[Any]:
    """A subclass of a diffusers pipeline whose progress bar reports steps to a StepControl.

    The LongCat pipelines take no ``callback_on_step_end``, but like every
    diffusers pipeline they tick ``self.progress_bar`` once per denoising
    step; the subclass routes those ticks to the running job.
    """

    class Stepped(base):  # type: ignore[misc, valid-type]
        step_control: StepControl | None = None

        def progress_bar(self, iterable: Any = None, total: int | None = None) -> Any:
            if iterable is not None:
                return iterable
            return _ControlledProgressBar(self.step_control, total)

    Stepped.__name__ = Stepped.__qualname__ = f"Stepped{base.__name__}"
    return Stepped


class VisionInputProcessor:
    """What ``LongCatImageEditPipeline`` needs of its ``text_processor``: the image processor.

    The full ``Qwen2VLProcessor`` cannot be built without torchvision (its
    video processor needs it); the edit pipeline only reads
    ``text_processor.image_processor``, so this holds the torchvision-free
    ``Qwen2VLImageProcessorPil``.
    """

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor


class LongCatEngine(DiffusersImageEngine):
    """LongCat-Image through ``LongCatImagePipeline``; edits through ``LongCatImageEditPipeline``.

    The text-to-image pipeline's optional prompt rewriting (a VLM generating a
    longer prompt through ``text_processor``) is off: it needs the full
    Qwen2-VL processor, which does not work without torchvision, and it would
    multiply the cost of a request. The edit pipeline gets the image
    processor alone (:class:`VisionInputProcessor`): from the weights'
    ``text_processor/preprocessor_config.json`` when present, else built from
    the text encoder's vision config. It renders about one megapixel at the
    input's aspect ratio whatever the request says, so its output is fitted to
    the requested size.
    """

    max_inputs = 1
    no_edit_reason = ""
    masks = False

    def __init__(self, spec: ModelSpec, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        self.edit_pipe: Any = None

    def build_tiny(self, directory: Path) -> None:
        build_tiny_longcat(directory)

    def load_pipeline(self, directory: Path) -> Any:
        from diffusers import LongCatImageEditPipeline, LongCatImagePipeline

        pipe = _stepped(LongCatImagePipeline).from_pretrained(
            directory, text_processor=None, local_files_only=True
        )
        components = {k: v for k, v in pipe.components.items() if k != "text_processor"}
        self.edit_pipe = _stepped(LongCatImageEditPipeline)(
            **components, text_processor=VisionInputProcessor(self._vision_processor(directory, pipe))
        )
        self.edit_pipe.set_progress_bar_config(disable=True)
        return pipe

    @staticmethod
    def _vision_processor(directory: Path, pipe: Any) -> Any:
        from transformers import Qwen2VLImageProcessorPil

        saved = directory / "text_processor"
        if (saved / "preprocessor_config.json").is_file():
            return Qwen2VLImageProcessorPil.from_pretrained(saved, local_files_only=True)
        vision = pipe.text_encoder.config.vision_config
        return Qwen2VLImageProcessorPil(
            patch_size=vision.patch_size,
            merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size,
        )

    def close_blocking(self) -> None:
        self.edit_pipe = None
        super().close_blocking()

    def generate_blocking(
        self, request: ImageRequest, generator: torch.Generator, control: StepControl
    ) -> list[Image.Image]:
        pipe = self.edit_pipe if request.inputs else self.pipe
        pipe.step_control = control
        try:
            if request.inputs:
                output = pipe(
                    image=request.inputs[0].convert("RGB"),
                    prompt=request.prompt,
                    negative_prompt=request.negative_prompt,
                    num_inference_steps=request.steps,
                    guidance_scale=request.guidance_scale,
                    num_images_per_prompt=request.count,
                    generator=generator,
                    output_type="pil",
                )
            else:
                output = pipe(
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
            pipe.step_control = None
        size = (request.width, request.height)
        return [
            img if img.size == size else ImageOps.fit(img, size, Image.Resampling.LANCZOS)
            for img in output.images
        ]


def klein_text_layers(pipe: Any) -> tuple[int, ...]:
    """Which text encoder hidden layers FLUX.2 [klein] stacks into its prompt embedding.

    The transformer's ``joint_attention_dim`` is ``n`` x the encoder's width;
    the ``n`` layers are evenly spaced through the encoder: (9, 18, 27) of
    Qwen3-4B's 36 for the real 4B models (the pipeline's default), (1,) of the
    tiny model's 2.
    """
    width = int(pipe.text_encoder.config.hidden_size)
    depth = int(pipe.text_encoder.config.num_hidden_layers)
    joint = int(pipe.transformer.config.joint_attention_dim)
    count = joint // width
    stride = depth // (count + 1)
    if count < 1 or count * width != joint or stride < 1:
        raise EngineUnavailable(
            f"its transformer (joint_attention_dim {joint}) does not fit its text encoder "
            f"({depth} layers of width {width})"
        )
    return tuple(stride * k for k in range(1, count + 1))


class Flux2KleinEngine(DiffusersImageEngine):
    """FLUX.2 [klein] through ``Flux2KleinPipeline``; masked edits through ``Flux2KleinInpaintPipeline``.

    Without a mask, input images are reference images (``image=[...]``) and
    the output has the requested size. With a mask, the first input is the
    image to repaint (scaled to the output size), the others are references,
    the mask's transparent pixels are repainted at full strength and the
    opaque ones are kept exactly.

    The distilled checkpoint (``is_distilled``) runs no classifier-free
    guidance; the base one does when guidance > 1, and then the request's
    negative prompt is encoded as the unconditional prompt (the pipeline's own
    default is an empty one). For a tiny model the variant comes from the
    registry: ``options.distilled`` when given, else a model whose default
    guidance is at most 1 (no guidance) is the distilled one.
    """

    max_inputs = 4
    no_edit_reason = ""
    masks = True
    #: Longest prompt in tokens, as the pipeline's default.
    max_sequence_length = 512

    def __init__(self, spec: ModelSpec, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        self.inpaint: Any = None
        self.text_layers: tuple[int, ...] = ()

    @property
    def distilled(self) -> bool:
        option = self.spec.options.get("distilled")
        if option is not None:
            return bool(option)
        return self.spec.defaults.guidance_scale <= 1.0

    def build_tiny(self, directory: Path) -> None:
        build_tiny_flux2_klein(directory, distilled=self.distilled)

    def load_pipeline(self, directory: Path) -> Any:
        from diffusers import Flux2KleinInpaintPipeline, Flux2KleinPipeline

        pipe = Flux2KleinPipeline.from_pretrained(directory, local_files_only=True)
        self.text_layers = klein_text_layers(pipe)
        self.inpaint = Flux2KleinInpaintPipeline(
            **pipe.components, is_distilled=bool(pipe.config.is_distilled)
        )
        self.inpaint.set_progress_bar_config(disable=True)
        return pipe

    def close_blocking(self) -> None:
        self.inpaint = None
        super().close_blocking()

    def generate_blocking(
        self, request: ImageRequest, generator: torch.Generator, control: StepControl
    ) -> list[Image.Image]:
        common: dict[str, Any] = {
            "prompt": request.prompt,
            "width": request.width,
            "height": request.height,
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance_scale,
            "num_images_per_prompt": request.count,
            "generator": generator,
            "callback_on_step_end": control.diffusers_callback(request.steps),
            "max_sequence_length": self.max_sequence_length,
            "text_encoder_out_layers": self.text_layers,
            "output_type": "pil",
        }
        guided = not self.pipe.config.is_distilled and request.guidance_scale > 1.0
        if guided and request.negative_prompt:
            negative, _ = self.pipe.encode_prompt(
                prompt=request.negative_prompt,
                max_sequence_length=self.max_sequence_length,
                text_encoder_out_layers=self.text_layers,
            )
            common["negative_prompt_embeds"] = negative
        inputs = [image.convert("RGB") for image in request.inputs]
        if request.mask is None:
            return list(self.pipe(image=inputs or None, **common).images)
        size = (request.width, request.height)
        source = inputs[0] if inputs[0].size == size else inputs[0].resize(size, Image.Resampling.LANCZOS)
        area = repaint_area(request.mask).resize(size, Image.Resampling.NEAREST)
        output = self.inpaint(
            image=source,
            image_reference=inputs[1:] or None,
            mask_image=area,
            strength=1.0,
            **common,
        )
        return [Image.composite(image.convert("RGB").resize(size), source, area) for image in output.images]


#: Registry ``engine`` key -> engine class.
ENGINE_CLASSES: dict[str, type[DiffusersImageEngine]] = {
    "zimage": ZImageEngine,
    "longcat": LongCatEngine,
    "flux2-klein": Flux2KleinEngine,
}


def build_engine_pool(
    registry: Registry,
    *,
    cache_dir: Path,
    torch_threads: int | None = None,
    default: str = "z-image-turbo",
    engine_classes: dict[str, type[DiffusersImageEngine]] | None = None,
) -> EnginePool[DiffusersImageEngine]:
    """One engine per text-to-image or image-edit model of the registry (not loaded yet)."""
    return build_pool(
        registry,
        served_models(registry),
        ENGINE_CLASSES if engine_classes is None else engine_classes,
        service="image_gen",
        cache_dir=cache_dir,
        torch_threads=torch_threads,
        default=default,
    )


def served_models(registry: Registry) -> list[ModelSpec]:
    """The registry's models this service serves (text-to-image or image-edit), in file order."""
    return [spec for spec in registry.models if any(spec.serves(c) for c in CAPABILITIES)]
