"""A dynamic batcher, as Triton's: concurrent items with the same key run as one batch.

Any service whose engine takes fixed-shape work (upscaling tiles, segmentation
frames, same-size generations) can put a :class:`DynamicBatcher` in front of
its model::

    batcher = DynamicBatcher(run_batch, max_batch_size=8, window_ms=5.0,
                             key=lambda tile: tile.shape, call=engine.runner.call)
    result = await batcher.submit(tile)

``run_batch(items)`` is a *blocking* function that receives a list of items
sharing one key and returns one result per item, in order; an element that
is an exception instance is raised to that item's caller alone (Triton's
python backend: one error per request, so one bad request never fails the
others). If ``run_batch`` raises, or returns the wrong number of results, the
items of that batch (and only those) fail. It runs off the event loop through
``call`` (by default :func:`asyncio.to_thread`; engines pass their
``StepRunner.call``, so batches run on the engine's worker thread).

How a batch forms: the first item of a key opens a window of ``window_ms``;
the batch is dispatched when the window closes or ``max_batch_size`` items of
that key are waiting, whichever comes first. At most
``max_concurrent_batches`` batches run at once; while they run, new items keep
collecting, so under load batches fill up by themselves (the window only
matters when the model is idle). Items of different keys never share a
batch. A caller cancelled while its item waits takes the item out of the
queue; one cancelled while its batch runs simply does not get the result.

``enabled=False`` (or ``max_batch_size=1``) turns batching off: each item
runs alone, through the same ``call`` (the benchmark's "off" case), admitted
fairly across the callers' accounts (:class:`~services.common.admission.Slots`;
in arrival order within one). :attr:`stats` counts batches, items and batch sizes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from services.common.admission import Slots
from services.common.errors import ProcessingError

log = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

#: The blocking batch function: items of one key -> one result (or exception) per item.
RunBatch = Callable[[list[ItemT]], Sequence[ResultT | BaseException]]


def _no_key(item: Any) -> Hashable:
    return None


@dataclass(frozen=True)
class BatcherStats:
    """What a batcher has done so far."""

    batches: int
    items: int
    failed_batches: int
    #: Batch size -> how many batches had it.
    sizes: dict[int, int]
    #: Items waiting for a batch right now.
    pending: int
    largest: int

    @property
    def mean_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0


@dataclass
class _Waiting(Generic[ItemT, ResultT]):
    item: ItemT
    future: asyncio.Future[ResultT]
    arrived: float


@dataclass
class _Queue(Generic[ItemT, ResultT]):
    entries: collections.deque[_Waiting[ItemT, ResultT]] = field(default_factory=collections.deque)
    full: asyncio.Event = field(default_factory=asyncio.Event)
    flusher: asyncio.Task[None] | None = None


class DynamicBatcher(Generic[ItemT, ResultT]):
    """Collects concurrent items into batches per key and runs them off the event loop."""

    def __init__(
        self,
        run_batch: RunBatch[ItemT, ResultT],
        *,
        max_batch_size: int = 8,
        window_ms: float = 5.0,
        key: Callable[[ItemT], Hashable] = _no_key,
        name: str = "batcher",
        enabled: bool = True,
        max_concurrent_batches: int = 1,
        call: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if window_ms < 0:
            raise ValueError("window_ms must not be negative")
        if max_concurrent_batches < 1:
            raise ValueError("max_concurrent_batches must be at least 1")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.window = window_ms / 1000.0
        self.key = key
        self.name = name
        self.enabled = enabled and max_batch_size > 1
        self.max_concurrent_batches = max_concurrent_batches
        self._call = call or asyncio.to_thread
        self._queues: dict[Hashable, _Queue[ItemT, ResultT]] = {}
        self._slots: Slots | None = None
        self._batches = 0
        self._items = 0
        self._failed = 0
        self._sizes: collections.Counter[int] = collections.Counter()
        self._closed = False

    # --- public ---

    async def submit(self, item: ItemT) -> ResultT:
        """Queues ``item`` and returns its own result (or raises its own error)."""
        if self._closed:
            raise ProcessingError(f"The {self.name} batcher is shut down.")
        if not self.enabled:
            async with self._semaphore():
                results = await self._execute([item])
            return self._unwrap(results[0])
        loop = asyncio.get_running_loop()
        key = self.key(item)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue()
        waiting: _Waiting[ItemT, ResultT] = _Waiting(item, loop.create_future(), loop.time())
        queue.entries.append(waiting)
        if len(queue.entries) >= self.max_batch_size:
            queue.full.set()
        if queue.flusher is None:
            queue.flusher = asyncio.create_task(self._flush(key, queue), name=f"{self.name}-flush")
        try:
            return await waiting.future
        except asyncio.CancelledError:
            waiting.future.cancel()
            try:
                queue.entries.remove(waiting)
            except ValueError:
                pass  # already taken into a running batch; its result is dropped
            raise

    @property
    def stats(self) -> BatcherStats:
        pending = sum(len(q.entries) for q in self._queues.values())
        return BatcherStats(
            batches=self._batches,
            items=self._items,
            failed_batches=self._failed,
            sizes=dict(sorted(self._sizes.items())),
            pending=pending,
            largest=max(self._sizes, default=0),
        )

    async def close(self) -> None:
        """Fails every waiting item and stops forming batches (running ones finish)."""
        self._closed = True
        flushers = []
        for queue in self._queues.values():
            if queue.flusher is not None:
                queue.flusher.cancel()
                flushers.append(queue.flusher)
            while queue.entries:
                waiting = queue.entries.popleft()
                if not waiting.future.done():
                    waiting.future.set_exception(ProcessingError(f"The {self.name} batcher is shut down."))
        await asyncio.gather(*flushers, return_exceptions=True)
        self._queues.clear()

    # --- internals ---

    def _semaphore(self) -> Slots:
        # Fair across accounts (services.common.admission), not first come, first served: with
        # batching off, every item waits here; unbounded, the engine bounds its requests.
        if self._slots is None:
            self._slots = Slots(self.name, self.max_concurrent_batches)
        return self._slots

    async def _flush(self, key: Hashable, queue: _Queue[ItemT, ResultT]) -> None:
        """Waits for the window (or a full batch) and a free slot, then runs one batch."""
        loop = asyncio.get_running_loop()
        try:
            if queue.entries and len(queue.entries) < self.max_batch_size:
                remaining = queue.entries[0].arrived + self.window - loop.time()
                if remaining > 0:
                    try:
                        await asyncio.wait_for(queue.full.wait(), remaining)
                    except TimeoutError:
                        pass
            async with self._semaphore():
                batch: list[_Waiting[ItemT, ResultT]] = []
                while queue.entries and len(batch) < self.max_batch_size:
                    waiting = queue.entries.popleft()
                    if not waiting.future.done():
                        batch.append(waiting)
                queue.full.clear()
                if len(queue.entries) >= self.max_batch_size:
                    queue.full.set()
                # The rest (if any) waits for the next flusher; it forms while this batch runs.
                queue.flusher = None
                self._reschedule(key, queue)
                if batch:
                    await self._run(batch)
        finally:
            if queue.flusher is asyncio.current_task():
                queue.flusher = None

    def _reschedule(self, key: Hashable, queue: _Queue[ItemT, ResultT]) -> None:
        if self._closed:
            return
        if queue.entries:
            queue.flusher = asyncio.create_task(self._flush(key, queue), name=f"{self.name}-flush")
        elif self._queues.get(key) is queue:
            del self._queues[key]  # no empty queues left behind for one-off keys

    async def _run(self, batch: list[_Waiting[ItemT, ResultT]]) -> None:
        try:
            results = await self._execute([waiting.item for waiting in batch])
        except asyncio.CancelledError:  # the batcher is closing: nobody may wait forever
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(ProcessingError(f"The {self.name} batcher is shut down."))
            raise
        for waiting, result in zip(batch, results, strict=True):
            if waiting.future.done():
                continue  # the caller was cancelled while the batch ran
            if isinstance(result, BaseException):
                waiting.future.set_exception(result)
            else:
                waiting.future.set_result(result)

    async def _execute(self, items: list[ItemT]) -> list[ResultT | BaseException]:
        """Runs one batch; always returns one result or exception per item."""
        started = time.perf_counter()
        self._batches += 1
        self._items += len(items)
        self._sizes[len(items)] += 1
        try:
            results = list(await self._call(lambda: self.run_batch(items)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed += 1
            log.warning("%s: a batch of %d failed: %s", self.name, len(items), exc)
            return [exc] * len(items)
        if len(results) != len(items):
            self._failed += 1
            error = ProcessingError(
                f"The {self.name} batch returned {len(results)} results for {len(items)} items."
            )
            return [error] * len(items)
        log.debug("%s: batch of %d in %.1f ms", self.name, len(items), (time.perf_counter() - started) * 1000)
        return results

    @staticmethod
    def _unwrap(result: ResultT | BaseException) -> ResultT:
        if isinstance(result, BaseException):
            raise result
        return result
