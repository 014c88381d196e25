"""Rate limits in billing: the limiter (Envoy's RateLimitService, served by the billing server)
with memory and Redis counters, tiers and per-account overrides, and the jobs-in-flight limit
Authorize enforces in its transaction."""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from kiln.billing.v1 import billing_service_pb2 as pb
from kiln.billing.v1 import billing_service_pb2_grpc as pb_grpc
from kiln.vendor.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from services.billing.admin import add_admin_commands, run_admin
from services.billing.rate_limits import RequestCounter, get_limits, set_limits
from services.billing.server import BillingGrpcService
from services.common.errors import ErrorType, RateLimited
from services.common.grpc_client import error_from_rpc, mesh_channel
from services.common.settings import DEFAULT_REGISTRY, Settings, load_settings
from tests.stack import billing_service, postgres_database

REDIS_URL = "redis://127.0.0.1:6379"
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT
OK = rls_pb2.RateLimitResponse.OK
#: A segmented frame (sam3): 0.25 credits.
FRAME = pb.Usage(segmentation=pb.SegmentationUsage(model="sam3", frames=1))


@contextlib.contextmanager
def _database(kind: str) -> Iterator[dict[str, str]]:
    if kind == "postgresql":
        with postgres_database() as url:
            yield {"database_url": url}
    else:
        yield {}


@contextlib.asynccontextmanager
async def limited_billing(
    tmp_path: Path, **overrides: Any
) -> AsyncIterator[tuple[BillingGrpcService, Any, Any]]:
    """Billing with rate-limit settings, and stubs of its limiter and billing service as the edge.
    Every run counts under its own key prefix, so runs sharing one Redis never collide."""
    settings = load_settings(
        data_dir=tmp_path,
        registry_path=DEFAULT_REGISTRY,
        rate_limit_key_prefix=f"kiln-test-{secrets.token_hex(6)}",
        **overrides,
    )
    async with billing_service(settings) as service:
        channel = mesh_channel(f"127.0.0.1:{service.port}", settings, "edge")
        try:
            yield service, rls_pb2_grpc.RateLimitServiceStub(channel), pb_grpc.BillingServiceStub(channel)
        finally:
            await channel.close()


async def customer(
    service: BillingGrpcService, *, premium: bool = False, credits: str = "10"
) -> tuple[str, str]:
    ledger = service.ledger
    assert ledger is not None
    account = await ledger.create_account("limited", premium=premium)
    await ledger.add_credits(account.id, credits, kind="grant")
    _, key = await ledger.create_api_key(account.id)
    return account.id, key


def ask(credential: str, capability: str) -> rls_pb2.RateLimitRequest:
    entries = [
        rls_pb2.RateLimitDescriptor.Entry(key="credential", value=credential),
        rls_pb2.RateLimitDescriptor.Entry(key="capability", value=capability),
    ]
    return rls_pb2.RateLimitRequest(domain="kiln", descriptors=[rls_pb2.RateLimitDescriptor(entries=entries)])


@pytest.mark.parametrize("storage", ["memory://", REDIS_URL])
async def test_requests_per_minute_per_capability(tmp_path: Path, storage: str) -> None:
    async with limited_billing(
        tmp_path, rate_limit_rpm=2, rate_limit_capability_rpm={"chat": 3}, rate_limit_storage=storage
    ) as (service, limiter, _):
        _, key = await customer(service)
        answers = [await limiter.ShouldRateLimit(ask(key, "segmentation")) for _ in range(3)]
        assert [a.overall_code for a in answers] == [OK, OK, OVER]
        assert [a.statuses[0].limit_remaining for a in answers] == [1, 0, 0]
        over = answers[2]
        assert over.statuses[0].current_limit.requests_per_unit == 2
        assert over.statuses[0].current_limit.unit == rls_pb2.RateLimitResponse.RateLimit.MINUTE
        assert 0 < over.statuses[0].duration_until_reset.ToNanoseconds() / 1e9 <= 60
        headers = {h.key: h.value for h in over.response_headers_to_add}
        assert headers["x-ratelimit-limit-requests"] == "2"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert 1 <= int(headers["retry-after"]) <= 60 and int(headers["retry-after-ms"]) > 0
        body = json.loads(over.raw_body)
        assert body["error"]["type"] == ErrorType.RATE_LIMIT.value
        assert body["error"]["message"] == (
            "You have been ratelimited, this temporary restriction will be lifted in: "
            f"{headers['retry-after']} seconds"
        )
        # Another capability has its own budget (and its own limit); "Bearer <key>" is the same key.
        chat = [await limiter.ShouldRateLimit(ask(f"Bearer {key}", "chat")) for _ in range(4)]
        assert [a.overall_code for a in chat] == [OK, OK, OK, OVER]
        assert chat[0].statuses[0].current_limit.requests_per_unit == 3


async def test_premium_tier_and_per_account_overrides(tmp_path: Path) -> None:
    async with limited_billing(tmp_path, rate_limit_rpm=1, rate_limit_rpm_premium=3) as (service, limiter, _):
        _, standard = await customer(service)
        premium_id, premium = await customer(service, premium=True)
        assert (await limiter.ShouldRateLimit(ask(standard, "chat"))).statuses[
            0
        ].current_limit.requests_per_unit == 1
        assert (await limiter.ShouldRateLimit(ask(premium, "chat"))).statuses[
            0
        ].current_limit.requests_per_unit == 3
        assert service.ledger is not None
        await set_limits(service.ledger, premium_id, rpm=5, capability_rpm={"video": 0})
        limit = (await limiter.ShouldRateLimit(ask(premium, "music"))).statuses[0].current_limit
        assert limit.requests_per_unit == 5
        unlimited = await limiter.ShouldRateLimit(ask(premium, "video"))  # 0: no limit, not counted
        assert unlimited.overall_code == OK and not unlimited.statuses[0].HasField("current_limit")
        assert not unlimited.response_headers_to_add


async def test_unknown_credentials_and_run_tokens_pass_uncounted(tmp_path: Path) -> None:
    async with limited_billing(tmp_path, rate_limit_rpm=1) as (_, limiter, _billing):
        for credential in ("sk-kiln-nosuchkey", "Bearer a.b.c", "ktask_whatever", ""):
            for _ in range(3):
                answer = await limiter.ShouldRateLimit(ask(credential, "chat"))
                assert answer.overall_code == OK and not answer.response_headers_to_add
                assert not answer.statuses[0].HasField("current_limit")


async def test_the_limiter_takes_only_the_edge_and_envoy(tmp_path: Path) -> None:
    async with limited_billing(tmp_path, rate_limit_rpm=1) as (service, _, _billing):
        settings = load_settings(data_dir=tmp_path, registry_path=DEFAULT_REGISTRY)
        async with mesh_channel(f"127.0.0.1:{service.port}", settings, "operator") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(ask("x", "chat"))
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        async with mesh_channel(f"127.0.0.1:{service.port}", settings, "envoy") as channel:
            answer = await rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(ask("x", "chat"))
            assert answer.overall_code == OK


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
async def test_jobs_in_flight_refuse_the_third_hold_and_hold_nothing(tmp_path: Path, database: str) -> None:
    with _database(database) as db:
        async with limited_billing(tmp_path, rate_limit_max_concurrent=2, **db) as (service, _, billing):
            account_id, key = await customer(service)
            credential = pb.Credential(api_key=key)
            holds = [
                await billing.Authorize(
                    pb.AuthorizeRequest(credential=credential, usage=[FRAME], request_id=f"r{i}")
                )
                for i in range(2)
            ]
            assert service.ledger is not None
            before = await service.ledger.get_account(account_id)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await billing.Authorize(
                    pb.AuthorizeRequest(credential=credential, usage=[FRAME], request_id="r3")
                )
            error = error_from_rpc(refused.value)
            assert isinstance(error, RateLimited) and error.retry_after == 1.0
            assert error.message.endswith("will be lifted in: 1 seconds")
            after = await service.ledger.get_account(account_id)
            assert (after.balance, after.held) == (before.balance, before.held) == (1000 - 50, 50)
            # One ends: the next is accepted again.
            await billing.Release(pb.ReleaseRequest(reservation_id=holds[0].reservation.id))
            await billing.Authorize(
                pb.AuthorizeRequest(credential=credential, usage=[FRAME], request_id="r4")
            )


async def test_admin_limits_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings: Settings = load_settings(data_dir=tmp_path, registry_path=DEFAULT_REGISTRY)
    async with billing_service(settings) as service:
        account_id, _ = await customer(service)
    parser = argparse.ArgumentParser()
    add_admin_commands(parser.add_subparsers(dest="admin_command", required=True))

    async def admin(*argv: str) -> int:
        return await run_admin(parser.parse_args(list(argv)), settings)

    assert await admin("limits", account_id, "--rpm", "10", "--rpm", "chat=30", "--concurrent", "2") == 0
    from services.billing.admin import open_ledger

    ledger = await open_ledger(settings)
    try:
        own = await get_limits(ledger, account_id)
        assert own is not None and (own.rpm, dict(own.capability_rpm), own.max_concurrent) == (
            10,
            {"chat": 30},
            2,
        )
        assert await admin("limits", account_id, "--rpm", "chat=default", "--concurrent", "default") == 0
        own = await get_limits(ledger, account_id)
        assert own is not None and (own.rpm, dict(own.capability_rpm), own.max_concurrent) == (10, {}, None)
        assert await admin("limits", account_id, "--reset") == 0
        assert await get_limits(ledger, account_id) is None
    finally:
        await ledger.db.close()
    assert "tier default" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["limits", account_id, "--rpm", "-3"])


async def test_redis_counters_are_shared_between_limiters() -> None:
    """Two billing replicas (two counters) on one Redis count one budget."""
    prefix = f"kiln-test-{secrets.token_hex(6)}"
    first, second = RequestCounter(REDIS_URL, key_prefix=prefix), RequestCounter(REDIS_URL, key_prefix=prefix)
    assert (await first.hit("acct", "chat", 2)).allowed
    assert (await second.hit("acct", "chat", 2)).allowed
    refused = await first.hit("acct", "chat", 2)
    assert not refused.allowed and refused.remaining == 0 and 0 < refused.reset_seconds <= 60
    await first.clear("acct", "chat", 2)
