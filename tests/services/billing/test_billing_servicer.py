"""The billing gRPC service, over a real server on a loopback port."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln.billing.v1 import billing_service_pb2 as pb
from kiln.billing.v1 import billing_service_pb2_grpc as pb_grpc
from services.billing.admin import add_admin_commands, run_admin
from services.billing.ledger import AccountRecord, Ledger
from services.billing.server import SERVICE_NAME, BillingGrpcService, create_service
from services.common.errors import AUTHENTICATION_MESSAGE, MAINTENANCE_MESSAGE, ErrorType
from services.common.grpc_client import create_channel, error_from_rpc
from services.common.settings import DEFAULT_REGISTRY, Settings

from .billing_fakes import FakeClock

SECRET = "servicer-test-secret-of-32-bytes-or-more"
PREMIUM_ONLY_MODEL = """
[[models]]
id = "vip-model"
capability = "text-to-image"
engine = "zimage"

[models.limits]
max_width = 1024
max_height = 1024

[models.defaults]
steps = 4

[models.price]
base = "1"
reference_steps = 4
premium_only = true
"""


@dataclass
class Billing:
    service: BillingGrpcService
    stub: Any
    channel: grpc.aio.Channel
    settings: Settings
    ledger: Ledger
    clock: FakeClock

    async def account(self, credits: str, *, premium: bool = False) -> tuple[AccountRecord, str]:
        account = await self.ledger.create_account("caller", premium=premium, external_id=None)
        if Decimal(credits):
            await self.ledger.add_credits(account.id, Decimal(credits), kind="grant")
        _, key = await self.ledger.create_api_key(account.id)
        return account, key


@pytest.fixture
async def billing(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Billing]:
    registry = tmp_path / "registry.toml"
    registry.write_text(DEFAULT_REGISTRY.read_text() + PREMIUM_ONLY_MODEL)
    settings = Settings(
        data_dir=tmp_path / "data",
        registry_path=registry,
        jwt_hs256_secret=SECRET,
        reservation_ttl_seconds=60,
        expiry_sweep_seconds=0.02,
    )
    service = await create_service(settings, address="127.0.0.1:0", clock=clock)
    await service.start()
    channel = create_channel(f"127.0.0.1:{service.port}")
    assert service.ledger is not None
    try:
        yield Billing(service, pb_grpc.BillingServiceStub(channel), channel, settings, service.ledger, clock)
    finally:
        await channel.close()
        await service.stop(0)


def image(model: str = "z-image-turbo", size: int = 1024, steps: int = 8, count: int = 1) -> pb.Usage:
    return pb.Usage(
        image_generation=pb.ImageGenerationUsage(
            model=model, width=size, height=size, steps=steps, count=count
        )
    )


def authorize(key: str, request_id: str = "req-1", *usage: pb.Usage, **kwargs: Any) -> pb.AuthorizeRequest:
    return pb.AuthorizeRequest(
        credential=pb.Credential(api_key=key), usage=list(usage) or [image()], request_id=request_id, **kwargs
    )


async def rpc_error(call: Awaitable[Any]) -> tuple[grpc.StatusCode, ErrorType, str]:
    """The status code, ErrorInfo reason and message of a failed call."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    err = error_from_rpc(info.value)
    return info.value.code(), err.error_type, err.message


async def admin(settings: Settings, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="kiln admin")
    add_admin_commands(parser.add_subparsers(dest="admin_command", required=True))
    return await run_admin(parser.parse_args(argv), settings)


# --- the happy path ---


async def test_authorize_holds_the_quoted_price_and_commit_charges_it(billing: Billing) -> None:
    account, key = await billing.account("10")
    reply = await billing.stub.Authorize(authorize(key, "req-1", image(), image(size=512, count=2)))
    assert list(reply.item_amounts_hundredths) == [78, 78]
    assert reply.reservation.amount_hundredths == 156
    assert reply.reservation.state == pb.RESERVATION_STATE_HELD
    assert reply.reservation.expires_at_ms == int(billing.clock() * 1000) + 60_000
    assert (reply.account.id, reply.account.balance_hundredths, reply.account.held_hundredths) == (
        account.id,
        844,
        156,
    )
    committed = await billing.stub.Commit(
        pb.CommitRequest(reservation_id=reply.reservation.id, amount_hundredths=100)
    )
    assert committed.reservation.state == pb.RESERVATION_STATE_COMMITTED
    assert committed.reservation.charged_hundredths == 100
    again = await billing.stub.Commit(
        pb.CommitRequest(reservation_id=reply.reservation.id, amount_hundredths=100)
    )
    assert again.reservation == committed.reservation
    got = await billing.stub.GetAccount(pb.GetAccountRequest(account_id=account.id))
    assert (got.account.balance_hundredths, got.account.held_hundredths) == (900, 0)


async def test_authorize_with_the_same_request_id_returns_the_first_hold(billing: Billing) -> None:
    _, key = await billing.account("10")
    first = await billing.stub.Authorize(authorize(key, "retry"))
    second = await billing.stub.Authorize(authorize(key, "retry"))
    assert second.reservation == first.reservation
    assert second.account.held_hundredths == 78


async def test_authorize_accepts_a_bearer_api_key_and_a_jwt(billing: Billing) -> None:
    account, key = await billing.account("10")
    await billing.ledger.db.run(
        lambda tx: tx.execute("UPDATE accounts SET external_id = 'user-7' WHERE id = ?", (account.id,))
    )
    token = jwt.encode({"sub": "user-7", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    for credential in (pb.Credential(bearer_token=key), pb.Credential(bearer_token=token)):
        reply = await billing.stub.Authorize(
            pb.AuthorizeRequest(
                credential=credential, usage=[image()], request_id=credential.WhichOneof("kind")
            )
        )
        assert reply.account.id == account.id
    who = await billing.stub.Authenticate(
        pb.AuthenticateRequest(credential=pb.Credential(bearer_token=token))
    )
    assert who.account.id == account.id


async def test_premium_account_is_authorized_for_nothing(billing: Billing) -> None:
    _, key = await billing.account("0", premium=True)
    reply = await billing.stub.Authorize(
        authorize(key, "p", image(), image(model="vip-model", size=512, steps=4))
    )
    assert list(reply.item_amounts_hundredths) == [0, 0]
    assert reply.reservation.amount_hundredths == 0
    assert reply.account.balance_hundredths == 0


async def test_quote_gives_list_prices_and_zero_for_premium(billing: Billing) -> None:
    vip, _ = await billing.account("0", premium=True)
    listed = await billing.stub.Quote(pb.QuoteRequest(usage=[image(count=3)]))
    assert (listed.amount_hundredths, list(listed.item_amounts_hundredths)) == (234, [234])
    free = await billing.stub.Quote(pb.QuoteRequest(account_id=vip.id, usage=[image(count=3)]))
    assert free.amount_hundredths == 0


async def test_speech_cloning_and_music_cost_their_models_flat_price(billing: Billing) -> None:
    usage = [
        pb.Usage(speech=pb.SpeechUsage(model="piper-joe", characters=40)),
        pb.Usage(speech=pb.SpeechUsage(model="qwen3-tts-base", characters=4000)),
        pb.Usage(music=pb.MusicUsage(model="ace-step-v1.5", duration_seconds=600)),
    ]
    listed = await billing.stub.Quote(pb.QuoteRequest(usage=usage))
    assert list(listed.item_amounts_hundredths) == [10, 100, 100]
    vip, _ = await billing.account("0", premium=True)
    free = await billing.stub.Quote(pb.QuoteRequest(account_id=vip.id, usage=usage))
    assert free.amount_hundredths == 0


async def test_reserve_and_release_return_the_credits(billing: Billing) -> None:
    account, _ = await billing.account("10")
    held = await billing.stub.Reserve(
        pb.ReserveRequest(account_id=account.id, amount_hundredths=250, request_id="r", ttl_seconds=5)
    )
    assert held.reservation.expires_at_ms == int(billing.clock() * 1000) + 5000
    released = await billing.stub.Release(pb.ReleaseRequest(reservation_id=held.reservation.id))
    assert released.reservation.state == pb.RESERVATION_STATE_RELEASED
    got = await billing.stub.GetAccount(pb.GetAccountRequest(account_id=account.id))
    assert got.account.balance_hundredths == 1000


# --- errors, each with its status code and ErrorInfo reason ---


async def test_unknown_api_key_is_unauthenticated(billing: Billing) -> None:
    code, reason, message = await rpc_error(billing.stub.Authorize(authorize("sk-kiln-not-a-key")))
    assert (code, reason, message) == (
        grpc.StatusCode.UNAUTHENTICATED,
        ErrorType.AUTHENTICATION,
        AUTHENTICATION_MESSAGE,
    )
    missing = pb.AuthorizeRequest(usage=[image()], request_id="r")
    assert (await rpc_error(billing.stub.Authorize(missing)))[:2] == (
        grpc.StatusCode.UNAUTHENTICATED,
        ErrorType.AUTHENTICATION,
    )


async def test_expired_jwt_is_unauthenticated(billing: Billing) -> None:
    token = jwt.encode({"sub": "x", "exp": int(time.time()) - 60}, SECRET, algorithm="HS256")
    request = pb.AuthenticateRequest(credential=pb.Credential(bearer_token=token))
    code, reason, message = await rpc_error(billing.stub.Authenticate(request))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, ErrorType.AUTHENTICATION)
    assert "expired" in message


async def test_insufficient_credits_names_required_and_available(billing: Billing) -> None:
    account, key = await billing.account("0.5")
    code, reason, message = await rpc_error(billing.stub.Authorize(authorize(key)))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, ErrorType.INSUFFICIENT_CREDITS)
    assert message == "You do not have enough credits. Required: 0.78, Available: 0.5"
    assert (await billing.ledger.get_account(account.id)).balance == 50


async def test_premium_only_model_needs_premium(billing: Billing) -> None:
    _, key = await billing.account("100")
    code, reason, message = await rpc_error(
        billing.stub.Authorize(authorize(key, "r", image(model="vip-model", size=512, steps=4)))
    )
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, ErrorType.PREMIUM_REQUIRED)
    assert message == "This model requires a premium subscription."


@pytest.mark.parametrize(
    ("request_id", "usage", "ttl", "expected"),
    [
        ("", [image()], 0, "'request_id' is required"),
        ("r", [], 0, "'usage'"),
        ("r", [pb.Usage()], 0, "usage[0]"),
        ("r", [image(model="no-such-model")], 0, "Invalid model ID 'no-such-model'. Supported models:"),
        ("r", [image(size=0)], 0, "'width'"),
        ("r", [image()], -5, "'ttl_seconds'"),
    ],
)
async def test_bad_authorize_requests_are_invalid_arguments(
    billing: Billing, request_id: str, usage: list[pb.Usage], ttl: int, expected: str
) -> None:
    _, key = await billing.account("10")
    request = pb.AuthorizeRequest(
        credential=pb.Credential(api_key=key), usage=usage, request_id=request_id, ttl_seconds=ttl
    )
    code, reason, message = await rpc_error(billing.stub.Authorize(request))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, ErrorType.INVALID_REQUEST)
    assert expected in message


async def test_commit_errors_carry_their_codes(billing: Billing) -> None:
    _, key = await billing.account("10")
    held = (await billing.stub.Authorize(authorize(key))).reservation
    cases = [
        (pb.CommitRequest(reservation_id="res_missing", amount_hundredths=1), grpc.StatusCode.NOT_FOUND),
        (pb.CommitRequest(reservation_id=held.id, amount_hundredths=79), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.CommitRequest(reservation_id=held.id, amount_hundredths=-1), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.CommitRequest(amount_hundredths=1), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for request, expected in cases:
        assert (await rpc_error(billing.stub.Commit(request)))[0] == expected
    await billing.stub.Release(pb.ReleaseRequest(reservation_id=held.id))
    code, reason, message = await rpc_error(
        billing.stub.Commit(pb.CommitRequest(reservation_id=held.id, amount_hundredths=78))
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, ErrorType.INVALID_REQUEST)
    assert "released" in message


async def test_reserve_rejects_negative_amounts_and_unknown_accounts(billing: Billing) -> None:
    account, _ = await billing.account("10")
    negative = pb.ReserveRequest(account_id=account.id, amount_hundredths=-1, request_id="r")
    assert (await rpc_error(billing.stub.Reserve(negative)))[0] == grpc.StatusCode.INVALID_ARGUMENT
    unknown = pb.ReserveRequest(account_id="acct_missing", amount_hundredths=1, request_id="r")
    assert (await rpc_error(billing.stub.Reserve(unknown)))[:2] == (
        grpc.StatusCode.NOT_FOUND,
        ErrorType.NOT_FOUND,
    )
    missing = pb.GetAccountRequest(account_id="acct_missing")
    assert (await rpc_error(billing.stub.GetAccount(missing)))[0] == grpc.StatusCode.NOT_FOUND


async def test_maintenance_flipped_by_the_admin_command_applies_without_restart(billing: Billing) -> None:
    _, key = await billing.account("10")
    await billing.stub.Authorize(authorize(key, "before"))
    assert await admin(billing.settings, "maintenance", "on") == 0
    billing.clock.advance(1.5)  # past the one-second cache of the flag
    for call in (
        billing.stub.Authorize(authorize(key, "during")),
        billing.stub.Authenticate(pb.AuthenticateRequest(credential=pb.Credential(api_key=key))),
    ):
        assert await rpc_error(call) == (
            grpc.StatusCode.UNAVAILABLE,
            ErrorType.MAINTENANCE,
            MAINTENANCE_MESSAGE,
        )
    assert await admin(billing.settings, "maintenance", "off") == 0
    billing.clock.advance(1.5)
    assert (await billing.stub.Authorize(authorize(key, "after"))).reservation.amount_hundredths == 78


# --- the service itself ---


async def test_expiry_sweep_releases_overdue_holds(billing: Billing) -> None:
    account, key = await billing.account("10")
    held = (await billing.stub.Authorize(authorize(key, "abandoned", ttl_seconds=30))).reservation
    billing.clock.advance(31)
    for _ in range(500):  # the sweep runs every 20 ms of real time; wait for it, however slow
        if (await billing.ledger.get_reservation(held.id)).state == "expired":
            break
        await asyncio.sleep(0.01)
    got = await billing.stub.GetAccount(pb.GetAccountRequest(account_id=account.id))
    assert (got.account.balance_hundredths, got.account.held_hundredths) == (1000, 0)


async def test_health_reports_serving_once_the_database_is_open(billing: Billing) -> None:
    health = health_pb2_grpc.HealthStub(billing.channel)
    for name in ("", SERVICE_NAME):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
