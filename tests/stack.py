"""Extra pieces of the mesh for the money tests: a billing service on another database,
an edge in front of chosen upstreams, a fault-injecting gRPC proxy, and the books check.

The session's ``mesh`` (tests/conftest.py) keeps running; these start beside it on
loopback port 0 and share its capability services.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import psycopg
import pytest
from aiohttp import web

from services.billing.ledger import Ledger
from services.billing.server import BillingGrpcService
from services.common.settings import Settings

POSTGRES_ADMIN_URL = os.environ.get("KILN_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database (dropped afterwards); skipped without a server, failed under CI."""
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}: {exc}")
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}: {exc}")
    name = f"kiln_mesh_test_{secrets.token_hex(6)}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(POSTGRES_ADMIN_URL)
    try:
        yield urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def billing_service(settings: Settings) -> AsyncIterator[BillingGrpcService]:
    """A billing service for ``settings`` (its database), started on a loopback port."""
    from services.billing.server import create_service

    service = await create_service(settings, address="127.0.0.1:0")
    await service.start()
    try:
        yield service
    finally:
        await service.stop(1)


@dataclass
class Edge:
    url: str
    runner: web.AppRunner
    settings: Settings


@contextlib.asynccontextmanager
async def edge_app(settings: Settings) -> AsyncIterator[Edge]:
    """The edge for ``settings`` on a loopback port (cleaned up afterwards if still running)."""
    from edge.app import start_edge

    runner, url = await start_edge(settings, "127.0.0.1", 0)
    edge = Edge(url, runner, settings)
    try:
        yield edge
    finally:
        await runner.cleanup()


#: The capability services, by their settings' address names.


@dataclass
class OfflineStack:
    """Billing and the edge, no capability service (:func:`offline_stack`)."""

    edge: Edge
    ledger: Ledger

    @property
    def url(self) -> str:
        return self.edge.url

    async def customer(self, credits: str = "100", *, premium: bool = False) -> tuple[str, dict[str, str]]:
        """A fresh account with an API key and ``credits``: its id and its key's headers."""
        account = await self.ledger.create_account("test", premium=premium)
        if Decimal(credits) > 0:
            await self.ledger.add_credits(account.id, Decimal(credits), kind="grant")
        _, key = await self.ledger.create_api_key(account.id)
        return account.id, {"X-API-Key": key}


@contextlib.asynccontextmanager
async def offline_stack(data_dir: Path, **overrides: Any) -> AsyncIterator[OfflineStack]:
    """Billing (SQLite in ``data_dir``) and the edge on loopback, for what the edge decides
    before any capability call: every capability address leads nowhere unless ``overrides``
    (settings fields) name one."""
    from services.catalog import CAPABILITIES
    from services.common.settings import DEFAULT_REGISTRY, load_settings

    addresses = {entry.name: "127.0.0.1:1" for entry in CAPABILITIES} | overrides.pop("addresses", {})
    settings = load_settings(
        data_dir=data_dir, registry_path=DEFAULT_REGISTRY, addresses=addresses, **overrides
    )
    async with billing_service(settings) as billing:
        assert billing.ledger is not None
        settings = settings.with_addresses(billing=f"127.0.0.1:{billing.port}")
        async with edge_app(settings) as edge:
            yield OfflineStack(edge, billing.ledger)


@dataclass
class Books:
    """An account's money, as the ledger tells it."""

    balance: int
    held: int
    ledger_sum: int
    open_holds: int


async def books(ledger: Ledger, account_id: str) -> Books:
    """The account's books, read by one statement (one snapshot, also under PostgreSQL's
    READ COMMITTED, where each statement of a transaction sees a new one)."""
    row = await ledger.db.run(
        lambda tx: tx.one(
            "SELECT a.balance, a.held,"
            " (SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE account_id = a.id),"
            " (SELECT COUNT(*) FROM reservations WHERE account_id = a.id AND state = 'held')"
            " FROM accounts a WHERE a.id = ?",
            (account_id,),
        ),
        write=False,
    )
    assert row is not None
    return Books(*(int(value) for value in row))


async def settled_books(ledger: Ledger, account_id: str, *, seconds: float = 30.0) -> Books:
    """The books once no hold is open (releases of cancelled requests finish in the background)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        state = await books(ledger, account_id)
        if state.open_holds == 0 or asyncio.get_running_loop().time() > deadline:
            return state
        await asyncio.sleep(0.1)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, *, seconds: float = 60.0) -> None:
    """Returns once ``check()`` is true; fails after ``seconds``."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} did not happen within {seconds} s")
        await asyncio.sleep(0.01)


async def wait_for_hold(ledger: Ledger, account_id: str) -> None:
    """Returns once the account has credits held (a request of it was authorized)."""

    async def held() -> bool:
        return (await books(ledger, account_id)).held > 0

    await eventually(held, f"a hold on {account_id}")


def units(credits_header: str) -> int:
    """``X-Credits-Charged`` ("0.29") in hundredths of a credit."""
    return int(Decimal(credits_header) * 100)


class ChaosProxy:
    """A gRPC proxy that forwards every call to ``target`` byte for byte, failing a share of
    them: before the first message (UNAVAILABLE) or in the middle of a server stream (INTERNAL,
    as a crashing service does). ``failure_rate`` 0 forwards everything."""

    def __init__(self, target: str, *, failure_rate: float, seed: int = 0) -> None:
        self.target = target
        self.failure_rate = failure_rate
        self.random = random.Random(seed)
        self.failed = 0
        self.forwarded = 0
        self.port = 0
        self._channel: grpc.aio.Channel | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.target)
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers([_ProxyHandler(self)])
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
        if self._channel is not None:
            await self._channel.close()

    def fail_now(self) -> bool:
        return self.random.random() < self.failure_rate


class _ProxyHandler(grpc.GenericRpcHandler):
    def __init__(self, proxy: ChaosProxy) -> None:
        self.proxy = proxy

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        proxy = self.proxy
        assert proxy._channel is not None
        channel = proxy._channel
        metadata = tuple(handler_call_details.invocation_metadata or ())

        async def unary_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            failing = proxy.fail_now()
            if failing and proxy.random.random() < 0.5:
                proxy.failed += 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, "chaos: connection refused")
            call = channel.unary_stream(method)(request, metadata=metadata, timeout=context.time_remaining())
            sent = 0
            try:
                async for message in call:
                    if failing and sent >= 1:
                        proxy.failed += 1
                        await context.abort(grpc.StatusCode.INTERNAL, "chaos: the service crashed")
                    sent += 1
                    yield message
            finally:
                call.cancel()
            if failing:  # a one-message stream: fail at its end instead
                proxy.failed += 1
                await context.abort(grpc.StatusCode.INTERNAL, "chaos: the service crashed")
            proxy.forwarded += 1

        async def unary_unary(request: bytes, context: grpc.aio.ServicerContext) -> Any:
            if proxy.fail_now():
                proxy.failed += 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, "chaos: connection refused")
            proxy.forwarded += 1
            return await channel.unary_unary(method)(
                request, metadata=metadata, timeout=context.time_remaining()
            )

        if method.endswith(("/GenerateImages", "/EditImages", "/Synthesize", "/CloneVoice", "Music")):
            return grpc.unary_stream_rpc_method_handler(unary_stream)
        if method.endswith(("/UpscaleImage", "/SegmentImage", "/RemoveImageBackground")):
            return grpc.unary_unary_rpc_method_handler(unary_unary)
        return None
