"""Credentials to accounts: API keys, and JWTs signed with HS256, RS256 and ES256.

Every test that reads accounts runs on SQLite and on PostgreSQL (the ``ledger`` fixture),
including the hot path: :meth:`Ledger.authorize` with the authenticator's finder.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.billing.auth import Authenticator
from services.billing.ledger import AccountRecord, Ledger
from services.common.errors import AUTHENTICATION_MESSAGE, AuthenticationFailed

from .conftest import AUDIENCE, ISSUER, SECRET, assert_rejected, claims, public_pem

# --- API keys ---


async def test_api_key_works_as_x_api_key_and_as_bearer(auth: Authenticator, account: AccountRecord) -> None:
    _, key = await auth.ledger.create_api_key(account.id)
    assert (await auth.authenticate(api_key=key)).id == account.id
    assert (await auth.authenticate(bearer_token=key)).id == account.id


async def test_unknown_revoked_or_missing_api_key_gets_the_contract_message(
    auth: Authenticator, account: AccountRecord
) -> None:
    key_id, key = await auth.ledger.create_api_key(account.id)
    await auth.ledger.revoke_api_key(key_id)
    for kwargs in ({"api_key": key}, {"bearer_token": key}, {"api_key": "sk-kiln-nope"}, {"api_key": ""}, {}):
        with pytest.raises(AuthenticationFailed) as info:
            await auth.authenticate(**kwargs)
        assert info.value.message == AUTHENTICATION_MESSAGE


# --- JWTs that pass ---


async def test_hs256_token_maps_its_subject_to_the_account(
    auth: Authenticator, account: AccountRecord
) -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert (await auth.authenticate(bearer_token=token)).id == account.id


async def test_rs256_token_is_verified_with_the_configured_public_key(
    auth: Authenticator, account: AccountRecord, rsa_key: Any
) -> None:
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    assert (await auth.authenticate(bearer_token=token)).id == account.id


async def test_es256_token_is_verified_with_the_configured_public_key(
    auth: Authenticator, account: AccountRecord, ec_key: Any
) -> None:
    token = jwt.encode(claims(), ec_key, algorithm="ES256")
    assert (await auth.authenticate(bearer_token=token)).id == account.id


async def test_subject_may_be_the_id_of_an_account_without_an_external_subject(
    auth: Authenticator, ledger: Ledger
) -> None:
    plain = await ledger.create_account("plain")
    token = jwt.encode(claims(sub=plain.id), SECRET, algorithm="HS256")
    assert (await auth.authenticate(bearer_token=token)).id == plain.id


async def test_leeway_accepts_a_token_that_just_expired(ledger: Ledger, account: AccountRecord) -> None:
    lenient = Authenticator(ledger, hs256_secret=SECRET, audience=AUDIENCE, issuer=ISSUER, leeway_seconds=120)
    token = jwt.encode(claims(exp=int(time.time()) - 30), SECRET, algorithm="HS256")
    assert (await lenient.authenticate(bearer_token=token)).id == account.id


async def test_audience_and_issuer_are_not_checked_when_their_requirement_is_turned_off(
    ledger: Ledger, account: AccountRecord
) -> None:
    plain = Authenticator(ledger, hs256_secret=SECRET, require_audience=False, require_issuer=False)
    token = jwt.encode(claims(aud="elsewhere", iss="someone"), SECRET, algorithm="HS256")
    assert (await plain.authenticate(bearer_token=token)).id == account.id


# --- JWTs that fail ---


async def test_expired_token_is_rejected(auth: Authenticator, account: AccountRecord) -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 30), SECRET, algorithm="HS256")
    await assert_rejected(auth, token, "expired")


async def test_token_not_yet_valid_is_rejected(auth: Authenticator, account: AccountRecord) -> None:
    token = jwt.encode(claims(nbf=int(time.time()) + 120), SECRET, algorithm="HS256")
    await assert_rejected(auth, token, "not yet valid")


async def test_wrong_audience_is_rejected(auth: Authenticator, account: AccountRecord) -> None:
    token = jwt.encode(claims(aud="another-api"), SECRET, algorithm="HS256")
    await assert_rejected(auth, token, "audience")


async def test_missing_audience_is_rejected_when_one_is_required(
    auth: Authenticator, account: AccountRecord
) -> None:
    token = jwt.encode(claims(aud=None), SECRET, algorithm="HS256")
    await assert_rejected(auth, token, "aud")


async def test_wrong_issuer_is_rejected(auth: Authenticator, account: AccountRecord) -> None:
    token = jwt.encode(claims(iss="https://evil.test"), SECRET, algorithm="HS256")
    await assert_rejected(auth, token, "issuer")


async def test_bad_signature_is_rejected(auth: Authenticator, account: AccountRecord) -> None:
    forged = jwt.encode(claims(), "another-secret-of-at-least-32-bytes", algorithm="HS256")
    await assert_rejected(auth, forged, "bad signature")
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    await assert_rejected(auth, jwt.encode(claims(), stranger, algorithm="RS256"), "bad signature")


async def test_alg_none_is_rejected(auth: Authenticator, account: AccountRecord) -> None:
    token = jwt.encode(claims(), None, algorithm="none")
    assert token.count(".") == 2
    await assert_rejected(auth, token, "'none' is not accepted")


async def test_algorithm_without_a_configured_key_is_rejected(
    ledger: Ledger, account: AccountRecord, rsa_key: Any
) -> None:
    hs_only = Authenticator(ledger, hs256_secret=SECRET, audience=AUDIENCE, issuer=ISSUER)
    await assert_rejected(
        hs_only, jwt.encode(claims(), rsa_key, algorithm="RS256"), "'RS256' is not accepted"
    )


async def test_hs256_token_signed_with_the_public_key_is_rejected(
    ledger: Ledger, account: AccountRecord, rsa_key: Any
) -> None:
    # The classic algorithm-confusion attack: HS256 keyed with the RSA public key.
    rs_only = Authenticator(ledger, public_keys=[public_pem(rsa_key)], audience=AUDIENCE, issuer=ISSUER)
    header = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}').decode()
    body = jwt.utils.base64url_encode(json.dumps(claims()).encode()).decode()
    signature = hmac.new(public_pem(rsa_key), f"{header}.{body}".encode(), hashlib.sha256).digest()
    token = f"{header}.{body}.{jwt.utils.base64url_encode(signature).decode()}"
    await assert_rejected(rs_only, token, "'HS256' is not accepted")


async def test_unknown_subject_is_rejected(auth: Authenticator, account: AccountRecord) -> None:
    token = jwt.encode(claims(sub="nobody"), SECRET, algorithm="HS256")
    await assert_rejected(auth, token, "unknown subject")


async def test_token_without_exp_or_sub_is_rejected(auth: Authenticator, account: AccountRecord) -> None:
    await assert_rejected(auth, jwt.encode(claims(exp=None), SECRET, algorithm="HS256"), "'exp'")
    await assert_rejected(auth, jwt.encode(claims(sub=None), SECRET, algorithm="HS256"), "'sub'")


async def test_malformed_token_is_rejected(auth: Authenticator, account: AccountRecord) -> None:
    await assert_rejected(auth, "not.a.token", "malformed")
    await assert_rejected(auth, "eyJhbGciOiJIUzI1NiJ9.e30.", "")


# --- the hot path: Ledger.authorize finds the account, prices and holds in one transaction ---


async def test_authorize_holds_on_the_account_each_credential_names(
    auth: Authenticator, ledger: Ledger, account: AccountRecord, rsa_key: Any, ec_key: Any
) -> None:
    await ledger.add_credits(account.id, 10, kind="grant")
    _, key = await ledger.create_api_key(account.id)
    finders = [
        auth.finder(api_key=key),
        auth.finder(bearer_token=key),
        auth.finder(bearer_token=jwt.encode(claims(), SECRET, algorithm="HS256")),
        auth.finder(bearer_token=jwt.encode(claims(), rsa_key, algorithm="RS256")),
        auth.finder(bearer_token=jwt.encode(claims(), ec_key, algorithm="ES256")),
    ]
    priced: list[str] = []

    def price(found: AccountRecord) -> list[int]:
        priced.append(found.id)
        return [78]

    for n, finder in enumerate(finders, start=1):
        outcome = await ledger.authorize(finder, price, f"trace-{n}", 60)
        assert outcome.reservation is not None
        assert (outcome.reservation.account_id, outcome.reservation.amount) == (account.id, 78)
        assert outcome.reservation.request_id == f"trace-{n}"
        assert (outcome.account.balance, outcome.account.held) == (1000 - 78 * n, 78 * n)
    assert priced == [account.id] * len(finders)
    assert await ledger.ledger_sum(account.id) == 1000 - 78 * len(finders)


async def test_authorize_prices_for_the_account_the_credential_found(
    auth: Authenticator, ledger: Ledger
) -> None:
    vip = await ledger.create_account("vip", premium=True, external_id="vip-1")
    token = jwt.encode(claims(sub="vip-1"), SECRET, algorithm="HS256")
    outcome = await ledger.authorize(
        auth.finder(bearer_token=token), lambda found: [0 if found.premium else 78], "t", 60
    )
    assert outcome.reservation is not None
    assert (outcome.reservation.account_id, outcome.reservation.amount) == (vip.id, 0)
    assert (outcome.account.balance, outcome.account.held) == (0, 0)


async def test_authorize_with_a_bad_credential_holds_nothing(
    auth: Authenticator, ledger: Ledger, account: AccountRecord
) -> None:
    await ledger.add_credits(account.id, 10, kind="grant")
    key_id, key = await ledger.create_api_key(account.id)
    await ledger.revoke_api_key(key_id)
    unknown_subject = jwt.encode(claims(sub="nobody"), SECRET, algorithm="HS256")
    finders = [
        auth.finder(api_key=key),
        auth.finder(bearer_token=key),
        auth.finder(api_key="sk-kiln-never-issued"),
        auth.finder(bearer_token=unknown_subject),
    ]

    def price(found: AccountRecord) -> list[int]:
        raise AssertionError(f"priced for {found.id} although the credential was refused")

    for finder in finders:
        with pytest.raises(AuthenticationFailed):
            await ledger.authorize(finder, price, "r", 60)
    # A JWT that fails its checks is refused before any database work.
    with pytest.raises(AuthenticationFailed):
        auth.finder(bearer_token=jwt.encode(claims(exp=int(time.time()) - 30), SECRET, algorithm="HS256"))
    after = await ledger.get_account(account.id)
    assert (after.balance, after.held) == (1000, 0)
    count = await ledger.db.run(lambda tx: tx.one("SELECT COUNT(*) FROM reservations"), write=False)
    assert count is not None and int(count[0]) == 0


def test_unsupported_public_keys_are_refused_at_start(sqlite_ledger: Ledger) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ValueError, match="P-256"):
        Authenticator(sqlite_ledger, public_keys=[public_pem(p384)])


# --- hardening ---


@pytest.mark.parametrize("secret", ["", "x" * 31])
def test_an_hs256_secret_shorter_than_32_bytes_is_refused_at_start(ledger: Ledger, secret: str) -> None:
    if not secret:  # no secret: HS256 is simply off
        assert "HS256" not in Authenticator(ledger, hs256_secret=secret).algorithms
        return
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Authenticator(ledger, hs256_secret=secret)


async def test_a_token_living_longer_than_the_maximum_is_refused(
    auth: Authenticator, account: AccountRecord
) -> None:
    now = int(time.time())
    long_lived = jwt.encode(claims(iat=now, exp=now + 24 * 3600 + 60), SECRET, algorithm="HS256")
    await assert_rejected(auth, long_lived, "token lifetime too long")
    without_iat = jwt.encode(claims(iat=None, exp=now + 30 * 24 * 3600), SECRET, algorithm="HS256")
    await assert_rejected(auth, without_iat, "token lifetime too long")
    day = jwt.encode(claims(iat=now, exp=now + 24 * 3600), SECRET, algorithm="HS256")
    assert (await auth.authenticate(bearer_token=day)).id == account.id


async def test_an_account_bound_to_an_external_subject_is_not_found_by_its_internal_id(
    auth: Authenticator, account: AccountRecord, ledger: Ledger
) -> None:
    by_id = jwt.encode(claims(sub=account.id), SECRET, algorithm="HS256")
    await assert_rejected(auth, by_id, "unknown subject")
    unbound = await ledger.create_account("no-subject")
    token = jwt.encode(claims(sub=unbound.id), SECRET, algorithm="HS256")
    assert (await auth.authenticate(bearer_token=token)).id == unbound.id
