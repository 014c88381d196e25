"""The SAM3 segmentation engine: text prompts through ``Sam3Model``, points through ``Sam3TrackerModel``.

The registry's ``engine = "sam3"`` picks :class:`Sam3Engine` (:data:`ENGINE_CLASSES`).
It holds both real transformers models and a tokenizer, loaded with
``from_pretrained`` from the registry's weights directory or, for
``weights = "tiny"``, from a tiny random-weight build made on first use
(:mod:`services.segmentation.tiny`, which also describes the directory layout).
The engine knows nothing of gRPC: it takes decoded ``PIL`` images and returns
boolean masks the size of the original image.

Preprocessing is done by hand (the transformers SAM3 processors need
torchvision, which this stack cannot import): the RGB image is resized to the
model's square input (bilinear) and normalised with ``(x - 0.5) / 0.5``, as
``Sam3ImageProcessor`` does. Mask logits are resized back to the original
width and height (bilinear, as the processor's post-processing does) and
thresholded there, so every mask has exactly the input's size.

What a request means:

* **Text prompt only**: ``Sam3Model`` detects instances of the prompt. A
  detection's score is ``sigmoid(logit) * sigmoid(presence)``, as
  ``Sam3Processor.post_process_instance_segmentation`` computes it. The best
  detection counts when its score is at least the model's
  ``options.score_threshold``; its mask is the pixels whose logits are above
  ``options.mask_threshold``. No detection at or above the threshold (or an
  empty mask) means *not found*: one empty mask, ``found`` false.
* **Points only**: ``Sam3TrackerModel`` segments around the points (given in
  original pixels, mapped to model-input pixels; foreground label 1,
  background 0). With ``multimask_output`` the tracker's three candidates come
  back, best predicted IoU first; without it, its single mask. A candidate's
  score is the predicted IoU, clamped to 0..1.
* **Prompt and points**: the points refine the prompt's object. The text
  detection runs first; if the object is not found the answer is *not found*
  (the points cannot conjure an object the prompt does not name). Otherwise
  the tracker is prompted with the points *and the detection's box* (SAM's
  usual box + points refinement), and its candidates are returned as for
  points alone.

``found`` is whether the best mask has at least one pixel. Work runs on the
engine's worker thread (one job at a time; a model call is not re-entrant).
Video frames are segmented in batches of :attr:`Sam3Engine.frame_batch` per
forward pass (:meth:`Sam3Engine.detect_frames`): the model's input has a fixed
shape, so a batch costs little more than one frame.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.utils import logging as transformers_logging

from services.common.engine import EnginePool, EngineUnavailable, RegistryEngine
from services.common.engine import build_engine_pool as build_pool
from services.common.model_cache import MODEL_LOAD_LOCK, ensure_tiny_model_directory
from services.common.registry import DEFAULT_SEGMENTATION_MODEL, SEGMENTATION, ModelSpec, Registry
from services.common.runner import Progress, StepControl
from services.segmentation import rules
from services.segmentation.tiny import DETECTOR_DIR, TINY_VERSION, TRACKER_DIR, build_tiny_sam3

#: Defaults of the registry options, when a model does not set them.
DEFAULT_SCORE_THRESHOLD = 0.5
DEFAULT_MASK_THRESHOLD = 0.0


@dataclass(frozen=True)
class PointPrompt:
    """A point in the original image's pixels; ``foreground`` False marks background."""

    x: float
    y: float
    foreground: bool = True


@dataclass(frozen=True)
class SegmentRequest:
    """One image to segment by a text prompt and/or points (checked by the servicer)."""

    image: Image.Image
    prompt: str = ""
    points: tuple[PointPrompt, ...] = ()
    multimask_output: bool = False


@dataclass(frozen=True)
class Mask:
    """A boolean mask of the original image's size (``pixels[y, x]``) and its score, 0 to 1."""

    pixels: np.ndarray
    score: float

    @property
    def coverage(self) -> float:
        """The share of the image inside the mask, 0 to 1."""
        return float(self.pixels.mean()) if self.pixels.size else 0.0

    @property
    def empty(self) -> bool:
        return not bool(self.pixels.any())


@dataclass(frozen=True)
class SegmentResult:
    """Candidate masks, best first (never empty), and whether the best one holds an object."""

    masks: tuple[Mask, ...]
    found: bool
    model: str
    queue_ms: float
    inference_ms: float


@dataclass(frozen=True)
class Detection:
    """The best text detection in one image: its score, and its mask when it counts.

    ``mask`` is None when the score is below the threshold or the mask is
    empty (the object was not found).
    """

    score: float
    mask: np.ndarray | None
    #: The detection's box, normalised ``(x0, y0, x1, y1)`` in 0..1.
    box: tuple[float, float, float, float] | None = None

    @property
    def found(self) -> bool:
        return self.mask is not None


@dataclass(frozen=True)
class FrameDetections:
    """The detections of a batch of frames, with the batch's queue and run time."""

    detections: tuple[Detection, ...]
    queue_ms: float
    inference_ms: float


def _option(spec: ModelSpec, name: str, default: float) -> float:
    value = spec.options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise EngineUnavailable(f"its option {name} must be a number, not {value!r}")
    return float(value)


def _model_dir(root: Path, sub: str) -> Path:
    """``root/sub`` when it holds a model (tiny layout), else ``root`` (one ``sam3_video`` checkpoint)."""
    return root / sub if (root / sub / "config.json").is_file() else root


class Sam3Engine(RegistryEngine[SegmentRequest, SegmentResult]):
    """SAM3: ``Sam3Model`` for text prompts, ``Sam3TrackerModel`` for points (and box refinement)."""

    #: Video frames per forward pass.
    frame_batch: int = 4

    def __init__(
        self,
        spec: ModelSpec,
        *,
        weights_dir: Path | None,
        cache_dir: Path,
        torch_threads: int | None = None,
    ) -> None:
        super().__init__(spec, weights_dir=weights_dir, cache_dir=cache_dir, torch_threads=torch_threads)
        self.score_threshold = DEFAULT_SCORE_THRESHOLD
        self.mask_threshold = DEFAULT_MASK_THRESHOLD
        self.tokenizer: Any = None
        self.detector: Any = None
        self.tracker: Any = None
        #: Square input side of each model, the prompt encoder's coordinate frame, the text length.
        self.detector_size = 0
        self.tracker_size = 0
        self.prompt_frame = 0
        self.text_length = 0

    # --- lifecycle (worker thread) ---

    def load_blocking(self) -> None:
        from transformers import AutoTokenizer, Sam3Model, Sam3TrackerModel

        self.score_threshold = _option(self.spec, "score_threshold", DEFAULT_SCORE_THRESHOLD)
        self.mask_threshold = _option(self.spec, "mask_threshold", DEFAULT_MASK_THRESHOLD)
        self.apply_torch_threads()
        self.require_weights_dir()
        transformers_logging.disable_progress_bar()
        with MODEL_LOAD_LOCK:
            root = self.weights_dir or ensure_tiny_model_directory(
                self.cache_dir, self.spec.id, build_tiny_sam3, version=TINY_VERSION
            )
            detector_dir = _model_dir(root, DETECTOR_DIR)
            tokenizer_dir = root if (root / "tokenizer_config.json").is_file() else detector_dir
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
            self.detector = Sam3Model.from_pretrained(detector_dir, local_files_only=True).eval()
            self.tracker = Sam3TrackerModel.from_pretrained(
                _model_dir(root, TRACKER_DIR), local_files_only=True
            ).eval()
        self.detector_size = int(self.detector.config.vision_config.backbone_config.image_size)
        self.tracker_size = int(self.tracker.config.vision_config.backbone_config.image_size)
        self.prompt_frame = int(self.tracker.config.prompt_encoder_config.image_size)
        self.text_length = int(self.detector.config.text_config.max_position_embeddings)

    def close_blocking(self) -> None:
        self.tokenizer = self.detector = self.tracker = None

    # --- requests ---

    async def run(
        self, request: SegmentRequest, *, request_id: str = ""
    ) -> AsyncGenerator[Progress | SegmentResult, None]:
        """One :class:`SegmentResult` (no progress events: one forward pass or two)."""
        self._check_ready()
        rules.check_prompt_or_points(
            request.prompt, len(request.points), multimask_output=request.multimask_output
        )

        def job(control: StepControl) -> tuple[Mask, ...]:
            with torch.inference_mode():
                return self.segment_blocking(request)

        outcome = await self.runner.result(
            job, key=request_id, label=f"{self.spec.id} {request.image.width}x{request.image.height}"
        )
        masks = outcome.value
        yield SegmentResult(
            masks=masks,
            found=not masks[0].empty,
            model=self.spec.id,
            queue_ms=outcome.queue_ms,
            inference_ms=outcome.run_ms,
        )

    async def detect_frames(
        self, images: Sequence[Image.Image], prompt: str, *, request_id: str = ""
    ) -> FrameDetections:
        """The best detection of ``prompt`` in each image, in forward passes of :attr:`frame_batch`."""
        self._check_ready()
        frames = list(images)

        def job(control: StepControl) -> list[Detection]:
            found: list[Detection] = []
            with torch.inference_mode():
                for start in range(0, len(frames), self.frame_batch):
                    control.check()
                    found.extend(self.detect_blocking(frames[start : start + self.frame_batch], prompt))
            return found

        outcome = await self.runner.result(job, key=request_id, label=f"{self.spec.id} {len(frames)} frames")
        return FrameDetections(tuple(outcome.value), outcome.queue_ms, outcome.run_ms)

    def _check_ready(self) -> None:
        self.require_ready()

    # --- model work (worker thread; each method runs in torch.inference_mode) ---

    @torch.inference_mode()
    def segment_blocking(self, request: SegmentRequest) -> tuple[Mask, ...]:
        """Candidate masks for one request, best first (one empty mask when nothing is found)."""
        image = request.image
        box = None
        if request.prompt.strip():
            detection = self.detect_blocking([image], request.prompt)[0]
            if detection.mask is None:
                return (Mask(np.zeros((image.height, image.width), dtype=bool), detection.score),)
            if not request.points:
                return (Mask(detection.mask, detection.score),)
            box = detection.box
        return self.points_blocking(image, request.points, box=box, multimask=request.multimask_output)

    @torch.inference_mode()
    def detect_blocking(self, images: Sequence[Image.Image], prompt: str) -> list[Detection]:
        """``Sam3Model`` on a batch of images with one text prompt: the best detection of each."""
        encoded = self.tokenizer(
            [prompt],
            padding="max_length",
            max_length=self.text_length,
            truncation=True,
            return_tensors="pt",
        )
        count = len(images)
        output = self.detector(
            pixel_values=_pixel_values(images, self.detector_size),
            input_ids=encoded["input_ids"].expand(count, -1),
            attention_mask=encoded["attention_mask"].expand(count, -1),
        )
        scores = output.pred_logits.float().sigmoid()
        if getattr(output, "presence_logits", None) is not None:
            scores = scores * output.presence_logits.float().sigmoid()
        best = scores.argmax(dim=-1)
        detections = []
        for index, image in enumerate(images):
            query = int(best[index])
            score = float(scores[index, query])
            box_values = output.pred_boxes[index, query].float().clamp(0.0, 1.0).tolist()
            box = (box_values[0], box_values[1], box_values[2], box_values[3])
            mask = None
            if score >= self.score_threshold:
                pixels = self._resize_mask(output.pred_masks[index, query], image.size)
                mask = pixels if pixels.any() else None
            detections.append(Detection(score=score, mask=mask, box=box))
        return detections

    @torch.inference_mode()
    def points_blocking(
        self,
        image: Image.Image,
        points: Sequence[PointPrompt],
        *,
        box: tuple[float, float, float, float] | None,
        multimask: bool,
    ) -> tuple[Mask, ...]:
        """``Sam3TrackerModel`` around points (original pixels) and an optional normalised box."""
        width, height = image.size
        frame = self.prompt_frame
        coords = torch.tensor(
            [[[[p.x * frame / width, p.y * frame / height] for p in points]]], dtype=torch.float32
        )
        labels = torch.tensor([[[1 if p.foreground else 0 for p in points]]], dtype=torch.long)
        kwargs: dict[str, Any] = {}
        if box is not None:
            kwargs["input_boxes"] = torch.tensor([[[v * frame for v in box]]], dtype=torch.float32)
        output = self.tracker(
            pixel_values=_pixel_values([image], self.tracker_size),
            input_points=coords,
            input_labels=labels,
            multimask_output=multimask,
            **kwargs,
        )
        logits = output.pred_masks[0, 0]  # (candidates, h, w)
        ious = output.iou_scores[0, 0].float()
        order = torch.argsort(ious, descending=True).tolist()
        return tuple(
            Mask(self._resize_mask(logits[k], image.size), min(1.0, max(0.0, float(ious[k])))) for k in order
        )

    def _resize_mask(self, logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """Low-resolution mask logits -> a boolean mask of ``size`` (width, height)."""
        width, height = size
        resized = torch.nn.functional.interpolate(
            logits.float()[None, None], size=(height, width), mode="bilinear", align_corners=False
        )[0, 0]
        return (resized > self.mask_threshold).numpy()


def _pixel_values(images: Sequence[Image.Image], side: int) -> torch.Tensor:
    """RGB images -> ``(N, 3, side, side)`` float tensor, resized (bilinear) and scaled to -1..1."""
    arrays = [
        np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32)
        for image in images
    ]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    return (batch - 0.5) / 0.5


#: Registry ``engine`` key -> engine class.
ENGINE_CLASSES: dict[str, type[Sam3Engine]] = {"sam3": Sam3Engine}


def build_engine_pool(
    registry: Registry,
    *,
    cache_dir: Path,
    torch_threads: int | None = None,
    default: str = DEFAULT_SEGMENTATION_MODEL,
) -> EnginePool[Sam3Engine]:
    """One engine per segmentation model of the registry (not loaded yet)."""
    return build_pool(
        registry,
        registry.for_capability(SEGMENTATION),
        ENGINE_CLASSES,
        service="segmentation",
        cache_dir=cache_dir,
        torch_threads=torch_threads,
        default=default,
    )
