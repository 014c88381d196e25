"""Untrusted media is decoded in worker processes, so a decoder's native crash kills a worker, not the service.

``kiln up`` runs the edge, billing and every service in one process: a
segmentation fault in FFmpeg or a codec library while it reads a client's file
(a 7.1 FLAC once did exactly that) would take all of them down with it. So
every servicer decodes uploads through a :class:`DecodePool`:

* **Processes, never forked from the service.** The pool's workers are started
  with the ``spawn`` method (a fresh interpreter; forking a process that runs
  gRPC and torch threads is unsafe). They import only what the decode function
  needs (:mod:`services.common.media`: Pillow, and numpy + PyAV for audio), never
  torch.
* **One worker per slot, bounded.** The pool has ``workers`` slots, each a
  one-process :class:`~concurrent.futures.ProcessPoolExecutor`; an
  :class:`asyncio.Semaphore` lets at most ``workers`` decodes run at once (the
  rest wait their turn). Because a slot holds one process running one decode,
  a worker that dies is blamed on exactly the file it was decoding: that
  request gets a 400 ``invalid_request_error`` (see :data:`CRASH_MESSAGE`) and
  the slot's executor is replaced on its next use; every other request, queued
  or running in another slot, is unaffected.
* **Limits in the worker.** Each worker runs with an address-space limit
  (``memory_bytes``: an allocation past it is a ``MemoryError``, answered as a
  400), a CPU-time budget per decode (``cpu_seconds``: past it the kernel
  stops the worker with SIGXCPU, which is then a crash like any other) and no
  core dumps.

Why a crash is a 400, not a 500: the worker runs nothing but the decoder on the
client's bytes, so a crash there is caused by those bytes and retrying them
gives the same crash; the request costs nothing either way, and the answer
tells the client that the file is what to change.

The decoded data comes back pickled: a PIL image as its mode, size and raw
pixel bytes, audio as a numpy array (``bench/decode_isolation.py`` measures what
that costs against decoding in the service's own process). Functions passed to
:meth:`DecodePool.run` must be importable module-level functions (they are
pickled by name) whose arguments and results pickle.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import os
import resource
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, Final, TypeVar

from services.common.errors import InvalidRequest

if TYPE_CHECKING:  # the workers import this module: no settings (pydantic) there
    from services.common.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Worker processes (and concurrent decodes) per service by default.
DEFAULT_DECODE_WORKERS = 2
#: CPU seconds one decode may use before its worker is stopped.
DEFAULT_DECODE_CPU_SECONDS = 60
#: Address space of one worker process (its memory bound).
DEFAULT_DECODE_MEMORY_BYTES = 3 * 1024 * 1024 * 1024
#: The multiprocessing start method: a fresh interpreter, never a fork of the service.
START_METHOD: Final = "spawn"
#: What a request whose decode killed its worker is told (``what`` names the file).
CRASH_MESSAGE = "{what} could not be decoded: the decoder failed on it (the file is corrupt or malformed)"
#: What a request whose decode ran out of the worker's memory is told.
MEMORY_MESSAGE = "{what} needs more memory to decode than is allowed"


def start_worker(memory_bytes: int) -> None:
    """Runs once in each new worker: its memory bound, and no core files when it crashes.

    Also one BLAS / OpenMP thread (set before numpy is first imported here): decoding
    needs none, and per-thread buffers of a many-core host would eat the address space.
    """
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = "1"
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory_bytes > 0:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def cpu_budget(seconds: int) -> None:
    """In a worker: the kernel stops this process (SIGXCPU) after ``seconds`` more CPU seconds."""
    if seconds <= 0:
        return
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(usage.ru_utime + usage.ru_stime) + seconds
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _run_in_worker(
    fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any], cpu_seconds: int, what: str
) -> T:
    """Runs in the worker: ``fn(*args, **kwargs)`` within a CPU-time budget of its own."""
    cpu_budget(cpu_seconds)
    try:
        return fn(*args, **kwargs)
    except MemoryError:
        raise InvalidRequest(MEMORY_MESSAGE.format(what=what)) from None


class DecodePool:
    """A bounded pool of decode worker processes; see the module's documentation.

    Workers start on first use (and again after a crash); :meth:`close` stops them.
    Safe to share by every request of one service (one event loop).
    """

    def __init__(
        self,
        workers: int = DEFAULT_DECODE_WORKERS,
        *,
        cpu_seconds: int = DEFAULT_DECODE_CPU_SECONDS,
        memory_bytes: int = DEFAULT_DECODE_MEMORY_BYTES,
    ) -> None:
        if workers < 1:
            raise ValueError(f"a decode pool needs at least one worker, not {workers}")
        self.workers = workers
        self.cpu_seconds = cpu_seconds
        self.memory_bytes = memory_bytes
        self._context = multiprocessing.get_context(START_METHOD)
        self._executors: list[ProcessPoolExecutor | None] = [None] * workers
        self._free = list(range(workers))
        self._slots = asyncio.Semaphore(workers)
        #: Workers replaced after they died (for tests and logs).
        self.crashes = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> DecodePool:
        """A pool of ``decode_workers`` workers of ``decode_memory_bytes`` each."""
        return cls(settings.decode_workers, memory_bytes=settings.decode_memory_bytes)

    async def run(self, what: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in a worker process; its result, or its exception re-raised.

        ``what`` names the input in the error a crash answers with ("The image",
        "'ref_audio'"). Waits for a free slot first (at most ``workers`` decodes
        run at once). A worker that dies (a native crash, its CPU budget spent,
        killed) is :class:`InvalidRequest` for this call only. Cancelling the
        call does not stop a decode already running; its slot is freed when it
        ends.
        """
        await self._slots.acquire()
        index = self._free.pop()
        try:
            future = self._submit(index, fn, args, kwargs, what)
        except BaseException:
            self._release(index, None)
            raise
        loop = asyncio.get_running_loop()

        def done(finished: Future[Any]) -> None:
            try:
                loop.call_soon_threadsafe(self._release, index, finished)
            except RuntimeError:  # the loop is closed: nobody waits for this slot any more
                pass

        future.add_done_callback(done)
        try:
            return await asyncio.wrap_future(future)
        except BrokenProcessPool:
            raise InvalidRequest(CRASH_MESSAGE.format(what=what)) from None

    def _submit(
        self, index: int, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any], what: str
    ) -> Future[T]:
        for attempt in (1, 2):
            executor = self._executors[index]
            if executor is None:
                executor = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=self._context,
                    initializer=start_worker,
                    initargs=(self.memory_bytes,),
                )
                self._executors[index] = executor
            try:
                return executor.submit(_run_in_worker, fn, args, kwargs, self.cpu_seconds, what)
            except BrokenProcessPool:  # it broke after its last call ended: start afresh
                self._discard(index)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _release(self, index: int, finished: Future[Any] | None) -> None:
        if finished is not None and not finished.cancelled():
            if isinstance(finished.exception(), BrokenProcessPool):
                self.crashes += 1
                log.warning("a decode worker died; it is replaced for the next decode")
                self._discard(index)
        self._free.append(index)
        self._slots.release()

    def _discard(self, index: int) -> None:
        executor, self._executors[index] = self._executors[index], None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stops the workers (a decode still running finishes first, in the background)."""
        for index in range(self.workers):
            self._discard(index)
