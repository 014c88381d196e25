"""Users, sign-in and sessions (services/billing/sessions.py): Argon2id hashes, sessions that
authenticate, end (sign-out, revocation, expiry) and die with a disabled user or account, one
answer for every failed sign-in, and wrong passwords rate limited per name and per address.
The ledger-level tests run on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from argon2 import PasswordHasher

from kiln.billing.v1 import billing_service_pb2 as pb
from kiln_cli.main import build_parser
from services.billing.admin import run_admin
from services.billing.auth import Authenticator
from services.billing.ledger import AccountRecord, Ledger
from services.billing.rate_limits import _credential_finder
from services.billing.sessions import (
    SESSION_TOKEN_PREFIX,
    SIGN_IN_FAILED_MESSAGE,
    Sessions,
    SignInLimiter,
    csrf_token_for,
    csrf_token_matches,
    hash_session_token,
)
from services.common.errors import (
    AUTHENTICATION_MESSAGE,
    AuthenticationFailed,
    ErrorType,
    InvalidRequest,
    NotFound,
    RateLimited,
)
from services.common.settings import Settings

from .billing_fakes import FakeClock
from .test_billing_servicer import Billing, image, rpc_error, running_billing

PASSWORD = "correct horse battery staple"
LIFETIME = 3600


def cheap_hasher(time_cost: int = 1) -> PasswordHasher:
    """Argon2id with the least work (the tests' CPU is shared); production uses the defaults."""
    return PasswordHasher(time_cost=time_cost, memory_cost=1024, parallelism=1)


class CountingHasher(PasswordHasher):
    """Counts verifications (an unknown name must cost one too)."""

    verified = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        self.verified += 1
        return super().verify(hash, password)


def limiter(per_name: int = 3, per_address: int = 5) -> SignInLimiter:
    return SignInLimiter("memory://", per_name=per_name, per_address=per_address, window_seconds=60)


@pytest.fixture
def sessions(ledger: Ledger) -> Sessions:
    hasher = CountingHasher(time_cost=1, memory_cost=1024, parallelism=1)
    return Sessions(ledger, lifetime_seconds=LIFETIME, hasher=hasher, limiter=limiter())


async def user_of(ledger: Ledger, sessions: Sessions, name: str = "Ada@Example.org") -> AccountRecord:
    account = await ledger.create_account("team")
    await ledger.add_credits(account.id, 10, kind="grant")
    await sessions.create_user(account.id, name, PASSWORD)
    return account


async def stored_hash(ledger: Ledger, name: str) -> str:
    row = await ledger.db.run(lambda tx: tx.one("SELECT password_hash FROM users WHERE name = ?", (name,)))
    assert row is not None
    return str(row[0])


# --- users and hashes ---


async def test_passwords_are_stored_as_argon2id_hashes_and_names_are_checked(
    ledger: Ledger, sessions: Sessions
) -> None:
    account = await user_of(ledger, sessions)
    user = (await sessions.list_users(account.id))[0]
    assert user.name == "ada@example.org"  # case-insensitive: stored lower-cased
    stored = await stored_hash(ledger, "ada@example.org")
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    with pytest.raises(InvalidRequest, match="taken"):
        await sessions.create_user(account.id, "ADA@example.org", PASSWORD)
    with pytest.raises(InvalidRequest, match="user name"):
        await sessions.create_user(account.id, "two words", PASSWORD)
    with pytest.raises(InvalidRequest, match="password"):
        await sessions.create_user(account.id, "bob", "short")
    with pytest.raises(NotFound):
        await sessions.create_user("acct_missing", "bob", PASSWORD)


# --- sign-in and sessions ---


async def test_sign_in_makes_a_session_that_authenticates_and_only_its_hash_is_stored(
    ledger: Ledger, sessions: Sessions
) -> None:
    account = await user_of(ledger, sessions)
    signed_in = await sessions.sign_in("  ADA@example.ORG ", PASSWORD, "192.0.2.1")
    assert signed_in.account.id == account.id
    assert signed_in.token.startswith(SESSION_TOKEN_PREFIX) and "." not in signed_in.token
    assert signed_in.csrf_token == csrf_token_for(signed_in.token)
    assert csrf_token_matches(signed_in.token, signed_in.csrf_token)
    assert not csrf_token_matches(signed_in.token, csrf_token_for(signed_in.token + "x"))
    assert not csrf_token_matches(signed_in.token, "")
    assert signed_in.session.expires_at_ms - signed_in.session.created_at_ms == LIFETIME * 1000

    auth = Authenticator(ledger)
    assert (await auth.authenticate(session_token=signed_in.token)).id == account.id
    found, session = await sessions.authenticate(signed_in.token)
    assert (found.id, session.user_name) == (account.id, "ada@example.org")
    rows = await ledger.db.run(lambda tx: tx.all("SELECT token_hash FROM sessions"))
    assert rows == [(hash_session_token(signed_in.token),)]
    # A session token is not an API key, nor the other way round.
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate(bearer_token=signed_in.token)
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate(session_token="ks-unknown")


async def test_sign_out_and_revocation_end_sessions(ledger: Ledger, sessions: Sessions) -> None:
    await user_of(ledger, sessions)
    other = await ledger.create_account("other")
    await sessions.create_user(other.id, "bob", PASSWORD)
    first = await sessions.sign_in("ada@example.org", PASSWORD)
    second = await sessions.sign_in("ada@example.org", PASSWORD)
    third = await sessions.sign_in("ada@example.org", PASSWORD)
    bobs = await sessions.sign_in("bob", PASSWORD)

    assert await sessions.sign_out(first.token) is True
    assert await sessions.sign_out(first.token) is False  # once
    assert await sessions.sign_out("ks-nothing") is False
    with pytest.raises(AuthenticationFailed):
        await sessions.authenticate(first.token)

    assert await sessions.revoke_user_sessions("ADA@example.org") == 2
    for ended in (second, third):
        with pytest.raises(AuthenticationFailed):
            await sessions.authenticate(ended.token)
    assert (await sessions.authenticate(bobs.token))[0].id == other.id  # another user's stays
    states = [s.revoked_at_ms is not None for s in await sessions.list_sessions("ada@example.org")]
    assert states == [True, True, True]

    # A new password revokes the sessions made with the old one.
    assert await sessions.set_password("bob", "another password") == 1
    with pytest.raises(AuthenticationFailed):
        await sessions.authenticate(bobs.token)
    with pytest.raises(AuthenticationFailed, match="wrong user name or password"):
        await sessions.sign_in("bob", PASSWORD)
    await sessions.sign_in("bob", "another password")


async def test_a_session_expires(ledger: Ledger, sessions: Sessions, clock: FakeClock) -> None:
    await user_of(ledger, sessions)
    signed_in = await sessions.sign_in("ada@example.org", PASSWORD)
    clock.advance(LIFETIME - 1)
    await sessions.authenticate(signed_in.token)
    clock.advance(2)
    with pytest.raises(AuthenticationFailed, match=r"\(session expired\)"):
        await sessions.authenticate(signed_in.token)
    with pytest.raises(AuthenticationFailed):
        await Authenticator(ledger).authenticate(session_token=signed_in.token)
    assert await sessions.sign_out(signed_in.token) is False  # nothing left to end


async def test_a_disabled_user_or_account_has_no_session_and_cannot_sign_in(
    ledger: Ledger, sessions: Sessions
) -> None:
    account = await user_of(ledger, sessions)
    signed_in = await sessions.sign_in("ada@example.org", PASSWORD)

    await sessions.set_user_disabled("ada@example.org", True)
    with pytest.raises(AuthenticationFailed):
        await sessions.authenticate(signed_in.token)  # revoked with the user
    with pytest.raises(AuthenticationFailed) as refused:
        await sessions.sign_in("ada@example.org", PASSWORD)
    assert refused.value.message == SIGN_IN_FAILED_MESSAGE  # as for a wrong password
    await sessions.set_user_disabled("ada@example.org", False)
    again = await sessions.sign_in("ada@example.org", PASSWORD)

    await ledger.set_disabled(account.id, True)
    with pytest.raises(AuthenticationFailed) as disabled:
        await sessions.authenticate(again.token)
    assert disabled.value.message == f"{AUTHENTICATION_MESSAGE} (account disabled)"
    with pytest.raises(AuthenticationFailed) as refused:
        await sessions.sign_in("ada@example.org", PASSWORD)
    assert refused.value.message == SIGN_IN_FAILED_MESSAGE
    await ledger.set_disabled(account.id, False)
    assert (await sessions.authenticate(again.token))[0].id == account.id  # not revoked: it lives on


async def test_an_unknown_name_and_a_wrong_password_are_the_same_failure(
    ledger: Ledger, sessions: Sessions
) -> None:
    await user_of(ledger, sessions)
    hasher = sessions.hasher
    assert isinstance(hasher, CountingHasher)
    failures: list[tuple[type, str]] = []
    for name, password in (
        ("ada@example.org", "wrong password"),
        ("nobody", PASSWORD),
        ("nobody", "x"),
        ("nul\x00name", PASSWORD),  # no user can have it (nor PostgreSQL's text): not looked up
    ):
        before = hasher.verified
        with pytest.raises(AuthenticationFailed) as info:
            await sessions.sign_in(name, password)
        assert hasher.verified == before + 1  # an unknown name costs a verification too
        failures.append((type(info.value), info.value.message))
    assert set(failures) == {(AuthenticationFailed, SIGN_IN_FAILED_MESSAGE)}
    with pytest.raises(AuthenticationFailed, match="wrong user name or password"):
        await sessions.sign_in("ada@example.org", "p" * 5000)  # too long: refused, not hashed at length


async def test_wrong_passwords_are_rate_limited_per_name_and_per_address(
    ledger: Ledger, sessions: Sessions
) -> None:
    account = await user_of(ledger, sessions)
    await sessions.create_user(account.id, "bob", PASSWORD)
    await sessions.create_user(account.id, "cy", PASSWORD)

    # Per name (3): the right password is refused too once the name is over, from anywhere.
    for attempt in range(3):
        with pytest.raises(AuthenticationFailed):
            await sessions.sign_in("ada@example.org", "wrong", f"198.51.100.{attempt}")
    with pytest.raises(RateLimited) as limited:
        await sessions.sign_in("ada@example.org", PASSWORD, "203.0.113.9")
    assert limited.value.retry_after is not None and 1 <= limited.value.retry_after <= 60
    assert "Too many failed sign-in attempts" in limited.value.message
    # An unknown name is limited the same way (the limit tells nothing about existence).
    for _ in range(3):
        with pytest.raises(AuthenticationFailed):
            await sessions.sign_in("ghost", "wrong", "198.51.100.50")
    with pytest.raises(RateLimited):
        await sessions.sign_in("ghost", "wrong", "203.0.113.9")

    # A right password clears its name's failures.
    for _ in range(2):
        with pytest.raises(AuthenticationFailed):
            await sessions.sign_in("bob", "wrong", "192.0.2.7")
    await sessions.sign_in("bob", PASSWORD, "192.0.2.7")
    for _ in range(2):
        with pytest.raises(AuthenticationFailed):
            await sessions.sign_in("bob", "wrong", "192.0.2.8")
    await sessions.sign_in("bob", PASSWORD, "192.0.2.8")

    # Per address (5): 192.0.2.7 has 2 failures; 3 more on other names and it is over.
    for name in ("cy", "cy", "ghost2"):
        with pytest.raises(AuthenticationFailed):
            await sessions.sign_in(name, "wrong", "192.0.2.7")
    with pytest.raises(RateLimited):
        await sessions.sign_in("cy", PASSWORD, "192.0.2.7")
    await sessions.sign_in("cy", PASSWORD, "192.0.2.99")  # cy itself is not over


async def test_a_burst_of_parallel_guesses_gets_no_more_than_the_limit(
    ledger: Ledger, sessions: Sessions
) -> None:
    await user_of(ledger, sessions)
    outcomes = await asyncio.gather(
        *(sessions.sign_in("ada@example.org", f"guess {n}", f"192.0.2.{n}") for n in range(10)),
        return_exceptions=True,
    )
    kinds = sorted(type(outcome).__name__ for outcome in outcomes)
    assert kinds == ["AuthenticationFailed"] * 3 + ["RateLimited"] * 7  # 3 passwords checked, not 10


async def test_a_hash_with_old_parameters_is_replaced_at_sign_in(ledger: Ledger) -> None:
    old = Sessions(ledger, hasher=cheap_hasher(time_cost=1))
    account = await ledger.create_account("team")
    await old.create_user(account.id, "ada", PASSWORD)
    assert ",t=1," in await stored_hash(ledger, "ada")
    new = Sessions(ledger, hasher=cheap_hasher(time_cost=2))
    await new.sign_in("ada", PASSWORD)
    assert ",t=2," in await stored_hash(ledger, "ada")
    await new.sign_in("ada", PASSWORD)


async def test_the_rate_limiter_resolves_a_session_cookie(ledger: Ledger, sessions: Sessions) -> None:
    account = await user_of(ledger, sessions)
    signed_in = await sessions.sign_in("ada@example.org", PASSWORD)
    finder = _credential_finder(Authenticator(ledger), f"Session {signed_in.token}")
    assert finder is not None
    assert (await ledger.find_account(finder)).id == account.id


# --- the gRPC service and the admin commands ---


@pytest.fixture
async def billing(tmp_path: Path, sqlite_url: str) -> AsyncIterator[Billing]:
    # The service on the real time: the admin commands read the clock of their own ledger.
    async with running_billing(tmp_path, sqlite_url, FakeClock(time.time())) as running:
        yield running


async def kiln(settings: Settings, *argv: str) -> int:
    return await run_admin(build_parser().parse_args(list(argv)), settings)


async def test_sign_in_over_grpc_and_the_admin_commands(
    billing: Billing, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    account, _ = await billing.account("5")
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert (
        await kiln(
            billing.settings, "admin", "user", "create", account.id, "--name", "Ada", "--password-stdin"
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("user_")

    answer = await billing.stub.SignIn(pb.SignInRequest(name="ada", password=PASSWORD, client_address="::1"))
    assert answer.account.id == account.id and answer.session.user_name == "ada"
    assert answer.csrf_token == csrf_token_for(answer.session_token)
    credential = pb.Credential(session_token=answer.session_token)
    found = await billing.stub.Authenticate(pb.AuthenticateRequest(credential=credential))
    assert found.account.id == account.id
    assert found.session.expires_at_ms == answer.session.expires_at_ms
    held = await billing.stub.Authorize(
        pb.AuthorizeRequest(credential=credential, usage=[image()], request_id="req-session")
    )
    assert held.account.id == account.id and held.reservation.amount_hundredths > 0
    await billing.stub.Release(pb.ReleaseRequest(reservation_id=held.reservation.id))

    code, error_type, message = await rpc_error(
        billing.stub.SignIn(pb.SignInRequest(name="ada", password="wrong", client_address="::1"))
    )
    assert (code, error_type, message) == (
        grpc.StatusCode.UNAUTHENTICATED,
        ErrorType.AUTHENTICATION,
        SIGN_IN_FAILED_MESSAGE,
    )

    assert await kiln(billing.settings, "admin", "session", "revoke", "--user", "ADA") == 0
    assert "1 session(s) revoked" in capsys.readouterr().out
    code, error_type, _ = await rpc_error(
        billing.stub.Authenticate(pb.AuthenticateRequest(credential=credential))
    )
    assert (code, error_type) == (grpc.StatusCode.UNAUTHENTICATED, ErrorType.AUTHENTICATION)
    again = await billing.stub.SignIn(pb.SignInRequest(name="ada", password=PASSWORD))
    assert (await billing.stub.SignOut(pb.SignOutRequest(session_token=again.session_token))).revoked
    assert not (await billing.stub.SignOut(pb.SignOutRequest(session_token=again.session_token))).revoked

    assert await kiln(billing.settings, "admin", "user", "disable", "ada") == 0
    code, _, message = await rpc_error(billing.stub.SignIn(pb.SignInRequest(name="ada", password=PASSWORD)))
    assert (code, message) == (grpc.StatusCode.UNAUTHENTICATED, SIGN_IN_FAILED_MESSAGE)
    assert await kiln(billing.settings, "admin", "user", "enable", "ada") == 0
    assert await kiln(billing.settings, "admin", "user", "list", account.id) == 0
    assert "ada" in capsys.readouterr().out

    # Wrong passwords past the default limit (5 per name): RESOURCE_EXHAUSTED with the wait.
    for _ in range(5):
        await rpc_error(billing.stub.SignIn(pb.SignInRequest(name="ada", password="wrong")))
    code, error_type, message = await rpc_error(
        billing.stub.SignIn(pb.SignInRequest(name="ada", password=PASSWORD))
    )
    assert (code, error_type) == (grpc.StatusCode.RESOURCE_EXHAUSTED, ErrorType.RATE_LIMIT)
