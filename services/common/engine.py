"""The engine interface every capability shares, and the worker that runs step-wise jobs.

An **engine** does one capability's work (a diffusers pipeline, a VLM, a TTS
model) and knows nothing of gRPC or protobuf: a servicer converts requests to
engine types, iterates :meth:`Engine.run` and converts what it yields back.
The lifecycle follows Triton's python backend and vLLM's ``EngineClient``:

* :meth:`Engine.load` builds or loads the model off the event loop; on failure
  the engine is *unavailable* and says why (:attr:`Engine.unavailable_reason`)
  instead of failing the whole process.
* :meth:`Engine.run` is an async iterator of :class:`Progress` events and,
  last, the result. Closing or cancelling the iterator (the client went away,
  the deadline passed) aborts the work at its next step.
* :meth:`Engine.abort` aborts the jobs of one request id; :meth:`Engine.close`
  aborts everything and frees the model; :meth:`Engine.health` reports state
  and queue depth.

:class:`StepRunner` is the reusable part: it runs blocking, step-wise jobs
(a diffusers ``__call__``) on the engine's own worker thread(s), one job at a
time by default. The job reports each finished step through its
:class:`StepControl`; the runner bridges those reports to the event loop as
:class:`Progress` events, measures queue time (waiting for a slot) and run
time, and when the consumer is cancelled sets a flag that makes the job's next
step report raise :class:`JobCancelled`, so the job unwinds and the slot is
freed right after that step.

:func:`ensure_tiny_model_directory` builds a tiny random-weight model once
into the model cache (under a safe directory name, renamed into place when
complete), for engines that have no registry weights directory.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from services.common.errors import InvalidRequest, MaintenanceMode, ProcessingError
from services.common.registry import ModelSpec, Registry

log = logging.getLogger(__name__)

#: Held while any engine builds or loads a model. Loading patches torch for the
#: whole process (accelerate's ``init_empty_weights`` swaps
#: ``nn.Module.register_parameter`` globally), so a model constructed on another
#: thread at the same time would get meta tensors with no data. Loads are rare;
#: inference never takes this lock.
MODEL_LOAD_LOCK = threading.Lock()

T = TypeVar("T")
RequestT = TypeVar("RequestT")
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class Progress:
    """One finished step of step-wise work (``step`` counts from 1)."""

    step: int
    total_steps: int


@dataclass(frozen=True)
class JobOutcome(Generic[T]):
    """The value a job returned, with its measured queue and run time."""

    value: T
    queue_ms: float
    run_ms: float
    steps_done: int


class JobCancelled(Exception):
    """Raised inside a job (at its next step report) once its consumer is gone.

    Jobs must let it propagate; the runner catches it.
    """


@dataclass(frozen=True)
class JobReport:
    """What one finished job did (kept for health, metrics and tests)."""

    key: str
    label: str
    outcome: str  # "completed" | "cancelled" | "failed"
    steps_done: int
    total_steps: int | None
    queue_ms: float
    run_ms: float


class StepControl:
    """Handed to a running job: report finished steps, learn about cancellation.

    Lives on the worker thread; every method is safe to call from there.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_progress: Callable[[Progress], None]) -> None:
        self._loop = loop
        self._on_progress = on_progress
        self._cancel = threading.Event()
        self.total_steps: int | None = None
        self.steps_done = 0

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Asks the job to stop at its next step (any thread)."""
        self._cancel.set()

    def check(self) -> None:
        """Raises :class:`JobCancelled` if the consumer is gone."""
        if self._cancel.is_set():
            raise JobCancelled

    def step(self, step: int, total_steps: int | None = None) -> None:
        """Reports that step ``step`` (from 1) of ``total_steps`` finished; raises if cancelled."""
        if total_steps is not None:
            self.total_steps = total_steps
        self.steps_done = step
        self.check()
        total = self.total_steps if self.total_steps is not None else step
        self._emit(Progress(step=step, total_steps=total))

    def diffusers_callback(self, total_steps: int) -> Callable[..., dict[str, Any]]:
        """A ``callback_on_step_end`` for diffusers pipelines that reports steps and stops on cancel."""
        self.total_steps = total_steps

        def callback(pipe: Any, index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            self.step(index + 1)
            return {}

        return callback

    def _emit(self, progress: Progress) -> None:
        try:
            self._loop.call_soon_threadsafe(self._on_progress, progress)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._cancel.set()


_DONE = object()


class StepRunner:
    """Runs blocking, step-wise jobs on dedicated worker threads, ``concurrency`` at a time.

    One runner per engine. :meth:`stream` yields :class:`Progress` events and,
    last, one :class:`JobOutcome`; :meth:`call` runs a plain blocking function
    (model loading) on the same worker threads.
    """

    def __init__(self, name: str, *, concurrency: int = 1, history: int = 64) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.name = name
        self.concurrency = concurrency
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"engine-{name}")
        self._slots: asyncio.Semaphore | None = None
        self._controls: dict[int, tuple[str, StepControl]] = {}
        self._next_id = 0
        self.waiting = 0
        self.reports: collections.deque[JobReport] = collections.deque(maxlen=history)
        self._closed = False

    @property
    def running(self) -> int:
        return len(self._controls)

    def _semaphore(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        return self._slots

    async def call(self, fn: Callable[[], T]) -> T:
        """Runs ``fn`` on a worker thread once a slot is free (no progress, no cancellation)."""
        if self._closed:
            raise RuntimeError(f"engine {self.name} is closed")
        slots = self._semaphore()
        async with slots:
            return await asyncio.wrap_future(self._executor.submit(fn))

    async def stream(
        self, job: Callable[[StepControl], T], *, key: str = "", label: str = ""
    ) -> AsyncGenerator[Progress | JobOutcome[T], None]:
        """Runs ``job(control)`` on a worker thread, yielding its progress and then its outcome.

        ``key`` groups jobs for :meth:`abort` (e.g. the request id). Exceptions
        raised by the job propagate to the consumer; a job stopped by
        :meth:`abort` or :meth:`shutdown` while its consumer still listens ends
        the stream with :class:`~services.common.errors.ProcessingError`.
        Consumers that may stop early should iterate inside
        ``contextlib.aclosing(...)`` so the abort happens at once. If the consumer stops
        iterating (cancelled, closed), the job is told to stop at its next step
        and the slot is released as soon as the job returns.
        """
        if self._closed:
            raise RuntimeError(f"engine {self.name} is closed")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()
        control = StepControl(loop, events.put_nowait)
        slots = self._semaphore()
        queued_at = time.perf_counter()
        self.waiting += 1
        try:
            await slots.acquire()
        finally:
            self.waiting -= 1
        queue_ms = (time.perf_counter() - queued_at) * 1000
        job_id = self._next_id
        self._next_id += 1
        self._controls[job_id] = (key, control)

        def execute() -> tuple[str, Any, float]:
            started = time.perf_counter()
            try:
                control.check()
                value: Any = job(control)
                outcome = "completed"
            except JobCancelled:
                value, outcome = None, "cancelled"
            except BaseException as exc:  # handed to the consumer on the loop
                value, outcome = exc, "failed"
            return outcome, value, (time.perf_counter() - started) * 1000

        def finished(fut: asyncio.Future[tuple[str, Any, float]]) -> None:
            slots.release()
            self._controls.pop(job_id, None)
            outcome, _, run_ms = ("cancelled", None, 0.0) if fut.cancelled() else fut.result()
            self.reports.append(
                JobReport(key, label, outcome, control.steps_done, control.total_steps, queue_ms, run_ms)
            )
            events.put_nowait(_DONE)

        try:
            future = asyncio.wrap_future(self._executor.submit(execute))
        except BaseException:
            slots.release()
            self._controls.pop(job_id, None)
            raise
        future.add_done_callback(finished)
        try:
            while True:
                item = await events.get()
                if item is _DONE:
                    break
                yield item
            outcome, value, run_ms = ("cancelled", None, 0.0) if future.cancelled() else future.result()
            if outcome == "failed":
                raise cast(BaseException, value)
            if outcome == "cancelled":
                raise ProcessingError("The request was aborted before it finished.")
            yield JobOutcome(
                value=cast(T, value), queue_ms=queue_ms, run_ms=run_ms, steps_done=control.steps_done
            )
        finally:
            # Consumer gone (or done): make sure the job stops at its next step.
            # The slot is released by `finished` when the worker returns.
            control.cancel()

    def abort(self, key: str) -> int:
        """Asks every running job with this key to stop at its next step; returns how many."""
        hits = [control for job_key, control in self._controls.values() if job_key == key]
        for control in hits:
            control.cancel()
        return len(hits)

    def abort_all(self) -> None:
        for _, control in list(self._controls.values()):
            control.cancel()

    def shutdown(self) -> None:
        """Aborts running jobs and stops the worker threads (does not wait for them)."""
        self._closed = True
        self.abort_all()
        self._executor.shutdown(wait=False, cancel_futures=True)


class EngineState(StrEnum):
    NEW = "new"
    LOADING = "loading"
    READY = "ready"
    UNAVAILABLE = "unavailable"
    CLOSED = "closed"


class EngineUnavailable(Exception):
    """Raised by :meth:`Engine.load_blocking` when the engine cannot serve on this host.

    The message is the reason shown to callers and in model listings.
    """


@dataclass(frozen=True)
class EngineHealth:
    name: str
    state: EngineState
    ready: bool
    unavailable_reason: str | None
    running_jobs: int
    waiting_jobs: int


class Engine(ABC, Generic[RequestT, ResultT]):
    """One loaded model of one capability.

    Subclasses implement :meth:`load_blocking` (build or load the model; runs
    on the engine's worker thread), :meth:`run` (usually with
    ``self.runner.stream``) and optionally :meth:`close_blocking`.
    """

    def __init__(self, name: str, *, concurrency: int = 1) -> None:
        self.name = name
        self.runner = StepRunner(name, concurrency=concurrency)
        self.state = EngineState.NEW
        self._unavailable_reason: str | None = None

    @property
    def ready(self) -> bool:
        return self.state is EngineState.READY

    def require_ready(self, what: str = "Model") -> None:
        """Raises :class:`InvalidRequest` unless the engine can serve (unavailable, or still loading)."""
        if not self.ready:
            raise InvalidRequest(
                f"{what} '{self.name}' is not available on this server: "
                f"{self.unavailable_reason or 'it is still loading'}"
            )

    @property
    def unavailable_reason(self) -> str | None:
        """Why the engine cannot serve (None when ready or still loading)."""
        if self.state is EngineState.CLOSED:
            return "the engine is shut down"
        return self._unavailable_reason

    async def load(self) -> None:
        """Loads the model on the worker thread; failures make the engine unavailable, never raise."""
        if self.state is not EngineState.NEW:
            return
        self.state = EngineState.LOADING
        started = time.perf_counter()
        try:
            await self.runner.call(self.load_blocking)
        except EngineUnavailable as exc:
            self._unavailable(str(exc))
        except Exception as exc:
            log.exception("engine %s failed to load", self.name)
            self._unavailable(f"loading failed ({type(exc).__name__}: {exc})")
        else:
            if self.state is EngineState.LOADING:
                self.state = EngineState.READY
                log.info("engine %s ready in %.0f ms", self.name, (time.perf_counter() - started) * 1000)

    def _unavailable(self, reason: str) -> None:
        if self.state is not EngineState.CLOSED:
            self.state = EngineState.UNAVAILABLE
            self._unavailable_reason = reason
            log.warning("engine %s unavailable: %s", self.name, reason)

    @abstractmethod
    def load_blocking(self) -> None:
        """Builds or loads the model (runs on the worker thread)."""

    @abstractmethod
    def run(self, request: RequestT, *, request_id: str = "") -> AsyncGenerator[Progress | ResultT, None]:
        """Progress events, then exactly one result; stop iterating to abort."""

    def abort(self, request_id: str) -> int:
        """Stops the running jobs of one request at their next step; returns how many."""
        return self.runner.abort(request_id)

    def close_blocking(self) -> None:
        """Frees the model (runs on the worker thread)."""

    async def close(self) -> None:
        """Aborts all work, frees the model, stops the worker."""
        if self.state is EngineState.CLOSED:
            return
        self.runner.abort_all()
        try:
            await self.runner.call(self.close_blocking)
        except Exception:
            log.exception("engine %s failed to close cleanly", self.name)
        self.state = EngineState.CLOSED
        self.runner.shutdown()

    def health(self) -> EngineHealth:
        return EngineHealth(
            name=self.name,
            state=self.state,
            ready=self.ready,
            unavailable_reason=self.unavailable_reason,
            running_jobs=self.runner.running,
            waiting_jobs=self.runner.waiting,
        )


#: The engine type of a pool.
EngineT = TypeVar("EngineT", bound="Engine[Any, Any]")
#: The engine type of a pool built from the registry.
RegistryEngineT = TypeVar("RegistryEngineT", bound="RegistryEngine[Any, Any]")


class EnginePool(Generic[EngineT]):
    """The engines of one service, keyed by canonical model id, all of one type ``EngineT``
    (so :meth:`get` needs no downcast).

    Models whose engine could not even be constructed (an unknown engine key)
    are listed in ``unavailable`` with the reason. :meth:`load` loads the
    default model first (so the service can report SERVING as soon as it can
    serve it), then the others side by side, each on its own worker thread.
    """

    def __init__(
        self, engines: Mapping[str, EngineT], *, default: str, unavailable: dict[str, str] | None = None
    ) -> None:
        self.engines = dict(engines)
        self.default = default
        self.unavailable = dict(unavailable or {})
        self._loaded: asyncio.Event | None = None

    def _loaded_event(self) -> asyncio.Event:
        if self._loaded is None:
            self._loaded = asyncio.Event()
        return self._loaded

    async def load(self, *, on_default_ready: Callable[[], Any] | None = None) -> None:
        """Loads every engine; awaits ``on_default_ready()`` once the default model serves."""

        async def announce() -> None:
            if on_default_ready is not None:
                result = on_default_ready()
                if asyncio.iscoroutine(result):
                    await result

        try:
            first = self.engines.get(self.default)
            if first is not None:
                await first.load()
                if first.ready:
                    await announce()
                else:
                    log.error("default model %s cannot serve: %s", self.default, first.unavailable_reason)
            await asyncio.gather(*(e.load() for name, e in self.engines.items() if name != self.default))
            if first is None and any(e.ready for e in self.engines.values()):
                await announce()  # no default model configured: serving once the others are loaded
        finally:
            self._loaded_event().set()

    async def wait_loaded(self) -> None:
        """Returns once :meth:`load` has tried every engine."""
        await self._loaded_event().wait()

    def status(self, model_id: str) -> tuple[bool, str | None]:
        """(ready, why not) of one model."""
        if model_id in self.unavailable:
            return False, self.unavailable[model_id]
        engine = self.engines.get(model_id)
        if engine is None:
            return False, "the model is not served by this service"
        if engine.state in (EngineState.NEW, EngineState.LOADING):
            return False, "the model is still loading"
        return engine.ready, engine.unavailable_reason

    def get(self, model_id: str) -> EngineT:
        """The ready engine of a model, or the error that explains why there is none."""
        engine = self.engines.get(model_id)
        if engine is not None and engine.ready:
            return engine
        if engine is not None and engine.state in (EngineState.NEW, EngineState.LOADING):
            raise MaintenanceMode(f"Model '{model_id}' is still loading; please try again shortly.")
        _, reason = self.status(model_id)
        raise InvalidRequest(f"Model '{model_id}' is not available on this server: {reason}")

    async def close(self) -> None:
        await asyncio.gather(*(engine.close() for engine in self.engines.values()))


class RegistryEngine(Engine[RequestT, ResultT]):
    """An engine for one registry model: its spec, its weights directory (None for a
    tiny random-weight build in ``cache_dir``) and its torch thread count."""

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

    # Loading steps the engines share (they run on the worker thread).

    def apply_torch_threads(self) -> None:
        """Applies the torch thread setting (process-wide, like the setting itself)."""
        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)

    def require_weights_dir(self) -> None:
        """Makes the engine unavailable when its registry weights directory does not exist."""
        if self.weights_dir is not None and not self.weights_dir.is_dir():
            raise EngineUnavailable(f"its weights directory '{self.spec.weights}' does not exist")

    def prepare_pipeline_load(self) -> None:
        """Before a diffusers pipeline loads: the thread setting, a check that registry weights
        hold a pipeline (``model_index.json``), and logs instead of terminal progress bars."""
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        self.apply_torch_threads()
        if self.weights_dir is not None and not (self.weights_dir / "model_index.json").is_file():
            log.error("model %s: no model_index.json in %s", self.spec.id, self.weights_dir)
            raise EngineUnavailable(
                f"its weights directory '{self.spec.weights}' does not hold a diffusers pipeline"
            )
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()


def build_engine_pool(
    registry: Registry,
    specs: list[ModelSpec],
    classes: Mapping[str, type[RegistryEngineT]],
    *,
    service: str,
    cache_dir: Path,
    torch_threads: int | None,
    default: str,
) -> EnginePool[RegistryEngineT]:
    """One engine per model (not loaded yet); a model whose engine ``service`` lacks is unavailable."""
    engines: dict[str, RegistryEngineT] = {}
    unavailable: dict[str, str] = {}
    for spec in specs:
        cls = classes.get(spec.engine)
        if cls is None:
            unavailable[spec.id] = f"{service} has no engine '{spec.engine}' (known: {', '.join(classes)})"
            continue
        engines[spec.id] = cls(
            spec,
            weights_dir=spec.weights_path(registry.path),
            cache_dir=cache_dir,
            torch_threads=torch_threads,
        )
    return EnginePool(engines, default=default, unavailable=unavailable)


def tiny_model_directory(cache_dir: Path, model_id: str, *, version: int) -> Path:
    """Where the tiny random-weight build of a model lives: ``<cache>/<safe id>-tiny-v<version>``.

    Ids made only of letters, digits, ``-``, ``_`` and ``.`` are used as they
    are; others (``owner/name``) get their unsafe characters replaced and a
    short hash of the id appended, so two ids never share a directory.
    """
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id).lstrip(".")
    if safe != model_id:
        safe = f"{safe}-{hashlib.sha256(model_id.encode()).hexdigest()[:8]}"
    return cache_dir / f"{safe}-tiny-v{version}"


def ensure_tiny_model_directory(
    cache_dir: Path, model_id: str, build: Callable[[Path], None], *, version: int
) -> Path:
    """The tiny model's directory, built first by ``build(staging_dir)`` when missing (blocking).

    The build happens in a temporary directory renamed into place at the end,
    so a crash never leaves half a model behind and concurrent builders agree.
    Call it while holding :data:`MODEL_LOAD_LOCK`.
    """
    target = tiny_model_directory(cache_dir, model_id, version=version)
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_dir))
    try:
        log.info("building tiny random-weight model %s in %s", model_id, target)
        build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():  # not a concurrent builder that won the race
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


# --- optimized backends: ONNX export once, ONNX Runtime sessions, backend choice ---

#: ONNX Runtime execution providers, fastest first; a session gets those the host has.
ONNX_PROVIDER_PREFERENCE: tuple[str, ...] = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
#: The ONNX opset networks are exported with.
ONNX_OPSET = 17


def onnx_providers(available: Sequence[str] | None = None) -> list[str]:
    """The execution providers to ask for, in :data:`ONNX_PROVIDER_PREFERENCE` order, among
    ``available`` (default: what ``onnxruntime.get_available_providers()`` lists)."""
    if available is None:
        import onnxruntime

        available = onnxruntime.get_available_providers()
    chosen = [name for name in ONNX_PROVIDER_PREFERENCE if name in available]
    return chosen or ["CPUExecutionProvider"]


def resolve_engine_backend(setting: str) -> str:
    """``"onnxruntime"`` or ``"torch"`` for the ``engine_backend`` setting.

    ``auto`` is onnxruntime when it is importable, else torch; asking for
    onnxruntime on a host without it raises :class:`EngineUnavailable`.
    """
    has_ort = importlib.util.find_spec("onnxruntime") is not None
    if setting == "auto":
        return "onnxruntime" if has_ort else "torch"
    if setting == "onnxruntime" and not has_ort:
        raise EngineUnavailable("engine_backend is onnxruntime, but onnxruntime is not installed")
    if setting not in ("onnxruntime", "torch"):
        raise EngineUnavailable(f"unknown engine_backend '{setting}' (auto, onnxruntime or torch)")
    return setting


def onnx_cache_path(cache_dir: Path, name: str, weights_digest: str, *, opset: int = ONNX_OPSET) -> Path:
    """Where the ONNX export of a network lives: keyed by its weights' hash and the opset."""
    return cache_dir / "onnx" / f"{name}-{weights_digest[:16]}-opset{opset}.onnx"


def ensure_onnx_export(
    module: Any,
    example: Any,
    path: Path,
    *,
    opset: int = ONNX_OPSET,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
) -> Path:
    """Exports a torch module (one input ``x``, one output ``y``) to ``path`` unless it is there.

    TorchScript-based export (``dynamo=False``); ``dynamic_axes`` defaults to
    dynamic batch, height and width. Written to a temporary file and renamed
    into place, so a crash never leaves half a model. Blocking; hold
    :data:`MODEL_LOAD_LOCK`.
    """
    import torch

    if path.is_file():
        return path
    axes = dynamic_axes or {"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 2: "oh", 3: "ow"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        log.info("exporting %s to ONNX (opset %d)", path.name, opset)
        with torch.no_grad():
            torch.onnx.export(
                module,
                (example,),
                staging,
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={k: dict(v) for k, v in axes.items()},
                opset_version=opset,
                dynamo=False,
            )
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return path


def onnx_session(path: Path, *, threads: int | None = None, providers: Sequence[str] | None = None) -> Any:
    """An ONNX Runtime session on the best providers the host has (full graph optimisation,
    denormals as zero, no spinning threads)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Denormals flushed to zero (as torch engines do with ``set_flush_denormal``), and no
    # busy-waiting intra-op threads stealing the CPU from other engines between runs.
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(
        str(path), sess_options=options, providers=list(providers or onnx_providers())
    )
