"""Fair admission (services.common.admission): the fair queue, the step runner's slots, and
the caller a real gRPC server hands the engines."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from PIL import Image

from kiln.upscale.v1 import upscale_service_pb2 as pb
from kiln.upscale.v1 import upscale_service_pb2_grpc as pb_grpc
from services.common.admission import (
    ACCOUNT_METADATA,
    TIER_METADATA,
    Caller,
    FairQueue,
    QueuePolicy,
    caller_from_metadata,
    caller_metadata,
    caller_var,
)
from services.common.engine import EnginePool
from services.common.errors import RateLimited
from services.common.grpc_client import error_from_rpc, mesh_channel
from services.common.media.image import encode_image
from services.common.registry import load_registry
from services.common.runner import StepControl, StepRunner
from services.common.settings import Settings
from services.upscale.engines import LanczosEngine
from services.upscale.server import create_service

A, B = Caller("flooder"), Caller("quiet")
GOLD = Caller("gold", premium=True)


def drain(queue: FairQueue[str]) -> list[str]:
    return list(queue.drain())


def test_a_quiet_account_is_admitted_before_the_flooders_next_job() -> None:
    queue: FairQueue[str] = FairQueue("m")
    queue.served(A)  # A's first job took the free slot
    for i in range(5):
        queue.push(f"a{i}", A)
    queue.push("b0", B)
    assert queue.pop() == "b0"
    queue.push("b1", B)  # B's next request, while A still floods
    assert drain(queue) == ["a0", "b1", "a1", "a2", "a3", "a4"]


def test_two_flooding_accounts_alternate_and_fifo_when_fairness_is_off() -> None:
    fair: FairQueue[str] = FairQueue("m")
    fifo: FairQueue[str] = FairQueue("m", QueuePolicy(fair=False))
    for queue in (fair, fifo):
        for i in range(3):
            queue.push(f"a{i}", A)
        for i in range(3):
            queue.push(f"b{i}", B)
    assert drain(fair) == ["a0", "b0", "a1", "b1", "a2", "b2"]
    assert drain(fifo) == ["a0", "a1", "a2", "b0", "b1", "b2"]


def test_the_premium_lane_goes_first_but_cannot_starve_standard() -> None:
    queue: FairQueue[str] = FairQueue("m")
    for i in range(3):
        queue.push(f"s{i}", A)
    for i in range(4):
        queue.push(f"p{i}", GOLD)
    assert drain(queue) == ["p0", "s0", "p1", "s1", "p2", "s2", "p3"]
    weighted: FairQueue[str] = FairQueue("m", QueuePolicy(premium_weight=2))
    for i in range(2):
        weighted.push(f"s{i}", A)
    for i in range(4):
        weighted.push(f"p{i}", GOLD)
    assert drain(weighted) == ["p0", "p1", "s0", "p2", "p3", "s1"]


def test_a_full_queue_refuses_and_queues_nothing() -> None:
    queue: FairQueue[str] = FairQueue("tiny-model", QueuePolicy(max_waiting=3, max_waiting_per_account=2))
    queue.push("a0", A)
    queue.push("a1", A)
    with pytest.raises(RateLimited, match="too many requests waiting for tiny-model"):
        queue.push("a2", A)
    queue.push("b0", B)
    with pytest.raises(RateLimited, match="The tiny-model queue is full; try again in a few seconds") as err:
        queue.push("b1", B)
    assert err.value.retry_after == 2.0
    assert len(queue) == 3 and queue.waiting_of(A.account) == 2
    assert queue.remove("a1") and not queue.remove("a1")
    queue.push("b1", B)  # a removed job frees its place
    queue.push("late", A, bounded=False)  # work already admitted is never refused
    assert sorted(drain(queue)) == ["a0", "b0", "b1", "late"]


def test_caller_metadata_round_trips() -> None:
    gold = caller_metadata(GOLD)
    assert dict(gold) == {ACCOUNT_METADATA: "gold", TIER_METADATA: "premium"}
    assert caller_from_metadata(gold) == GOLD
    assert caller_from_metadata([("x-request-id", "r")]) == Caller()
    assert caller_metadata(Caller()) == ()


def test_the_edge_names_the_caller_in_every_call_once_billing_knows_it() -> None:
    from edge.clients import _Client

    client = _Client(None, timeout=1.0, token="t")
    context = contextvars.copy_context()
    assert ACCOUNT_METADATA not in dict(context.run(client._metadata, "r"))  # before Authorize
    context.run(caller_var.set, GOLD)  # what edge.flow sets once billing authorized the request
    sent = dict(context.run(client._metadata, "r"))
    assert (sent["x-request-id"], sent[ACCOUNT_METADATA], sent[TIER_METADATA]) == ("r", "gold", "premium")


# --- the step runner's slots ---


def blocker() -> tuple[threading.Event, Callable[[StepControl], str]]:
    gate = threading.Event()

    def job(control: StepControl) -> str:
        gate.wait(10)
        return "first"

    return gate, job


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_the_runner_admits_the_quiet_account_next_and_frees_a_cancelled_place() -> None:
    runner = StepRunner("m", policy=QueuePolicy(max_waiting=4))
    order: list[str] = []
    gate, first = blocker()

    def named(name: str) -> Callable[[StepControl], None]:
        return lambda control: order.append(name)

    try:
        caller_var.set(A)
        running = asyncio.create_task(runner.result(first))
        await settle()
        flood = [asyncio.create_task(runner.result(named(f"a{i}"))) for i in range(3)]
        await settle()
        caller_var.set(B)
        quiet = asyncio.create_task(runner.result(named("b")))
        await settle()
        assert (runner.running, runner.waiting) == (1, 4)
        with pytest.raises(RateLimited, match="The m queue is full"):
            await runner.result(named("refused"))
        flood[2].cancel()  # a waiting job whose consumer left frees its place at once
        await settle()
        assert runner.waiting == 3
        extra = asyncio.create_task(runner.result(named("b2")))
        await settle()
        assert runner.waiting == 4
        gate.set()
        await asyncio.gather(running, quiet, extra, *flood[:2])
        assert order == ["b", "a0", "b2", "a1"]
        assert runner.waiting == 0 and runner.running == 0
        assert [r.outcome for r in runner.reports] == ["completed"] * 5
    finally:
        gate.set()
        runner.shutdown()


async def test_runner_calls_are_admitted_fairly_and_unbounded_calls_never_refused() -> None:
    runner = StepRunner("m", policy=QueuePolicy(max_waiting=1))
    gate = threading.Event()
    order: list[str] = []
    try:
        caller_var.set(A)
        running = asyncio.create_task(runner.call(lambda: gate.wait(10)))
        await settle()
        waiting = asyncio.create_task(runner.call(lambda: order.append("a")))
        await settle()
        with pytest.raises(RateLimited):
            await runner.call(lambda: order.append("refused"))
        unbounded = asyncio.create_task(runner.call(lambda: order.append("load"), bounded=False))
        await settle()
        assert runner.waiting == 2
        gate.set()
        await asyncio.gather(running, waiting, unbounded)
        assert order == ["a", "load"]
    finally:
        gate.set()
        runner.shutdown()


# --- through a real gRPC server ---


async def test_a_full_engine_queue_is_a_429_and_the_server_sees_the_caller(tmp_path: Path) -> None:
    """The lanczos method runs each request as one runner call: with its worker held, the
    callers' accounts (metadata) decide the order, and a full queue answers RESOURCE_EXHAUSTED
    with the rate_limit_error reason."""
    settings = Settings(data_dir=tmp_path, engine_queue_max=3, engine_queue_max_per_account=2)
    registry = load_registry(settings.registry_path)
    spec = registry.get("lanczos")
    assert spec is not None
    engine = LanczosEngine(spec, weights_dir=None, cache_dir=tmp_path)
    pool = EnginePool({"lanczos": engine}, default="lanczos")
    service = await create_service(settings, address="127.0.0.1:0", registry=registry, pool=pool)
    await service.start()
    channel = mesh_channel(f"127.0.0.1:{service.port}", settings, "tests")
    stub = pb_grpc.UpscaleServiceStub(channel)
    gate = threading.Event()
    image = encode_image(Image.new("RGB", (8, 8), "red"), "png")
    try:
        await pool.wait_loaded()
        assert engine.runner.policy.max_waiting == 3  # the settings reached the engine
        caller_var.set(A)  # the flooding account's first job holds the worker
        held = asyncio.create_task(engine.runner.call(lambda: gate.wait(10)))

        async def upscale(caller: Caller) -> pb.UpscaleImageResponse:
            request = pb.UpscaleImageRequest(method="lanczos", image=image, scale=2)
            return await stub.UpscaleImage(request, metadata=caller_metadata(caller))

        finished: list[str] = []

        def call(caller: Caller) -> asyncio.Task[pb.UpscaleImageResponse]:
            task = asyncio.create_task(upscale(caller))
            task.add_done_callback(lambda _: finished.append(caller.account))
            return task

        flood = [call(A) for _ in range(2)]
        for _ in range(50):
            if engine.runner.waiting == 2:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(A)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        err = error_from_rpc(refused.value)
        assert isinstance(err, RateLimited) and "too many requests waiting for lanczos" in err.message
        quiet = call(B)
        for _ in range(50):
            if engine.runner.waiting == 3:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(grpc.aio.AioRpcError) as full:
            await call(Caller("third"))
        assert "The lanczos queue is full" in (full.value.details() or "")
        gate.set()
        await asyncio.gather(held, quiet, *flood)
        # the quiet account's request went ahead of the flood (refused calls finished first)
        assert finished[-3:] == ["quiet", "flooder", "flooder"]
    finally:
        gate.set()
        await channel.close()
        await service.stop(1)
