"""The billing gRPC service, over a real server on a loopback port, on SQLite and PostgreSQL."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
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
from services.common.grpc_client import error_from_rpc, mesh_channel
from services.common.settings import DEFAULT_REGISTRY, Settings

from .billing_fakes import FakeClock
from .conftest import AUDIENCE, ISSUER, SECRET

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
#: z-image-turbo, 1024x1024 at 8 steps: (0.25 + 0.5 * 1.048576) * 8 / 8 = 0.774288 -> 0.78 credits.
IMAGE_PRICE = 78
#: sam3: a flat 0.25 credits per segmented image or frame.
FRAME_PRICE = 25


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

    async def money(self, account_id: str) -> tuple[int, int]:
        """(balance, held) of an account, as GetAccount reports them; checks the ledger rows add up."""
        got = (await self.stub.GetAccount(pb.GetAccountRequest(account_id=account_id))).account
        assert await self.ledger.ledger_sum(account_id) == got.balance_hundredths
        return got.balance_hundredths, got.held_hundredths

    async def ledger_kinds(self, account_id: str) -> list[str]:
        """The kinds of an account's ledger rows, oldest first."""
        return [entry.kind for entry in reversed(await self.ledger.ledger_entries(account_id))]

    async def wait_for_state(self, reservation_id: str, state: str) -> None:
        """Waits for the expiry sweep (every 20 ms of real time), however slow the machine."""
        for _ in range(500):
            if (await self.ledger.get_reservation(reservation_id)).state == state:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"reservation {reservation_id} never became {state}")


@asynccontextmanager
async def running_billing(
    tmp_path: Path, database_url: str, clock: FakeClock, *, sweep_seconds: float = 0.02
) -> AsyncIterator[Billing]:
    registry = tmp_path / "registry.toml"
    registry.write_text(DEFAULT_REGISTRY.read_text() + PREMIUM_ONLY_MODEL)
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        registry_path=registry,
        jwt_hs256_secret=SECRET,
        jwt_audience=AUDIENCE,
        jwt_issuer=ISSUER,
        reservation_ttl_seconds=60,
        expiry_sweep_seconds=sweep_seconds,
    )
    service = await create_service(settings, address="127.0.0.1:0", clock=clock)
    await service.start()
    channel = mesh_channel(f"127.0.0.1:{service.port}", settings, "edge")
    assert service.ledger is not None
    try:
        yield Billing(service, pb_grpc.BillingServiceStub(channel), channel, settings, service.ledger, clock)
    finally:
        await channel.close()
        await service.stop(0)


@pytest.fixture
async def billing(tmp_path: Path, db_url: str, clock: FakeClock) -> AsyncIterator[Billing]:
    """The service on each engine (``db_url``: SQLite, then PostgreSQL)."""
    async with running_billing(tmp_path, db_url, clock) as running:
        yield running


def image(model: str = "z-image-turbo", size: int = 1024, steps: int = 8, count: int = 1) -> pb.Usage:
    return pb.Usage(
        image_generation=pb.ImageGenerationUsage(
            model=model, width=size, height=size, steps=steps, count=count
        )
    )


def frames(count: int) -> pb.Usage:
    return pb.Usage(segmentation=pb.SegmentationUsage(model="sam3", frames=count))


def idem(key: str = "order-1", fingerprint: str = "fp-1", *, streamed: bool = False) -> pb.IdempotencyKey:
    return pb.IdempotencyKey(key=key, fingerprint=fingerprint, streamed=streamed)


def authorize(key: str, request_id: str = "req-1", *usage: pb.Usage, **kwargs: Any) -> pb.AuthorizeRequest:
    return pb.AuthorizeRequest(
        credential=pb.Credential(api_key=key), usage=list(usage) or [image()], request_id=request_id, **kwargs
    )


def commit(reservation_id: str, *usage: pb.Usage) -> pb.CommitRequest:
    return pb.CommitRequest(reservation_id=reservation_id, usage=list(usage))


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


async def test_authorize_holds_the_quoted_price_and_commit_charges_the_work_done(billing: Billing) -> None:
    account, key = await billing.account("10")
    reply = await billing.stub.Authorize(authorize(key, "req-1", image(), image(size=512, count=2)))
    # 512x512: 0.25 + 0.5 * 0.262144 = 0.381072 -> 0.39 credits an image, 0.78 for two.
    assert list(reply.item_amounts_hundredths) == [IMAGE_PRICE, 78]
    assert reply.reservation.amount_hundredths == 156
    assert reply.reservation.state == pb.RESERVATION_STATE_HELD
    assert reply.reservation.request_id == "req-1"
    assert reply.reservation.expires_at_ms == int(billing.clock() * 1000) + 60_000
    assert (reply.account.id, reply.account.balance_hundredths, reply.account.held_hundredths) == (
        account.id,
        844,
        156,
    )
    committed = await billing.stub.Commit(commit(reply.reservation.id, image()))
    assert committed.reservation.state == pb.RESERVATION_STATE_COMMITTED
    assert (committed.reservation.amount_hundredths, committed.reservation.charged_hundredths) == (156, 78)
    assert await billing.money(account.id) == (922, 0)


async def test_the_same_request_id_makes_two_holds_and_both_are_charged(billing: Billing) -> None:
    account, key = await billing.account("10")
    first = await billing.stub.Authorize(authorize(key, "retry"))
    second = await billing.stub.Authorize(authorize(key, "retry"))
    assert first.reservation.id != second.reservation.id
    assert first.reservation.request_id == second.reservation.request_id == "retry"
    assert second.account.held_hundredths == 2 * IMAGE_PRICE
    for held in (first, second):
        done = await billing.stub.Commit(commit(held.reservation.id, image()))
        assert done.reservation.charged_hundredths == IMAGE_PRICE
    assert await billing.money(account.id) == (1000 - 2 * IMAGE_PRICE, 0)
    assert (await billing.ledger_kinds(account.id)).count("charge") == 2


async def test_concurrent_calls_with_one_request_id_each_make_a_hold(billing: Billing) -> None:
    account, key = await billing.account("10")
    replies = await asyncio.gather(*(billing.stub.Authorize(authorize(key, "burst")) for _ in range(5)))
    assert len({reply.reservation.id for reply in replies}) == 5
    assert await billing.money(account.id) == (1000 - 5 * IMAGE_PRICE, 5 * IMAGE_PRICE)


async def test_the_request_id_is_optional(billing: Billing) -> None:
    _, key = await billing.account("10")
    reply = await billing.stub.Authorize(authorize(key, ""))
    assert (reply.reservation.request_id, reply.reservation.amount_hundredths) == ("", IMAGE_PRICE)


async def test_authorize_accepts_a_bearer_api_key_and_a_jwt(billing: Billing) -> None:
    account, key = await billing.account("10")
    await billing.ledger.db.run(
        lambda tx: tx.execute("UPDATE accounts SET external_id = 'user-7' WHERE id = ?", (account.id,))
    )
    token = jwt.encode(
        {"sub": "user-7", "exp": int(time.time()) + 60, "aud": AUDIENCE, "iss": ISSUER},
        SECRET,
        algorithm="HS256",
    )
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


async def test_premium_account_is_authorized_and_charged_nothing(billing: Billing) -> None:
    account, key = await billing.account("10", premium=True)
    reply = await billing.stub.Authorize(
        authorize(key, "p", image(), image(model="vip-model", size=512, steps=4))
    )
    assert list(reply.item_amounts_hundredths) == [0, 0]
    assert reply.reservation.amount_hundredths == 0
    assert reply.account.balance_hundredths == 1000
    done = await billing.stub.Commit(
        commit(reply.reservation.id, image(count=3), image(model="vip-model", size=512, steps=4))
    )
    assert (done.reservation.state, done.reservation.charged_hundredths) == (
        pb.RESERVATION_STATE_COMMITTED,
        0,
    )
    assert await billing.money(account.id) == (1000, 0)
    assert await billing.ledger_kinds(account.id) == ["grant"]


async def test_quote_gives_list_prices_and_zero_for_premium(billing: Billing) -> None:
    vip, _ = await billing.account("0", premium=True)
    listed = await billing.stub.Quote(pb.QuoteRequest(usage=[image(count=3)]))
    assert (listed.amount_hundredths, list(listed.item_amounts_hundredths)) == (234, [234])
    free = await billing.stub.Quote(pb.QuoteRequest(account_id=vip.id, usage=[image(count=3)]))
    assert free.amount_hundredths == 0


async def test_speech_cloning_and_music_cost_their_models_flat_price(billing: Billing) -> None:
    usage = [
        pb.Usage(speech=pb.SpeechUsage(model="piper-joe")),
        pb.Usage(speech=pb.SpeechUsage(model="qwen3-tts-base")),
        pb.Usage(music=pb.MusicUsage(model="ace-step-v1.5")),
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
    assert await billing.money(account.id) == (1000, 0)


# --- Commit: billing prices the work done, capped at the hold ---


async def test_commit_charges_the_work_done_capped_at_the_hold(billing: Billing) -> None:
    account, key = await billing.account("10")
    one = (await billing.stub.Authorize(authorize(key, "one", image()))).reservation
    more = await billing.stub.Commit(commit(one.id, image(count=2)))
    assert more.reservation.charged_hundredths == IMAGE_PRICE  # two images done, one held
    two = (await billing.stub.Authorize(authorize(key, "two", image(count=2)))).reservation
    assert two.amount_hundredths == 2 * IMAGE_PRICE
    fewer = await billing.stub.Commit(commit(two.id, image()))
    assert fewer.reservation.charged_hundredths == IMAGE_PRICE  # one of two made: the rest comes back
    assert await billing.money(account.id) == (1000 - 2 * IMAGE_PRICE, 0)


async def test_commit_of_nothing_done_charges_nothing(billing: Billing) -> None:
    account, key = await billing.account("10")
    held = (await billing.stub.Authorize(authorize(key, "empty"))).reservation
    nothing = await billing.stub.Commit(commit(held.id))
    assert (nothing.reservation.state, nothing.reservation.charged_hundredths) == (
        pb.RESERVATION_STATE_COMMITTED,
        0,
    )
    search = (await billing.stub.Authorize(authorize(key, "sam", frames(4)))).reservation
    assert search.amount_hundredths == 4 * FRAME_PRICE
    not_found = await billing.stub.Commit(commit(search.id, frames(0)))
    assert not_found.reservation.charged_hundredths == 0
    some = (await billing.stub.Authorize(authorize(key, "sam", frames(4)))).reservation
    found = await billing.stub.Commit(commit(some.id, frames(2)))
    assert found.reservation.charged_hundredths == 2 * FRAME_PRICE
    assert await billing.money(account.id) == (1000 - 2 * FRAME_PRICE, 0)
    assert (await billing.ledger_kinds(account.id)).count("charge") == 1


async def test_commit_repeated_with_the_same_usage_returns_the_first_result(billing: Billing) -> None:
    account, key = await billing.account("10")
    held = (await billing.stub.Authorize(authorize(key, "once", image(count=2)))).reservation
    first = await billing.stub.Commit(commit(held.id, image()))
    again = await billing.stub.Commit(commit(held.id, image()))
    assert again.reservation == first.reservation
    assert first.reservation.charged_hundredths == IMAGE_PRICE
    assert await billing.money(account.id) == (1000 - IMAGE_PRICE, 0)
    assert await billing.ledger_kinds(account.id) == ["grant", "hold", "release", "charge"]
    code, reason, message = await rpc_error(billing.stub.Commit(commit(held.id, image(count=2))))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, ErrorType.INVALID_REQUEST)
    assert "already committed" in message
    code, _, message = await rpc_error(billing.stub.Release(pb.ReleaseRequest(reservation_id=held.id)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "already committed" in message
    assert await billing.money(account.id) == (1000 - IMAGE_PRICE, 0)


async def test_commit_after_the_hold_expired_is_refused(billing: Billing) -> None:
    account, key = await billing.account("10")
    held = (await billing.stub.Authorize(authorize(key, "late", ttl_seconds=30))).reservation
    billing.clock.advance(31)
    code, reason, message = await rpc_error(billing.stub.Commit(commit(held.id, image())))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, ErrorType.INVALID_REQUEST)
    assert "expired" in message
    got = await billing.stub.GetReservation(pb.GetReservationRequest(reservation_id=held.id))
    assert (got.reservation.state, got.reservation.charged_hundredths) == (pb.RESERVATION_STATE_EXPIRED, 0)
    assert await billing.money(account.id) == (1000, 0)


async def test_get_reservation_reads_each_state(billing: Billing) -> None:
    _, key = await billing.account("10")
    held = (await billing.stub.Authorize(authorize(key, "trace-9"))).reservation
    got = await billing.stub.GetReservation(pb.GetReservationRequest(reservation_id=held.id))
    assert got.reservation == held
    done = await billing.stub.Commit(commit(held.id, image()))
    got = await billing.stub.GetReservation(pb.GetReservationRequest(reservation_id=held.id))
    assert got.reservation == done.reservation
    assert (got.reservation.state, got.reservation.request_id) == (pb.RESERVATION_STATE_COMMITTED, "trace-9")
    other = (await billing.stub.Authorize(authorize(key, "trace-10"))).reservation
    await billing.stub.Release(pb.ReleaseRequest(reservation_id=other.id))
    got = await billing.stub.GetReservation(pb.GetReservationRequest(reservation_id=other.id))
    assert got.reservation.state == pb.RESERVATION_STATE_RELEASED
    missing = pb.GetReservationRequest(reservation_id="res_missing")
    assert (await rpc_error(billing.stub.GetReservation(missing)))[:2] == (
        grpc.StatusCode.NOT_FOUND,
        ErrorType.NOT_FOUND,
    )
    empty = pb.GetReservationRequest()
    assert (await rpc_error(billing.stub.GetReservation(empty)))[0] == grpc.StatusCode.INVALID_ARGUMENT


# --- Idempotency-Key: replay, conflicts, and keys freed by unpaid holds ---


async def test_a_finished_request_is_replayed_without_a_hold(billing: Billing) -> None:
    account, key = await billing.account("0.78")  # enough for one image, not two
    first = await billing.stub.Authorize(authorize(key, "req-a", idempotency=idem("order-1")))
    await billing.stub.Commit(commit(first.reservation.id, image()))
    stored = pb.StoredResponse(
        status=200,
        headers=[
            pb.Header(name="Content-Type", value="application/json"),
            pb.Header(name="X-Credits-Charged", value="0.78"),
        ],
        body=b'{"data": [{"b64_json": "..."}]}',
    )
    saved = await billing.stub.SaveResponse(
        pb.SaveResponseRequest(reservation_id=first.reservation.id, response=stored)
    )
    assert saved.saved
    again = await billing.stub.Authorize(authorize(key, "req-b", idempotency=idem("order-1")))
    assert again.replay == stored
    assert not again.HasField("reservation")
    assert list(again.item_amounts_hundredths) == []
    assert (again.account.id, again.account.balance_hundredths, again.account.held_hundredths) == (
        account.id,
        0,
        0,
    )
    assert await billing.money(account.id) == (0, 0)
    assert (await billing.ledger_kinds(account.id)).count("hold") == 1
    # Saving again keeps the first answer.
    other = pb.StoredResponse(status=500, body=b"late")
    resaved = await billing.stub.SaveResponse(
        pb.SaveResponseRequest(reservation_id=first.reservation.id, response=other)
    )
    assert not resaved.saved
    assert (
        await billing.stub.Authorize(authorize(key, "req-c", idempotency=idem("order-1")))
    ).replay == stored


async def test_a_replayed_answer_may_live_in_the_media_store(billing: Billing) -> None:
    _, key = await billing.account("10")
    first = await billing.stub.Authorize(authorize(key, idempotency=idem("big")))
    await billing.stub.Commit(commit(first.reservation.id, image()))
    stored = pb.StoredResponse(status=201, body_media_id="media_0123")
    await billing.stub.SaveResponse(
        pb.SaveResponseRequest(reservation_id=first.reservation.id, response=stored)
    )
    again = await billing.stub.Authorize(authorize(key, idempotency=idem("big")))
    assert (again.replay.status, again.replay.body, again.replay.body_media_id) == (201, b"", "media_0123")


async def test_a_repeat_while_the_first_is_held_is_aborted(billing: Billing) -> None:
    account, key = await billing.account("10")
    first = await billing.stub.Authorize(authorize(key, "a", idempotency=idem("order-2")))
    code, reason, message = await rpc_error(
        billing.stub.Authorize(authorize(key, "b", idempotency=idem("order-2")))
    )
    assert (code, reason) == (grpc.StatusCode.ABORTED, ErrorType.INVALID_REQUEST)
    assert "in progress" in message
    assert "'order-2'" in message
    assert await billing.money(account.id) == (1000 - IMAGE_PRICE, IMAGE_PRICE)
    # Committed but its answer not stored yet: still no second run.
    await billing.stub.Commit(commit(first.reservation.id, image()))
    code, reason, _ = await rpc_error(
        billing.stub.Authorize(authorize(key, "c", idempotency=idem("order-2")))
    )
    assert (code, reason) == (grpc.StatusCode.ABORTED, ErrorType.INVALID_REQUEST)
    assert await billing.money(account.id) == (1000 - IMAGE_PRICE, 0)


async def test_concurrent_repeats_of_a_key_make_one_hold(billing: Billing) -> None:
    account, key = await billing.account("10")
    calls = [billing.stub.Authorize(authorize(key, f"r{n}", idempotency=idem("race"))) for n in range(6)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    held = [r for r in results if isinstance(r, pb.AuthorizeResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(held) == 1
    assert len(refused) == 5
    assert {r.code() for r in refused} == {grpc.StatusCode.ABORTED}
    assert await billing.money(account.id) == (1000 - IMAGE_PRICE, IMAGE_PRICE)


async def test_the_key_with_another_request_is_an_invalid_argument_naming_it(billing: Billing) -> None:
    account, key = await billing.account("10")
    first = await billing.stub.Authorize(authorize(key, idempotency=idem("order-3", "fp-a")))
    other = authorize(key, "r", image(count=2), idempotency=idem("order-3", "fp-b"))
    code, reason, message = await rpc_error(billing.stub.Authorize(other))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, ErrorType.INVALID_REQUEST)
    assert "'order-3'" in message
    await billing.stub.Commit(commit(first.reservation.id, image()))
    stored = pb.StoredResponse(status=200, body=b"{}")
    await billing.stub.SaveResponse(
        pb.SaveResponseRequest(reservation_id=first.reservation.id, response=stored)
    )
    code, _, message = await rpc_error(billing.stub.Authorize(other))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'order-3'" in message
    assert await billing.money(account.id) == (1000 - IMAGE_PRICE, 0)
    long_key = "k" * 255
    await billing.stub.Authorize(authorize(key, idempotency=idem(long_key, "fp-a")))
    _, _, message = await rpc_error(
        billing.stub.Authorize(authorize(key, idempotency=idem(long_key, "fp-b")))
    )
    assert f"'{long_key[:64]}...'" in message


async def test_keys_are_scoped_to_the_account(billing: Billing) -> None:
    alice, alice_key = await billing.account("10")
    bob, bob_key = await billing.account("10")
    a = await billing.stub.Authorize(authorize(alice_key, idempotency=idem("shared", "fp-a")))
    b = await billing.stub.Authorize(authorize(bob_key, idempotency=idem("shared", "fp-b")))
    assert (a.reservation.account_id, b.reservation.account_id) == (alice.id, bob.id)
    assert await billing.money(alice.id) == await billing.money(bob.id) == (1000 - IMAGE_PRICE, IMAGE_PRICE)


async def test_release_frees_the_key(billing: Billing) -> None:
    account, key = await billing.account("10")
    first = await billing.stub.Authorize(authorize(key, idempotency=idem("order-4")))
    await billing.stub.Release(pb.ReleaseRequest(reservation_id=first.reservation.id))
    second = await billing.stub.Authorize(authorize(key, idempotency=idem("order-4")))
    assert second.reservation.id != first.reservation.id
    assert second.reservation.state == pb.RESERVATION_STATE_HELD
    assert await billing.money(account.id) == (1000 - IMAGE_PRICE, IMAGE_PRICE)


async def test_an_expired_hold_frees_the_key(billing: Billing) -> None:
    account, key = await billing.account("10")
    first = await billing.stub.Authorize(authorize(key, ttl_seconds=30, idempotency=idem("order-5")))
    billing.clock.advance(31)
    await billing.wait_for_state(first.reservation.id, "expired")
    second = await billing.stub.Authorize(authorize(key, idempotency=idem("order-5")))
    assert second.reservation.id != first.reservation.id
    assert await billing.money(account.id) == (1000 - IMAGE_PRICE, IMAGE_PRICE)


async def test_a_hold_past_its_ttl_frees_the_key_before_the_sweep_runs(
    tmp_path: Path, db_url: str, clock: FakeClock
) -> None:
    async with running_billing(tmp_path, db_url, clock, sweep_seconds=3600) as billing:
        _, key = await billing.account("10")
        first = await billing.stub.Authorize(authorize(key, ttl_seconds=30, idempotency=idem("order-6")))
        billing.clock.advance(31)
        second = await billing.stub.Authorize(authorize(key, idempotency=idem("order-6")))
        assert second.reservation.id != first.reservation.id


async def test_a_key_is_forgotten_after_a_day(billing: Billing) -> None:
    account, key = await billing.account("10")
    first = await billing.stub.Authorize(authorize(key, idempotency=idem("order-7")))
    await billing.stub.Commit(commit(first.reservation.id, image()))
    stored = pb.StoredResponse(status=200)
    await billing.stub.SaveResponse(
        pb.SaveResponseRequest(reservation_id=first.reservation.id, response=stored)
    )
    billing.clock.advance(24 * 3600 + 1)
    second = await billing.stub.Authorize(authorize(key, idempotency=idem("order-7")))
    assert not second.HasField("replay")
    assert second.reservation.id != first.reservation.id
    assert await billing.money(account.id) == (1000 - 2 * IMAGE_PRICE, IMAGE_PRICE)


async def test_a_streamed_request_is_never_run_twice(billing: Billing) -> None:
    account, key = await billing.account("10")
    first = await billing.stub.Authorize(authorize(key, idempotency=idem("stream-1", streamed=True)))
    code, _, message = await rpc_error(
        billing.stub.Authorize(authorize(key, idempotency=idem("stream-1", streamed=True)))
    )
    assert code == grpc.StatusCode.ABORTED
    assert "in progress" in message
    await billing.stub.Commit(commit(first.reservation.id, image()))
    code, reason, message = await rpc_error(
        billing.stub.Authorize(authorize(key, idempotency=idem("stream-1", streamed=True)))
    )
    assert (code, reason) == (grpc.StatusCode.ABORTED, ErrorType.INVALID_REQUEST)
    assert "stream" in message
    assert await billing.money(account.id) == (1000 - IMAGE_PRICE, 0)


async def test_a_failed_authorize_claims_no_key(billing: Billing) -> None:
    account, key = await billing.account("0.5")
    code, _, _ = await rpc_error(billing.stub.Authorize(authorize(key, idempotency=idem("order-8"))))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    await billing.ledger.add_credits(account.id, Decimal(1), kind="grant")
    reply = await billing.stub.Authorize(authorize(key, idempotency=idem("order-8")))
    assert reply.reservation.amount_hundredths == IMAGE_PRICE


@pytest.mark.parametrize(
    "bad_key",
    ["", "k" * 256, "tab\there", "new\nline", "caf\u00e9", "del\x7f"],
    ids=["empty", "too-long", "tab", "newline", "non-ascii", "del"],
)
async def test_malformed_idempotency_keys_are_invalid_arguments(billing: Billing, bad_key: str) -> None:
    account, key = await billing.account("10")
    code, reason, message = await rpc_error(billing.stub.Authorize(authorize(key, idempotency=idem(bad_key))))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, ErrorType.INVALID_REQUEST)
    assert "Idempotency-Key" in message
    assert await billing.money(account.id) == (1000, 0)


async def test_an_idempotency_key_needs_a_fingerprint_and_may_be_255_characters(billing: Billing) -> None:
    _, key = await billing.account("10")
    code, _, message = await rpc_error(
        billing.stub.Authorize(authorize(key, idempotency=pb.IdempotencyKey(key="order-9")))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'idempotency.fingerprint'" in message
    printable = "".join(chr(c) for c in range(0x20, 0x7F))
    edge = (printable * 3)[:255]
    reply = await billing.stub.Authorize(authorize(key, idempotency=idem(edge)))
    assert reply.reservation.amount_hundredths == IMAGE_PRICE


async def test_save_response_checks_its_reservation(billing: Billing) -> None:
    _, key = await billing.account("10")
    ok = pb.StoredResponse(status=200)
    keyed = (await billing.stub.Authorize(authorize(key, idempotency=idem("order-10")))).reservation
    code, reason, message = await rpc_error(
        billing.stub.SaveResponse(pb.SaveResponseRequest(reservation_id=keyed.id, response=ok))
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, ErrorType.INVALID_REQUEST)
    assert "not committed" in message
    await billing.stub.Commit(commit(keyed.id, image()))
    for status in (0, 99, 600):
        bad = pb.SaveResponseRequest(reservation_id=keyed.id, response=pb.StoredResponse(status=status))
        assert (await rpc_error(billing.stub.SaveResponse(bad)))[0] == grpc.StatusCode.INVALID_ARGUMENT
    unkeyed = (await billing.stub.Authorize(authorize(key))).reservation
    await billing.stub.Commit(commit(unkeyed.id, image()))
    plain = await billing.stub.SaveResponse(pb.SaveResponseRequest(reservation_id=unkeyed.id, response=ok))
    assert not plain.saved
    missing = pb.SaveResponseRequest(reservation_id="res_missing", response=ok)
    assert (await rpc_error(billing.stub.SaveResponse(missing)))[0] == grpc.StatusCode.NOT_FOUND
    nameless = pb.SaveResponseRequest(response=ok)
    assert (await rpc_error(billing.stub.SaveResponse(nameless)))[0] == grpc.StatusCode.INVALID_ARGUMENT


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
    token = jwt.encode(
        {"sub": "x", "exp": int(time.time()) - 60, "aud": AUDIENCE, "iss": ISSUER}, SECRET, algorithm="HS256"
    )
    request = pb.AuthenticateRequest(credential=pb.Credential(bearer_token=token))
    code, reason, message = await rpc_error(billing.stub.Authenticate(request))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, ErrorType.AUTHENTICATION)
    assert "expired" in message


async def test_insufficient_credits_names_required_and_available(billing: Billing) -> None:
    account, key = await billing.account("0.5")
    code, reason, message = await rpc_error(billing.stub.Authorize(authorize(key)))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, ErrorType.INSUFFICIENT_CREDITS)
    assert message == "You do not have enough credits. Required: 0.78, Available: 0.5"
    assert await billing.money(account.id) == (50, 0)


async def test_premium_only_model_needs_premium(billing: Billing) -> None:
    account, key = await billing.account("100")
    code, reason, message = await rpc_error(
        billing.stub.Authorize(authorize(key, "r", image(model="vip-model", size=512, steps=4)))
    )
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, ErrorType.PREMIUM_REQUIRED)
    assert message == "This model requires a premium subscription."
    assert await billing.money(account.id) == (10_000, 0)


@pytest.mark.parametrize(
    ("request_id", "usage", "ttl", "expected"),
    [
        ("r" * 201, [image()], 0, "'request_id'"),
        ("r", [], 0, "'usage'"),
        ("r", [pb.Usage()], 0, "usage[0]"),
        ("r", [image(model="no-such-model")], 0, "Invalid model ID 'no-such-model'. Supported models:"),
        ("r", [image(size=0)], 0, "'width'"),
        ("r", [frames(0)], 0, "'frames'"),
        ("r", [image()], -5, "'ttl_seconds'"),
    ],
)
async def test_bad_authorize_requests_are_invalid_arguments(
    billing: Billing, request_id: str, usage: list[pb.Usage], ttl: int, expected: str
) -> None:
    account, key = await billing.account("10")
    request = pb.AuthorizeRequest(
        credential=pb.Credential(api_key=key), usage=usage, request_id=request_id, ttl_seconds=ttl
    )
    code, reason, message = await rpc_error(billing.stub.Authorize(request))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, ErrorType.INVALID_REQUEST)
    assert expected in message
    assert await billing.money(account.id) == (1000, 0)


async def test_commit_errors_carry_their_codes(billing: Billing) -> None:
    _, key = await billing.account("10")
    held = (await billing.stub.Authorize(authorize(key))).reservation
    cases = [
        (commit("res_missing", image()), grpc.StatusCode.NOT_FOUND),
        (commit("", image()), grpc.StatusCode.INVALID_ARGUMENT),
        (commit(held.id, pb.Usage()), grpc.StatusCode.INVALID_ARGUMENT),
        (commit(held.id, image(model="no-such-model")), grpc.StatusCode.INVALID_ARGUMENT),
        (commit(held.id, frames(-1)), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for request, expected in cases:
        assert (await rpc_error(billing.stub.Commit(request)))[0] == expected
    # None of those touched the hold.
    got = await billing.stub.GetReservation(pb.GetReservationRequest(reservation_id=held.id))
    assert got.reservation == held
    await billing.stub.Release(pb.ReleaseRequest(reservation_id=held.id))
    code, reason, message = await rpc_error(billing.stub.Commit(commit(held.id, image())))
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
    assert (
        await billing.stub.Authorize(authorize(key, "after"))
    ).reservation.amount_hundredths == IMAGE_PRICE


# --- the service itself ---


async def test_expiry_sweep_releases_overdue_holds(billing: Billing) -> None:
    account, key = await billing.account("10")
    held = (await billing.stub.Authorize(authorize(key, "abandoned", ttl_seconds=30))).reservation
    billing.clock.advance(31)
    await billing.wait_for_state(held.id, "expired")
    assert await billing.money(account.id) == (1000, 0)


async def test_health_reports_serving_once_the_database_is_open(billing: Billing) -> None:
    health = health_pb2_grpc.HealthStub(billing.channel)
    for name in ("", SERVICE_NAME):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
