"""Disabled accounts: every credential refused (401), no hold, no charge; holds in flight settle.

An operator disables an account with ``kiln admin account disable ID`` (and enables
it again with ``... enable ID``). From then on its API keys (``X-API-Key`` or
``Bearer``) and its JWTs (by external subject or by id) are ``authentication_error``
in the same transaction that would hold credits, so nothing is held or charged. A
hold placed before the account was disabled settles normally: it is committed
(charged) or released as usual. Every test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import jwt
import pytest

from kiln.billing.v1 import billing_service_pb2 as pb
from kiln_cli.main import build_parser
from services.billing.admin import run_admin
from services.billing.auth import Authenticator
from services.billing.ledger import AccountFinder, AccountRecord, IdempotencyClaim, Ledger
from services.billing.store import Database, Tx
from services.common.errors import AUTHENTICATION_MESSAGE, AuthenticationFailed, ErrorType, NotFound
from services.common.settings import Settings
from tests.stack import billing_service, edge_app

from .billing_fakes import FakeClock
from .conftest import AUDIENCE, ISSUER, SECRET, claims
from .test_billing_servicer import Billing, image, rpc_error, running_billing

DISABLED_MESSAGE = f"{AUTHENTICATION_MESSAGE} (account disabled)"


def token_for(sub: str) -> str:
    return jwt.encode(claims(sub=sub), SECRET, algorithm="HS256")


@pytest.fixture
def auth(ledger: Ledger) -> Authenticator:
    return Authenticator(ledger, hs256_secret=SECRET, audience=AUDIENCE, issuer=ISSUER)


async def funded(ledger: Ledger, name: str, *, subject: str | None = None) -> tuple[AccountRecord, str]:
    """An account with 10 credits and an API key."""
    account = await ledger.create_account(name, external_id=subject)
    await ledger.add_credits(account.id, 10, kind="grant")
    _, key = await ledger.create_api_key(account.id)
    return account, key


def no_price(found: AccountRecord) -> list[int]:
    raise AssertionError(f"priced for {found.id} although its account is disabled")


# --- the ledger ---


async def test_disabling_records_the_time_once_and_enabling_clears_it(
    ledger: Ledger, clock: FakeClock
) -> None:
    account = await ledger.create_account("to-disable")
    assert account.disabled_at_ms is None and not account.disabled
    disabled = await ledger.set_disabled(account.id, True)
    assert disabled.disabled_at_ms == ledger.now_ms() and disabled.disabled
    clock.advance(60)
    again = await ledger.set_disabled(account.id, True)
    assert again.disabled_at_ms == disabled.disabled_at_ms  # the first time is kept
    assert (await ledger.get_account(account.id)).disabled_at_ms == disabled.disabled_at_ms
    enabled = await ledger.set_disabled(account.id, False)
    assert enabled.disabled_at_ms is None
    assert (await ledger.get_account(account.id)).disabled_at_ms is None
    with pytest.raises(NotFound):
        await ledger.set_disabled("acct_nobody", True)


async def test_every_credential_of_a_disabled_account_is_refused_and_nothing_is_held(
    auth: Authenticator, ledger: Ledger
) -> None:
    bound, bound_key = await funded(ledger, "bound", subject="user-1")
    plain, plain_key = await funded(ledger, "plain")
    bystander, bystander_key = await funded(ledger, "bystander")
    await ledger.set_disabled(bound.id, True)
    await ledger.set_disabled(plain.id, True)

    credentials: list[dict[str, str]] = [
        {"api_key": bound_key},
        {"bearer_token": bound_key},
        {"bearer_token": token_for("user-1")},  # the external subject
        {"api_key": plain_key},
        {"bearer_token": plain_key},
        {"bearer_token": token_for(plain.id)},  # the id of an account without a subject
    ]
    for credential in credentials:
        with pytest.raises(AuthenticationFailed) as info:
            await auth.authenticate(**credential)
        assert info.value.message == DISABLED_MESSAGE
        assert info.value.error_type is ErrorType.AUTHENTICATION
        with pytest.raises(AuthenticationFailed, match="account disabled"):
            await ledger.authorize(auth.finder(**credential), no_price, "r", 60)
    for account in (bound, plain):
        after = await ledger.get_account(account.id)
        assert (after.balance, after.held) == (1000, 0)
        assert await ledger.ledger_sum(account.id) == 1000
    count = await ledger.db.run(lambda tx: tx.one("SELECT COUNT(*) FROM reservations"), write=False)
    assert count is not None and int(count[0]) == 0
    # Other accounts are untouched.
    assert (await auth.authenticate(api_key=bystander_key)).id == bystander.id


async def test_a_disabled_account_gets_no_hold_by_account_id_either(ledger: Ledger) -> None:
    account, _ = await funded(ledger, "reserve-by-id")
    await ledger.set_disabled(account.id, True)
    with pytest.raises(AuthenticationFailed, match="account disabled"):
        await ledger.reserve(account.id, 100, "trace", 60)
    with pytest.raises(NotFound):
        await ledger.reserve("acct_nobody", 100, "trace", 60)
    after = await ledger.get_account(account.id)
    assert (after.balance, after.held) == (1000, 0)


async def test_a_disabled_account_gets_no_stored_answer_for_its_idempotency_key(
    auth: Authenticator, ledger: Ledger
) -> None:
    account, key = await funded(ledger, "idempotent")
    claim = IdempotencyClaim("order-1", "fp-1")
    first = await ledger.authorize(auth.finder(api_key=key), lambda _: [100], "r1", 60, claim)
    assert first.reservation is not None
    await ledger.commit(first.reservation.id, 100)
    await ledger.set_disabled(account.id, True)
    with pytest.raises(AuthenticationFailed, match="account disabled"):
        await ledger.authorize(auth.finder(api_key=key), no_price, "r2", 60, claim)


async def test_holds_placed_before_disabling_settle_normally(
    auth: Authenticator, ledger: Ledger, clock: FakeClock
) -> None:
    account, key = await funded(ledger, "in-flight")
    finder: AccountFinder = auth.finder(api_key=key)
    charged = await ledger.authorize(finder, lambda _: [300], "to-commit", 60)
    released = await ledger.authorize(finder, lambda _: [200], "to-release", 60)
    expiring = await ledger.authorize(finder, lambda _: [100], "to-expire", 30)
    assert charged.reservation and released.reservation and expiring.reservation
    await ledger.set_disabled(account.id, True)

    committed = await ledger.commit(charged.reservation.id, 250)
    assert (committed.state, committed.charged) == ("committed", 250)
    assert (await ledger.release(released.reservation.id)).state == "released"
    clock.advance(31)
    assert await ledger.expire_holds() == 1
    assert (await ledger.get_reservation(expiring.reservation.id)).state == "expired"
    after = await ledger.get_account(account.id)
    assert (after.balance, after.held) == (1000 - 250, 0)
    assert await ledger.ledger_sum(account.id) == 1000 - 250
    assert after.disabled


async def test_an_enabled_account_is_accepted_again(auth: Authenticator, ledger: Ledger) -> None:
    account, key = await funded(ledger, "back", subject="user-2")
    await ledger.set_disabled(account.id, True)
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate(api_key=key)
    await ledger.set_disabled(account.id, False)
    assert (await auth.authenticate(api_key=key)).id == account.id
    assert (await auth.authenticate(bearer_token=token_for("user-2"))).id == account.id
    outcome = await ledger.authorize(auth.finder(api_key=key), lambda _: [78], "r", 60)
    assert outcome.reservation is not None and outcome.account.held == 78


async def test_accounts_made_before_the_migration_are_enabled(db_url: str) -> None:
    """Migration 0005 adds ``disabled_at_ms``: existing accounts stay enabled, keys keep working."""
    db = await Database.open(db_url)
    try:
        ledger = Ledger(db)
        account, key = await funded(ledger, "old")

        def before_0005(tx: Tx) -> None:
            tx.execute("ALTER TABLE accounts DROP COLUMN disabled_at_ms")
            tx.execute("DELETE FROM schema_migrations WHERE version = 5")

        await db.run(before_0005)
    finally:
        await db.close()
    db = await Database.open(db_url)
    try:
        assert (5, "account_disabled") in await db.applied_migrations()
        ledger = Ledger(db)
        assert (await ledger.get_account(account.id)).disabled_at_ms is None
        assert (await ledger.account_for_api_key(key)).id == account.id
        assert (await ledger.set_disabled(account.id, True)).disabled
    finally:
        await db.close()


# --- the admin command and the gRPC service ---


async def kiln(settings: Settings, *argv: str) -> int:
    """Runs ``kiln <argv>`` as the CLI parses it (for ``kiln admin ...``)."""
    args = build_parser().parse_args(list(argv))
    return await run_admin(args, settings)


@pytest.fixture
async def billing(tmp_path: Path, db_url: str, clock: FakeClock) -> AsyncIterator[Billing]:
    async with running_billing(tmp_path, db_url, clock) as running:
        yield running


async def test_kiln_admin_account_disable_refuses_every_credential_over_grpc(
    billing: Billing, capsys: pytest.CaptureFixture[str]
) -> None:
    account = await billing.ledger.create_account("grpc", external_id="user-3")
    await billing.ledger.add_credits(account.id, 10, kind="grant")
    _, key = await billing.ledger.create_api_key(account.id)
    credentials = [
        pb.Credential(api_key=key),
        pb.Credential(bearer_token=key),
        pb.Credential(bearer_token=token_for("user-3")),
    ]

    assert await kiln(billing.settings, "admin", "account", "disable", account.id) == 0
    assert f"{account.id}: disabled since " in capsys.readouterr().out
    assert await kiln(billing.settings, "admin", "account", "show", account.id) == 0
    assert "disabled: " in capsys.readouterr().out
    for credential in credentials:
        for call in (
            billing.stub.Authorize(pb.AuthorizeRequest(credential=credential, usage=[image()])),
            billing.stub.Authenticate(pb.AuthenticateRequest(credential=credential)),
        ):
            code, reason, message = await rpc_error(call)
            assert (code, reason, message) == (
                grpc.StatusCode.UNAUTHENTICATED,
                ErrorType.AUTHENTICATION,
                DISABLED_MESSAGE,
            )
    assert await billing.money(account.id) == (1000, 0)
    assert await billing.ledger_kinds(account.id) == ["grant"]

    assert await kiln(billing.settings, "admin", "account", "enable", account.id) == 0
    assert f"{account.id}: enabled" in capsys.readouterr().out
    assert await kiln(billing.settings, "admin", "account", "show", account.id) == 0
    assert "disabled" not in capsys.readouterr().out
    for credential in credentials:
        reply = await billing.stub.Authorize(pb.AuthorizeRequest(credential=credential, usage=[image()]))
        assert reply.account.id == account.id


async def test_kiln_admin_account_disable_of_an_unknown_account_fails(
    billing: Billing, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await kiln(billing.settings, "admin", "account", "disable", "acct_nobody") == 1
    assert "Account 'acct_nobody' not found." in capsys.readouterr().err


async def test_a_hold_authorized_before_disabling_is_committed_over_grpc(billing: Billing) -> None:
    account = await billing.ledger.create_account("in-flight")
    await billing.ledger.add_credits(account.id, 10, kind="grant")
    _, key = await billing.ledger.create_api_key(account.id)
    auth = await billing.stub.Authorize(
        pb.AuthorizeRequest(credential=pb.Credential(api_key=key), usage=[image()])
    )
    await billing.ledger.set_disabled(account.id, True)
    done = await billing.stub.Commit(pb.CommitRequest(reservation_id=auth.reservation.id, usage=[image()]))
    assert done.reservation.state == pb.RESERVATION_STATE_COMMITTED
    assert await billing.money(account.id) == (1000 - done.reservation.charged_hundredths, 0)


# --- through the HTTP edge ---


async def test_the_edge_answers_401_to_a_disabled_account_and_charges_nothing(
    tmp_path: Path, db_url: str
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        jwt_hs256_secret=SECRET,
        jwt_audience=AUDIENCE,
        jwt_issuer=ISSUER,
    )
    async with billing_service(settings) as billing:
        ledger = billing.ledger
        assert ledger is not None
        account, key = await funded(ledger, "http", subject="user-4")
        await ledger.set_disabled(account.id, True)
        edge_settings = settings.with_addresses(billing=f"127.0.0.1:{billing.port}")
        async with edge_app(edge_settings) as edge, aiohttp.ClientSession() as http:
            headers: list[dict[str, str]] = [
                {"X-API-Key": key},
                {"Authorization": f"Bearer {key}"},
                {"Authorization": f"Bearer {token_for('user-4')}"},
            ]
            for header in headers:
                calls: list[Any] = [
                    http.get(edge.url + "/v1/account", headers=header),
                    http.post(
                        edge.url + "/v1/images/generations",
                        json={"prompt": "a red fox", "size": "1024x1024"},
                        headers=header,
                    ),
                ]
                for call in calls:
                    async with call as response:
                        assert response.status == 401, await response.text()
                        error = (await response.json())["error"]
                        assert (error["type"], error["message"]) == ("authentication_error", DISABLED_MESSAGE)
        after = await ledger.get_account(account.id)
        assert (after.balance, after.held) == (1000, 0)
        assert await ledger.ledger_sum(account.id) == 1000
