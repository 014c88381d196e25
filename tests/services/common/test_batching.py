"""The dynamic batcher: batches form per key within the window and size limit; every
caller gets its own result or its own error; cancellation and shutdown free callers.

Timing-free: a gate (a threading.Event the batch function waits on) holds the
first batch on the worker while later items queue up, so what forms next is
decided by the queue, not by a clock.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from services.common.batching import DynamicBatcher
from services.common.errors import ProcessingError


class Recorder:
    """A batch function: doubles numbers, fails on negatives, records every batch it ran."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = gate
        self.started = threading.Event()

    def __call__(self, items: list[int]) -> Sequence[int | BaseException]:
        self.started.set()
        if self.gate is not None:
            self.gate.wait(30)
        self.batches.append(list(items))
        return [ValueError(f"negative {i}") if i < 0 else i * 2 for i in items]


async def wait_started(recorder: Recorder) -> None:
    await asyncio.to_thread(recorder.started.wait, 30)


async def test_concurrent_callers_get_their_own_results() -> None:
    recorder = Recorder()
    batcher = DynamicBatcher(recorder, max_batch_size=4, window_ms=50.0)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
    assert results == [i * 2 for i in range(10)]
    assert sorted(x for batch in recorder.batches for x in batch) == list(range(10))
    assert all(len(batch) <= 4 for batch in recorder.batches)
    stats = batcher.stats
    assert stats.items == 10 and stats.batches == len(recorder.batches) and stats.largest <= 4
    assert sum(size * count for size, count in stats.sizes.items()) == 10


async def test_items_waiting_while_a_batch_runs_form_full_batches() -> None:
    gate = threading.Event()
    recorder = Recorder(gate)
    batcher = DynamicBatcher(recorder, max_batch_size=3, window_ms=0.0)
    first = asyncio.ensure_future(batcher.submit(100))
    await wait_started(recorder)  # the worker is busy with [100]
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(7)]
    await asyncio.sleep(0)
    gate.set()
    assert await first == 200
    assert [await r for r in rest] == [i * 2 for i in range(7)]
    assert recorder.batches == [[100], [0, 1, 2], [3, 4, 5], [6]]
    assert batcher.stats.sizes == {1: 2, 3: 2}


async def test_one_failing_item_fails_only_its_caller() -> None:
    batcher = DynamicBatcher(Recorder(), max_batch_size=8, window_ms=20.0)
    results = await asyncio.gather(*(batcher.submit(i) for i in (1, -2, 3)), return_exceptions=True)
    assert results[0] == 2 and results[2] == 6
    assert isinstance(results[1], ValueError) and "negative -2" in str(results[1])


async def test_a_failing_batch_fails_only_its_own_items() -> None:
    gate = threading.Event()
    calls: list[list[str]] = []
    started = threading.Event()

    def run(items: list[str]) -> list[str]:
        started.set()
        gate.wait(30)
        calls.append(items)
        if "boom" in items:
            raise RuntimeError("the model crashed")
        return [s.upper() for s in items]

    batcher = DynamicBatcher(run, max_batch_size=2, window_ms=0.0, key=len)
    first = asyncio.ensure_future(batcher.submit("ok"))
    await asyncio.to_thread(started.wait, 30)
    bad = [asyncio.ensure_future(batcher.submit(s)) for s in ("boom", "bang")]
    good = [asyncio.ensure_future(batcher.submit(s)) for s in ("a", "b")]
    await asyncio.sleep(0)
    gate.set()
    assert await first == "OK"
    assert await asyncio.gather(*good) == ["A", "B"]
    for fut in bad:
        with pytest.raises(RuntimeError, match="crashed"):
            await fut
    assert batcher.stats.failed_batches == 1


async def test_keys_are_never_mixed() -> None:
    recorder_batches: list[list[tuple[str, int]]] = []

    def run(items: list[tuple[str, int]]) -> list[str]:
        recorder_batches.append(items)
        return [f"{k}{v}" for k, v in items]

    batcher = DynamicBatcher(run, max_batch_size=8, window_ms=30.0, key=lambda item: item[0])
    items = [("a" if i % 2 else "b", i) for i in range(12)]
    results = await asyncio.gather(*(batcher.submit(item) for item in items))
    assert results == [f"{k}{v}" for k, v in items]
    for batch in recorder_batches:
        assert len({k for k, _ in batch}) == 1
    assert sum(len(b) for b in recorder_batches) == 12


async def test_size_limit_dispatches_without_waiting_for_the_window() -> None:
    recorder = Recorder()
    # A window far longer than any test: a full batch must not wait for it.
    batcher = DynamicBatcher(recorder, max_batch_size=4, window_ms=600_000.0)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(4))) == [0, 2, 4, 6]
    assert recorder.batches == [[0, 1, 2, 3]]


async def test_window_dispatches_a_partial_batch() -> None:
    recorder = Recorder()
    batcher = DynamicBatcher(recorder, max_batch_size=8, window_ms=1.0)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(3))) == [0, 2, 4]
    assert recorder.batches == [[0, 1, 2]]


async def test_cancelled_waiting_caller_leaves_the_queue() -> None:
    gate = threading.Event()
    recorder = Recorder(gate)
    batcher = DynamicBatcher(recorder, max_batch_size=4, window_ms=0.0)
    first = asyncio.ensure_future(batcher.submit(1))
    await wait_started(recorder)
    waiting = [asyncio.ensure_future(batcher.submit(i)) for i in (10, 11, 12)]
    await asyncio.sleep(0)
    assert batcher.stats.pending == 3
    waiting[1].cancel()
    await asyncio.sleep(0)
    assert batcher.stats.pending == 2
    gate.set()
    assert await first == 2
    assert await waiting[0] == 20 and await waiting[2] == 24
    assert waiting[1].cancelled()
    assert recorder.batches == [[1], [10, 12]]


async def test_disabled_runs_items_one_by_one() -> None:
    recorder = Recorder()
    for batcher in (
        DynamicBatcher(recorder, max_batch_size=8, window_ms=50.0, enabled=False),
        DynamicBatcher(recorder, max_batch_size=1, window_ms=50.0),
    ):
        recorder.batches.clear()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(5)), return_exceptions=True)
        assert results == [0, 2, 4, 6, 8]
        assert sorted(recorder.batches) == [[i] for i in range(5)]
        assert batcher.stats.sizes == {1: 5}
    with pytest.raises(ValueError, match="negative"):
        await DynamicBatcher(recorder, enabled=False).submit(-1)


async def test_wrong_result_count_fails_the_batch() -> None:
    batcher: DynamicBatcher[int, int] = DynamicBatcher(lambda items: [1], max_batch_size=4, window_ms=20.0)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ProcessingError) for r in results)


async def test_runs_through_the_given_call_off_the_loop() -> None:
    threads: list[str] = []
    loop_thread = threading.current_thread().name

    def run(items: list[int]) -> list[int]:
        threads.append(threading.current_thread().name)
        return items

    async def call(fn):  # type: ignore[no-untyped-def]
        return await asyncio.to_thread(fn)

    batcher = DynamicBatcher(run, max_batch_size=2, window_ms=1.0, call=call)
    assert await asyncio.gather(batcher.submit(1), batcher.submit(2)) == [1, 2]
    assert threads and loop_thread not in threads


async def test_close_fails_waiting_items_and_refuses_new_ones() -> None:
    gate = threading.Event()
    recorder = Recorder(gate)
    batcher = DynamicBatcher(recorder, max_batch_size=4, window_ms=0.0)
    first = asyncio.ensure_future(batcher.submit(1))
    await wait_started(recorder)
    queued = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0)
    close = asyncio.ensure_future(batcher.close())
    await asyncio.sleep(0)
    gate.set()
    await close
    with pytest.raises(ProcessingError, match="shut down"):
        await queued
    await asyncio.gather(first, return_exceptions=True)
    with pytest.raises(ProcessingError, match="shut down"):
        await batcher.submit(3)
