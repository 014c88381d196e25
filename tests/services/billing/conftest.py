"""Fixtures of the billing tests: real SQLite files and a real PostgreSQL database per test,
and the JWT set-up (keys, claims, an authenticator) the credential tests share.

PostgreSQL is reached at ``KILN_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``); each test gets its own
database, created and dropped here. Without a server the PostgreSQL cases are
skipped, unless ``CI`` is set: then they fail.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.billing.auth import Authenticator
from services.billing.ledger import AccountRecord, Ledger
from services.billing.store import Database
from services.common.errors import AUTHENTICATION_MESSAGE, AuthenticationFailed, ErrorType

from .billing_fakes import FakeClock

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
#: The JWT settings every billing test signs and verifies with.
SECRET = "servicer-test-secret-of-32-bytes-or-more"
AUDIENCE = "kiln-servicer-tests"
ISSUER = "https://issuer.servicer.test"
#: The ``sub`` of :func:`claims`, and the external subject of the ``account`` fixture.
SUBJECT = "user-42"


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    url = os.environ.get("KILN_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        message = f"PostgreSQL is not reachable at {url}: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return url


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@pytest.fixture
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test; dropped afterwards."""
    name = f"kiln_billing_test_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(postgres_admin_url, name)
    finally:
        with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'billing.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """The URL of an empty database, once per engine."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
async def database(db_url: str) -> AsyncIterator[Database]:
    db = await Database.open(db_url)
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ledger(database: Database, clock: FakeClock) -> Ledger:
    return Ledger(database, clock=clock)


@pytest.fixture
async def sqlite_ledger(sqlite_url: str, clock: FakeClock) -> AsyncIterator[Ledger]:
    """A ledger on SQLite only, for tests whose subject is not the storage."""
    db = await Database.open(sqlite_url)
    try:
        yield Ledger(db, clock=clock)
    finally:
        await db.close()


# --- JWTs ---


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims for :data:`SUBJECT` (five minutes left), with ``overrides``; ``None`` drops a claim."""
    now = int(time.time())
    base: dict[str, Any] = {"sub": SUBJECT, "exp": now + 300, "iat": now, "aud": AUDIENCE, "iss": ISSUER}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


async def assert_rejected(auth: Authenticator, token: str, reason: str) -> None:
    """``auth`` refuses ``token`` with the contract's message and a reason in brackets holding ``reason``."""
    with pytest.raises(AuthenticationFailed) as info:
        await auth.authenticate(bearer_token=token)
    message = info.value.message
    assert message.startswith(f"{AUTHENTICATION_MESSAGE} (") and message.endswith(")"), message
    assert reason in message, message
    assert info.value.error_type is ErrorType.AUTHENTICATION


@pytest.fixture
def auth_ledger(ledger: Ledger) -> Ledger:
    """The ledger of ``auth`` and ``account``: both engines; a module whose subject is not the
    storage overrides it with ``sqlite_ledger``."""
    return ledger


@pytest.fixture
async def account(auth_ledger: Ledger) -> AccountRecord:
    """An account whose external subject is :data:`SUBJECT`."""
    return await auth_ledger.create_account("jwt-user", external_id=SUBJECT)


@pytest.fixture
def auth(auth_ledger: Ledger, rsa_key: Any, ec_key: Any) -> Authenticator:
    """An authenticator accepting HS256 (:data:`SECRET`), RS256 and ES256, audience and issuer required."""
    return Authenticator(
        auth_ledger,
        hs256_secret=SECRET,
        public_keys=[public_pem(rsa_key), public_pem(ec_key)],
        audience=AUDIENCE,
        issuer=ISSUER,
    )
