"""Credentials to accounts: API keys, and JWTs signed with HS256, RS256 and ES256."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.billing.auth import Authenticator
from services.billing.ledger import AccountRecord, Ledger
from services.common.errors import AUTHENTICATION_MESSAGE, AuthenticationFailed

SECRET = "a-test-secret-of-at-least-32-bytes!!"
AUDIENCE = "kiln-api"
ISSUER = "https://issuer.test"


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
async def account(sqlite_ledger: Ledger) -> AccountRecord:
    return await sqlite_ledger.create_account("jwt-user", external_id="user-42")


@pytest.fixture
def auth(sqlite_ledger: Ledger, rsa_key: Any, ec_key: Any) -> Authenticator:
    return Authenticator(
        sqlite_ledger,
        hs256_secret=SECRET,
        public_keys=[public_pem(rsa_key), public_pem(ec_key)],
        audience=AUDIENCE,
        issuer=ISSUER,
    )


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "user-42", "exp": now + 300, "iat": now, "aud": AUDIENCE, "iss": ISSUER}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


async def assert_rejected(auth: Authenticator, token: str, reason: str) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        await auth.authenticate(bearer_token=token)
    assert info.value.message.startswith(AUTHENTICATION_MESSAGE)
    assert reason in info.value.message
    assert info.value.error_type.value == "authentication_error"


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


async def test_subject_may_be_the_account_id(auth: Authenticator, account: AccountRecord) -> None:
    token = jwt.encode(claims(sub=account.id), SECRET, algorithm="HS256")
    assert (await auth.authenticate(bearer_token=token)).id == account.id


async def test_leeway_accepts_a_token_that_just_expired(
    sqlite_ledger: Ledger, account: AccountRecord
) -> None:
    lenient = Authenticator(sqlite_ledger, hs256_secret=SECRET, leeway_seconds=120)
    token = jwt.encode(claims(exp=int(time.time()) - 30), SECRET, algorithm="HS256")
    assert (await lenient.authenticate(bearer_token=token)).id == account.id


async def test_audience_and_issuer_are_not_checked_when_not_configured(
    sqlite_ledger: Ledger, account: AccountRecord
) -> None:
    plain = Authenticator(sqlite_ledger, hs256_secret=SECRET)
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
    sqlite_ledger: Ledger, account: AccountRecord, rsa_key: Any
) -> None:
    hs_only = Authenticator(sqlite_ledger, hs256_secret=SECRET)
    await assert_rejected(
        hs_only, jwt.encode(claims(), rsa_key, algorithm="RS256"), "'RS256' is not accepted"
    )


async def test_hs256_token_signed_with_the_public_key_is_rejected(
    sqlite_ledger: Ledger, account: AccountRecord, rsa_key: Any
) -> None:
    # The classic algorithm-confusion attack: HS256 keyed with the RSA public key.
    rs_only = Authenticator(sqlite_ledger, public_keys=[public_pem(rsa_key)])
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


def test_unsupported_public_keys_are_refused_at_start(sqlite_ledger: Ledger) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ValueError, match="P-256"):
        Authenticator(sqlite_ledger, public_keys=[public_pem(p384)])
