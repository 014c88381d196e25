"""JWT audience and issuer: required when JWTs are enabled, unless explicitly turned off.

Billing does not start with a JWT key but no audience or issuer configured; a token
without ``aud``/``iss``, or with other values, is an ``authentication_error`` (401)
that holds nothing. Unit checks run on SQLite (the storage is not their subject);
the gRPC checks run on SQLite and PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest

from kiln.billing.v1 import billing_service_pb2 as pb
from services.billing.auth import Authenticator
from services.billing.ledger import AccountRecord, Ledger
from services.billing.server import create_service
from services.common.errors import AUTHENTICATION_MESSAGE, ErrorType
from services.common.settings import Settings

from .billing_fakes import FakeClock
from .conftest import AUDIENCE, ISSUER, SECRET, SUBJECT, assert_rejected, claims, public_pem
from .test_billing_servicer import image, rpc_error, running_billing


def settings_for(tmp_path: Path, **jwt_settings: Any) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'billing.db'}", **jwt_settings
    )


# --- at start ---


@pytest.mark.parametrize(
    ("configured", "message"),
    [
        (
            {"jwt_issuer": ISSUER},
            "JWT authentication is enabled but an audience (KILN_JWT_AUDIENCE) is not configured; "
            "configure it, or accept tokens without that check explicitly with KILN_JWT_REQUIRE_AUDIENCE=false",
        ),
        (
            {"jwt_audience": AUDIENCE},
            "JWT authentication is enabled but an issuer (KILN_JWT_ISSUER) is not configured; "
            "configure it, or accept tokens without that check explicitly with KILN_JWT_REQUIRE_ISSUER=false",
        ),
        (
            {},
            "JWT authentication is enabled but an audience (KILN_JWT_AUDIENCE) and an issuer "
            "(KILN_JWT_ISSUER) are not configured; configure them, or accept tokens without that check "
            "explicitly with KILN_JWT_REQUIRE_AUDIENCE=false / KILN_JWT_REQUIRE_ISSUER=false",
        ),
    ],
)
async def test_billing_with_a_jwt_secret_does_not_start_without_audience_and_issuer(
    tmp_path: Path, configured: dict[str, str], message: str
) -> None:
    settings = settings_for(tmp_path, jwt_hs256_secret=SECRET, **configured)
    with pytest.raises(ValueError) as info:
        await create_service(settings, address="127.0.0.1:0")
    assert str(info.value) == message


def test_public_keys_alone_also_require_audience_and_issuer(sqlite_ledger: Ledger, ec_key: Any) -> None:
    with pytest.raises(ValueError, match="audience"):
        Authenticator(sqlite_ledger, public_keys=[public_pem(ec_key)], issuer=ISSUER)
    with pytest.raises(ValueError, match="issuer"):
        Authenticator(sqlite_ledger, public_keys=[public_pem(ec_key)], audience=AUDIENCE)


def test_an_empty_audience_or_issuer_counts_as_not_configured(sqlite_ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="audience"):
        Authenticator(sqlite_ledger, hs256_secret=SECRET, audience="", issuer=ISSUER)


def test_without_a_jwt_key_nothing_is_required(sqlite_ledger: Ledger) -> None:
    assert Authenticator(sqlite_ledger).algorithms == []


async def test_the_requirement_is_turned_off_by_environment_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILN_JWT_HS256_SECRET", SECRET)
    monkeypatch.setenv("KILN_JWT_REQUIRE_AUDIENCE", "false")
    monkeypatch.setenv("KILN_JWT_REQUIRE_ISSUER", "false")
    settings = settings_for(tmp_path)
    assert (settings.jwt_require_audience, settings.jwt_require_issuer) == (False, False)
    service = await create_service(settings, address="127.0.0.1:0")
    await service.stop(0)


# --- tokens ---


@pytest.fixture
def auth_ledger(sqlite_ledger: Ledger) -> Ledger:
    """``auth`` and ``account`` (conftest) on SQLite only: the storage is not the subject here."""
    return sqlite_ledger


@pytest.mark.parametrize("alg", ["HS256", "RS256", "ES256"])
@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"aud": None}, "missing claim 'aud'"),
        ({"iss": None}, "missing claim 'iss'"),
        ({"aud": None, "iss": None}, "missing claim 'aud'"),
        ({"aud": "another-api"}, "wrong audience"),
        ({"aud": ["another-api", "a-third-api"]}, "wrong audience"),
        ({"iss": "https://evil.test"}, "wrong issuer"),
        ({"iss": ISSUER + "/"}, "wrong issuer"),
    ],
)
async def test_a_token_without_the_configured_audience_or_issuer_is_refused(
    auth: Authenticator,
    account: AccountRecord,
    rsa_key: Any,
    ec_key: Any,
    alg: str,
    changes: dict[str, Any],
    reason: str,
) -> None:
    key = {"HS256": SECRET, "RS256": rsa_key, "ES256": ec_key}[alg]
    await assert_rejected(auth, jwt.encode(claims(**changes), key, algorithm=alg), reason)
    assert (await auth.authenticate(bearer_token=jwt.encode(claims(), key, algorithm=alg))).id == account.id


async def test_a_token_whose_audiences_include_the_configured_one_is_accepted(
    auth: Authenticator, account: AccountRecord
) -> None:
    token = jwt.encode(claims(aud=["another-api", AUDIENCE]), SECRET, algorithm="HS256")
    assert (await auth.authenticate(bearer_token=token)).id == account.id


async def test_only_the_claim_whose_requirement_is_turned_off_goes_unchecked(
    sqlite_ledger: Ledger, account: AccountRecord
) -> None:
    any_audience = Authenticator(sqlite_ledger, hs256_secret=SECRET, issuer=ISSUER, require_audience=False)
    for aud in (None, "anything"):
        token = jwt.encode(claims(aud=aud), SECRET, algorithm="HS256")
        assert (await any_audience.authenticate(bearer_token=token)).id == account.id
    await assert_rejected(
        any_audience, jwt.encode(claims(iss=None), SECRET, algorithm="HS256"), "missing claim 'iss'"
    )
    await assert_rejected(
        any_audience, jwt.encode(claims(iss="x"), SECRET, algorithm="HS256"), "wrong issuer"
    )


async def test_a_configured_audience_is_checked_even_when_not_required(
    sqlite_ledger: Ledger, account: AccountRecord
) -> None:
    lenient = Authenticator(
        sqlite_ledger, hs256_secret=SECRET, audience=AUDIENCE, require_audience=False, require_issuer=False
    )
    await assert_rejected(
        lenient, jwt.encode(claims(aud=None), SECRET, algorithm="HS256"), "missing claim 'aud'"
    )
    await assert_rejected(lenient, jwt.encode(claims(aud="x"), SECRET, algorithm="HS256"), "wrong audience")


# --- over gRPC, on SQLite and PostgreSQL ---


async def test_authorize_refuses_a_token_without_audience_or_issuer_and_holds_nothing(
    tmp_path: Path, db_url: str, clock: FakeClock
) -> None:
    async with running_billing(tmp_path, db_url, clock) as billing:
        account = await billing.ledger.create_account("caller", external_id=SUBJECT)
        await billing.ledger.add_credits(account.id, 10, kind="grant")
        for changes in ({"aud": None}, {"iss": None}, {"aud": "elsewhere"}, {"iss": "someone"}):
            token = jwt.encode(claims(**changes), SECRET, algorithm="HS256")
            request = pb.AuthorizeRequest(credential=pb.Credential(bearer_token=token), usage=[image()])
            code, reason, message = await rpc_error(billing.stub.Authorize(request))
            assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, ErrorType.AUTHENTICATION)
            assert message.startswith(AUTHENTICATION_MESSAGE)
        after = await billing.ledger.get_account(account.id)
        assert (after.balance, after.held) == (1000, 0)
        good = jwt.encode(claims(), SECRET, algorithm="HS256")
        reply = await billing.stub.Authorize(
            pb.AuthorizeRequest(credential=pb.Credential(bearer_token=good), usage=[image()])
        )
        assert reply.account.id == account.id and reply.reservation.amount_hundredths > 0
