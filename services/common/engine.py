"""The engine interface every capability shares, and the pool of one service's engines.

An **engine** does one capability's work (a diffusers pipeline, a VLM, a TTS
model) and knows nothing of gRPC or protobuf: a servicer converts requests to
engine types, iterates :meth:`Engine.run` and converts what it yields back.
The lifecycle follows Triton's python backend and vLLM's ``EngineClient``:

* :meth:`Engine.load` builds or loads the model off the event loop; on failure
  the engine is *unavailable* and says why (:attr:`Engine.unavailable_reason`)
  instead of failing the whole process.
* :meth:`Engine.run` is an async iterator of :class:`~services.common.runner.Progress`
  events and, last, the result. Closing or cancelling the iterator (the client
  went away, the deadline passed) aborts the work at its next step.
* :meth:`Engine.abort` aborts the jobs of one request id; :meth:`Engine.close`
  aborts everything and frees the model; :meth:`Engine.health` reports state
  and queue depth.

Jobs run on a :class:`~services.common.runner.StepRunner`; models are built
or loaded with :mod:`services.common.model_cache` and, for exportable networks,
:mod:`services.common.onnx`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, TypeVar

from services.common.admission import QueuePolicy
from services.common.errors import InvalidRequest, MaintenanceMode, ProcessingError
from services.common.registry import ModelSpec, Registry
from services.common.runner import Progress, StepRunner

log = logging.getLogger(__name__)


RequestT = TypeVar("RequestT")
ResultT = TypeVar("ResultT")


class EngineState(StrEnum):
    NEW = "new"
    LOADING = "loading"
    READY = "ready"
    UNAVAILABLE = "unavailable"
    CLOSED = "closed"


#: The ``Retry-After`` of a request for a model still loading: a tiny model loads in about a
#: second, a real one in tens; five seconds keeps clients from hammering a loading service.
LOADING_RETRY_AFTER_SECONDS = 5.0


def still_loading(model_id: str) -> MaintenanceMode:
    """The error of a request for a model that is still loading (503 ``maintenance_mode``)."""
    return MaintenanceMode(
        f"Model '{model_id}' is still loading; please try again shortly.",
        retry_after=LOADING_RETRY_AFTER_SECONDS,
    )


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
    ``self.runner.start``) and optionally :meth:`close_blocking`.
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
        """Raises unless the engine can serve: :class:`MaintenanceMode` while it loads (a 503
        with ``Retry-After``), :class:`InvalidRequest` when it cannot serve here."""
        if self.state in (EngineState.NEW, EngineState.LOADING):
            raise still_loading(self.name)
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
            await self.runner.call(self.load_blocking, bounded=False)
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

    async def result(self, request: RequestT, *, request_id: str = "") -> ResultT:
        """:meth:`run` for callers that want only the result (the last event)."""
        result: ResultT | None = None
        async with aclosing(self.run(request, request_id=request_id)) as events:
            async for event in events:
                if not isinstance(event, Progress):
                    result = event
        if result is None:
            raise ProcessingError(f"The {self.name} job ended without a result.")
        return result

    def abort(self, request_id: str) -> int:
        """Stops the running jobs of one request at their next step; returns how many."""
        return self.runner.abort(request_id)

    def configure_queue(self, policy: QueuePolicy) -> None:
        """How the engine's queue admits jobs (:mod:`services.common.admission`); set before it
        loads. Engines that queue work elsewhere (a decode loop, a batcher) also apply it there."""
        self.runner.configure(policy)

    def close_blocking(self) -> None:
        """Frees the model (runs on the worker thread)."""

    async def close(self) -> None:
        """Aborts all work, frees the model, stops the worker."""
        if self.state is EngineState.CLOSED:
            return
        self.runner.abort_all()
        try:
            await self.runner.call(self.close_blocking, bounded=False)
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

    def configure_queues(self, policy: QueuePolicy) -> None:
        """Applies the queue policy of the settings to every engine (before they load). The
        pool builders are the capabilities' own; the one server builder calls this for all."""
        for engine in self.engines.values():
            engine.configure_queue(policy)

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
            raise still_loading(model_id)
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
    options: Mapping[str, Any] | None = None,
) -> EnginePool[RegistryEngineT]:
    """One engine per model (not loaded yet); a model whose engine ``service`` lacks is unavailable.
    ``options`` are the engines' own settings, passed to each constructor."""
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
            **(options or {}),
        )
    return EnginePool(engines, default=default, unavailable=unavailable)
