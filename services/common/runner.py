"""The worker that runs an engine's blocking, step-wise jobs: :class:`StepRunner`.

It runs blocking, step-wise jobs (a diffusers ``__call__``) on the engine's own
worker thread(s), one job at a time by default. Jobs wait for a worker in a
bounded, fair queue (:class:`~services.common.admission.Slots`: per-account
fair queuing, a premium lane; a full queue refuses the job with
:class:`~services.common.errors.RateLimited`). The job reports each finished
step through its :class:`StepControl`; the runner bridges those reports to the
event loop as :class:`Progress` events, measures queue time (waiting for a
slot) and run time, and when the consumer is cancelled sets a flag that makes
the job's next step report raise :class:`JobCancelled`, so the job unwinds and
the slot is freed right after that step.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from services.common.admission import Caller, QueuePolicy, Slots
from services.common.errors import ProcessingError

log = logging.getLogger(__name__)


T = TypeVar("T")


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

    One runner per engine. :meth:`start` runs a job as a :class:`RunningJob`
    (its :class:`Progress` events, then its :class:`JobOutcome`), :meth:`result`
    runs one to its outcome; :meth:`call` runs a plain blocking function
    (model loading) on the same worker threads. Jobs are admitted by ``policy``
    (:class:`~services.common.admission.QueuePolicy`), for the caller of the
    current request (:data:`~services.common.admission.caller_var`) unless one is given.
    """

    def __init__(
        self, name: str, *, concurrency: int = 1, history: int = 64, policy: QueuePolicy | None = None
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.name = name
        self.concurrency = concurrency
        self.policy = policy or QueuePolicy()
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"engine-{name}")
        self._slots: Slots | None = None
        self._controls: dict[int, tuple[str, StepControl]] = {}
        self._next_id = 0
        self.reports: collections.deque[JobReport] = collections.deque(maxlen=history)
        self._closed = False

    @property
    def running(self) -> int:
        return len(self._controls)

    @property
    def waiting(self) -> int:
        """Jobs (and calls) waiting for a worker."""
        return self._slots.waiting if self._slots is not None else 0

    def configure(self, policy: QueuePolicy) -> None:
        """Sets the admission policy (before any job is queued: the engine pool does it
        when the service is built)."""
        if self._slots is not None and self._slots.waiting:
            raise RuntimeError(f"engine {self.name}: the queue policy cannot change while jobs wait")
        self.policy = policy
        if self._slots is not None:
            self._slots.queue.policy = policy

    def _semaphore(self) -> Slots:
        if self._slots is None:
            self._slots = Slots(self.name, self.concurrency, self.policy)
        return self._slots

    async def call(self, fn: Callable[[], T], *, bounded: bool = True, caller: Caller | None = None) -> T:
        """Runs ``fn`` on a worker thread once a slot is free (no progress, no cancellation).

        ``bounded=False`` queues it even when the queue is full (model loading and closing,
        the batches of work already admitted)."""
        if self._closed:
            raise RuntimeError(f"engine {self.name} is closed")
        slots = self._semaphore()
        await slots.acquire(caller, bounded=bounded)
        try:
            return await asyncio.wrap_future(self._executor.submit(fn))
        finally:
            slots.release()

    async def _stream(
        self, job: Callable[[StepControl], T], *, key: str = "", label: str = "", caller: Caller | None = None
    ) -> AsyncGenerator[Progress | JobOutcome[T], None]:
        """Runs ``job(control)`` on a worker thread, yielding its progress and then its outcome.

        ``key`` groups jobs for :meth:`abort` (e.g. the request id). Exceptions
        raised by the job propagate to the consumer, as does
        :class:`~services.common.errors.RateLimited` when the queue is full (at the
        first iteration: nothing was queued); a job stopped by
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
        await slots.acquire(caller)
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

    def start(
        self, job: Callable[[StepControl], T], *, key: str = "", label: str = "", caller: Caller | None = None
    ) -> RunningJob[T]:
        """:meth:`_stream` as a :class:`RunningJob`: iterate it for progress, then read its outcome.

        ``caller`` (default: the current request's, read when iteration starts) is whom the
        job is queued for."""
        return RunningJob(self._stream(job, key=key, label=label, caller=caller))

    async def result(
        self, job: Callable[[StepControl], T], *, key: str = "", label: str = ""
    ) -> JobOutcome[T]:
        """Runs ``job`` to the end, ignoring its progress, and returns its outcome."""
        async with self.start(job, key=key, label=label) as running:
            return await running.wait()

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


class RunningJob(Generic[T]):
    """A job on a :class:`StepRunner`: an async iterator of its :class:`Progress` and, once
    that ends, its :attr:`outcome`. Use it as an async context manager, so that leaving
    early (the consumer was cancelled or closed) stops the job at its next step::

        async with self.runner.start(job, key=request_id) as running:
            async for progress in running:
                yield progress
        value = running.outcome.value
    """

    def __init__(self, events: AsyncGenerator[Progress | JobOutcome[T], None]) -> None:
        self._events = events
        self._outcome: JobOutcome[T] | None = None

    async def __aenter__(self) -> RunningJob[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._events.aclose()

    def __aiter__(self) -> RunningJob[T]:
        return self

    async def __anext__(self) -> Progress:
        if self._outcome is not None:
            raise StopAsyncIteration
        event = await self._events.__anext__()
        if isinstance(event, JobOutcome):
            self._outcome = event
            raise StopAsyncIteration
        return event

    @property
    def outcome(self) -> JobOutcome[T]:
        """What the job returned, with its timings (once iteration has ended)."""
        if self._outcome is None:  # the runner always ends with an outcome or an exception
            raise ProcessingError("The job ended without a result.")
        return self._outcome

    async def wait(self) -> JobOutcome[T]:
        """Skips the remaining progress and returns the outcome."""
        async for _ in self:
            pass
        return self.outcome
