"""Users, sign-in and server-side sessions: the third credential beside API keys and JWTs.

* **Users** belong to an account (``kiln admin user create ACCOUNT --name N``). A name is
  case-insensitive (stored lower-cased) and unique across accounts. Passwords are stored
  as Argon2id hashes (argon2-cffi's :class:`~argon2.PasswordHasher`, RFC 9106's
  low-memory profile: 64 MiB, 3 passes, 4 lanes); a hash made with older parameters
  is replaced at the next sign-in.
* **Sign-in** (:meth:`Sessions.sign_in`) verifies the password off the event loop and
  makes a session. Every failure is the same ``authentication_error`` with the same
  message: an unknown user is verified against a dummy hash made with the same
  parameters, so neither the answer nor its time tells whether the name exists; a
  disabled user or account is refused the same way.
* **Wrong passwords are rate limited** (:class:`SignInLimiter`) per user name and per
  client address, with the ``limits`` library in the rate limits' storage
  (``KILN_RATE_LIMIT_STORAGE``: memory, or Redis shared by every billing replica), in a
  moving window of ``sign_in_failure_window_seconds``; past ``sign_in_failures_per_name``
  (or ``..._per_address``) sign-in is refused with a 429 ``rate_limit_error`` and its wait
  *before* the password is checked (so guessing stops, whether the name exists or not).
  A name's attempts are counted as they start (parallel guesses cannot slip past) and
  cleared by a right password; an address counts its wrong passwords.
* **Sessions** are rows in ``sessions``: only the SHA-256 of the token is stored; a
  session ends when it expires (``session_lifetime_seconds`` after sign-in, absolute),
  is signed out, or revoked (``kiln admin session revoke --user NAME``, and disabling
  the user or changing its password revoke its sessions). A disabled account's sessions
  are refused like its keys (:func:`~services.billing.ledger.account_disabled`).
* **CSRF**: a session's CSRF token is :func:`csrf_token_for` its token, HMAC-SHA256 keyed
  with the session token. The edge checks ``X-CSRF-Token`` against it on every
  state-changing request that the session cookie authenticates, with no billing call
  and no stored state; it dies with its session. A page on another origin can neither
  read the HttpOnly cookie nor derive the token from anything it can read.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from services.billing.ledger import (
    _ACCOUNT_COLUMNS,
    AccountFinder,
    AccountRecord,
    Ledger,
    _account,
    _new_id,
    _prefixed,
    account_disabled,
)
from services.billing.store import Row, Tx
from services.common.errors import (
    AUTHENTICATION_MESSAGE,
    AuthenticationFailed,
    InvalidRequest,
    NotFound,
    RateLimited,
    quoted,
)
from services.common.settings import Settings

#: Session tokens start with this (no dots: never mistaken for a JWT).
SESSION_TOKEN_PREFIX = "ks-"
#: A user name: 1 to 64 of these characters (lower-cased), e.g. an e-mail address.
_NAME = re.compile(r"[a-z0-9][a-z0-9._@+-]{0,63}")
MIN_PASSWORD_CHARS = 8
#: Longest password accepted (Argon2 takes any length; this bounds the work of one attempt).
MAX_PASSWORD_CHARS = 1024
#: Longest session token looked up (a real one is 46 characters).
MAX_SESSION_TOKEN_CHARS = 256
SIGN_IN_FAILED_MESSAGE = "Sign-in failed: wrong user name or password."
_CSRF_CONTEXT = b"kiln-csrf-v1"
_USER_COLUMNS = "id, account_id, name, created_at_ms, disabled_at_ms"
_SESSION_COLUMNS = "id, user_id, created_at_ms, expires_at_ms, revoked_at_ms"


@dataclass(frozen=True)
class UserRecord:
    id: str
    account_id: str
    name: str
    created_at_ms: int
    #: When the user was disabled (Unix ms); None while enabled.
    disabled_at_ms: int | None = None


@dataclass(frozen=True)
class SessionRecord:
    id: str
    user_id: str
    user_name: str
    account_id: str
    created_at_ms: int
    expires_at_ms: int
    revoked_at_ms: int | None = None


@dataclass(frozen=True)
class SignedIn:
    """What a sign-in made: the session, its token (shown once) and its CSRF token."""

    account: AccountRecord
    session: SessionRecord
    token: str
    csrf_token: str


def hash_session_token(token: str) -> str:
    """The stored form of a session token: hex SHA-256 (the token has 256 random bits)."""
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_token_for(session_token: str) -> str:
    """The CSRF token of a session: HMAC-SHA256 keyed with the session token, base64url."""
    digest = hmac.new(session_token.encode(), _CSRF_CONTEXT, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def csrf_token_matches(session_token: str, presented: str) -> bool:
    """Whether ``presented`` is the session's CSRF token (constant-time)."""
    return bool(presented) and hmac.compare_digest(csrf_token_for(session_token), presented.strip())


def normalize_name(name: str) -> str:
    return name.strip().lower()


def check_name(name: str) -> str:
    """A new user's name, normalized; InvalidRequest when it is not one."""
    normalized = normalize_name(name)
    if not _NAME.fullmatch(normalized):
        raise InvalidRequest(
            f"Invalid user name '{quoted(name)}': 1 to 64 letters, digits and . _ @ + - "
            "(starting with a letter or digit)."
        )
    return normalized


def check_password(password: str) -> str:
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise InvalidRequest(f"A password has {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters.")
    return password


def sign_in_failed() -> AuthenticationFailed:
    """The one answer of every failed sign-in."""
    return AuthenticationFailed(SIGN_IN_FAILED_MESSAGE)


def _failed(reason: str) -> AuthenticationFailed:
    return AuthenticationFailed(f"{AUTHENTICATION_MESSAGE} ({reason})")


def _user(row: Row) -> UserRecord:
    return UserRecord(
        id=row[0],
        account_id=row[1],
        name=row[2],
        created_at_ms=int(row[3]),
        disabled_at_ms=int(row[4]) if row[4] is not None else None,
    )


def find_session(tx: Tx, token: str, now_ms: int) -> tuple[AccountRecord, SessionRecord]:
    """The account and live session of a session token; AuthenticationFailed otherwise."""
    if not token or len(token) > MAX_SESSION_TOKEN_CHARS:
        raise AuthenticationFailed()
    digest = hash_session_token(token)
    row = tx.one(
        f"SELECT s.token_hash, {_prefixed('s', _SESSION_COLUMNS)}, u.name, u.disabled_at_ms,"
        f" {_prefixed('a', _ACCOUNT_COLUMNS)} FROM sessions s JOIN users u ON u.id = s.user_id"
        " JOIN accounts a ON a.id = u.account_id WHERE s.token_hash = ?",
        (digest,),
    )
    if row is None or not hmac.compare_digest(row[0], digest) or row[5] is not None:
        raise AuthenticationFailed()
    account = _account(row[8:])
    session = SessionRecord(
        id=row[1],
        user_id=row[2],
        user_name=row[6],
        account_id=account.id,
        created_at_ms=int(row[3]),
        expires_at_ms=int(row[4]),
    )
    if session.expires_at_ms <= now_ms:
        raise _failed("session expired")
    if row[7] is not None:
        raise _failed("user disabled")
    if account.disabled:
        raise account_disabled()
    return account, session


def session_finder(token: str, now_ms: int) -> AccountFinder:
    """The account finder of a session token (see :func:`find_session`)."""

    def find(tx: Tx) -> AccountRecord:
        return find_session(tx, token, now_ms)[0]

    return find


class SignInLimiter:
    """Failed sign-ins per user name and per client address, in a moving window (``limits``).

    ``storage_url`` is the rate limits' (``memory://`` or ``redis://...``); a limit of 0
    is no limit."""

    def __init__(
        self,
        storage_url: str = "memory://",
        *,
        per_name: int = 5,
        per_address: int = 50,
        window_seconds: int = 900,
        key_prefix: str = "kiln",
    ) -> None:
        from limits import RateLimitItemPerSecond
        from limits.aio.strategies import MovingWindowRateLimiter

        from services.billing.rate_limits import RequestCounter

        # The storage as the request counters open it (memory, or Redis through redis-py).
        storage = RequestCounter(storage_url, key_prefix=key_prefix).storage
        self.limiter = MovingWindowRateLimiter(storage)
        namespace = f"{key_prefix}-signin"
        self._items = {
            "name": RateLimitItemPerSecond(per_name, window_seconds, namespace=namespace)
            if per_name
            else None,
            "address": RateLimitItemPerSecond(per_address, window_seconds, namespace=namespace)
            if per_address
            else None,
        }

    @classmethod
    def from_settings(cls, settings: Settings) -> SignInLimiter:
        return cls(
            settings.rate_limit_storage,
            per_name=settings.sign_in_failures_per_name,
            per_address=settings.sign_in_failures_per_address,
            window_seconds=settings.sign_in_failure_window_seconds,
            key_prefix=settings.rate_limit_key_prefix,
        )

    def _keys(self, name: str, address: str) -> list[tuple[str, str]]:
        # The address first (it is only tested); the name hashed: any string a client sends
        # makes a key of bounded length.
        keys = [("address", address[:64])] if address else []
        keys.append(("name", hashlib.sha256(name.encode()).hexdigest()[:32]))
        return [(kind, value) for kind, value in keys if self._items[kind] is not None]

    async def _wait(self, kind: str, value: str) -> float:
        item = self._items[kind]
        assert item is not None
        stats = await self.limiter.get_window_stats(item, kind, value)
        return max(1.0, stats.reset_time - time.time())

    async def attempt(self, name: str, address: str) -> float | None:
        """Counts an attempt before its password is checked: None when it may go on, else the
        seconds to wait. The name's attempt is counted here in one step (a burst of parallel
        guesses cannot all pass a check made before any of them failed) and cleared by a
        right password; the address counts failures only (:meth:`failed`)."""
        for kind, value in self._keys(name, address):
            item = self._items[kind]
            assert item is not None
            allowed = (
                await self.limiter.hit(item, kind, value)
                if kind == "name"
                else await self.limiter.test(item, kind, value)
            )
            if not allowed:
                return await self._wait(kind, value)
        return None

    async def failed(self, name: str, address: str) -> None:
        """A wrong password: counted against the address (the name's attempt already is)."""
        for kind, value in self._keys(name, address):
            item = self._items[kind]
            if kind == "address" and item is not None:
                await self.limiter.hit(item, kind, value)

    async def succeeded(self, name: str) -> None:
        """A right password clears its name's failures (not its address's)."""
        item = self._items["name"]
        if item is not None:
            await self.limiter.clear(item, "name", hashlib.sha256(name.encode()).hexdigest()[:32])


def too_many_failures(seconds: float) -> RateLimited:
    wait = max(1, round(seconds))
    return RateLimited(
        f"Too many failed sign-in attempts. Try again in {wait} seconds.", retry_after=float(wait)
    )


class Sessions:
    """Users, sign-in and sessions over the ledger's database (its clock too)."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        lifetime_seconds: int = 24 * 3600,
        hasher: PasswordHasher | None = None,
        limiter: SignInLimiter | None = None,
    ) -> None:
        self.ledger = ledger
        self.lifetime_ms = lifetime_seconds * 1000
        self.hasher = hasher or PasswordHasher()
        self.limiter = limiter
        self._dummy_hash: str | None = None

    @classmethod
    def from_settings(cls, ledger: Ledger, settings: Settings) -> Sessions:
        return cls(
            ledger,
            lifetime_seconds=settings.session_lifetime_seconds,
            limiter=SignInLimiter.from_settings(settings),
        )

    # --- users ---

    async def create_user(self, account_id: str, name: str, password: str) -> UserRecord:
        """A new user of ``account_id`` who signs in as ``name`` with ``password``."""
        normalized = check_name(name)
        password_hash = await asyncio.to_thread(self.hasher.hash, check_password(password))
        user_id = _new_id("user")
        now = self.ledger.now_ms()

        def tx_fn(tx: Tx) -> Row | None:
            if tx.one("SELECT id FROM accounts WHERE id = ?", (account_id,)) is None:
                raise NotFound(f"Account '{account_id}' not found.")
            return tx.one(
                "INSERT INTO users (id, account_id, name, password_hash, created_at_ms)"
                f" VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING {_USER_COLUMNS}",
                (user_id, account_id, normalized, password_hash, now),
            )

        row = await self.ledger.db.run(tx_fn)
        if row is None:
            raise InvalidRequest(f"The user name '{normalized}' is taken.")
        return _user(row)

    async def get_user(self, name: str) -> UserRecord:
        normalized = normalize_name(name)
        row = await self.ledger.db.run(
            lambda tx: tx.one(f"SELECT {_USER_COLUMNS} FROM users WHERE name = ?", (normalized,)),
            write=False,
        )
        if row is None:
            raise NotFound(f"No user '{quoted(normalized)}'.")
        return _user(row)

    async def list_users(self, account_id: str) -> list[UserRecord]:
        rows = await self.ledger.db.run(
            lambda tx: tx.all(
                f"SELECT {_USER_COLUMNS} FROM users WHERE account_id = ? ORDER BY created_at_ms, id",
                (account_id,),
            ),
            write=False,
        )
        return [_user(row) for row in rows]

    async def set_user_disabled(self, name: str, disabled: bool) -> UserRecord:
        """Disables a user (its sessions are revoked, and it cannot sign in) or enables it."""
        normalized = normalize_name(name)
        now = self.ledger.now_ms()

        def tx_fn(tx: Tx) -> Row | None:
            row = tx.one(
                "UPDATE users SET disabled_at_ms = "
                + ("COALESCE(disabled_at_ms, ?)" if disabled else "NULL")
                + f" WHERE name = ? RETURNING {_USER_COLUMNS}",
                (now, normalized) if disabled else (normalized,),
            )
            if row is not None and disabled:
                _revoke_user_sessions(tx, row[0], now)
            return row

        row = await self.ledger.db.run(tx_fn)
        if row is None:
            raise NotFound(f"No user '{quoted(normalized)}'.")
        return _user(row)

    async def set_password(self, name: str, password: str) -> int:
        """Changes a user's password; its sessions are revoked. Returns how many were."""
        normalized = normalize_name(name)
        password_hash = await asyncio.to_thread(self.hasher.hash, check_password(password))
        now = self.ledger.now_ms()

        def tx_fn(tx: Tx) -> int:
            row = tx.one(
                "UPDATE users SET password_hash = ? WHERE name = ? RETURNING id", (password_hash, normalized)
            )
            if row is None:
                raise NotFound(f"No user '{quoted(normalized)}'.")
            return _revoke_user_sessions(tx, row[0], now)

        return await self.ledger.db.run(tx_fn)

    # --- sessions ---

    async def sign_in(self, name: str, password: str, client_address: str = "") -> SignedIn:
        """A new session for the right name and password (see the module docstring)."""
        normalized = normalize_name(name)
        if self.limiter is not None:
            wait = await self.limiter.attempt(normalized, client_address)
            if wait is not None:
                raise too_many_failures(wait)
        # A name no user can have (a NUL, which PostgreSQL's text refuses, too) is not looked up.
        row = (
            await self.ledger.db.run(
                lambda tx: tx.one(
                    f"SELECT u.id, u.password_hash, u.disabled_at_ms, {_prefixed('a', _ACCOUNT_COLUMNS)}"
                    " FROM users u JOIN accounts a ON a.id = u.account_id WHERE u.name = ?",
                    (normalized,),
                ),
                write=False,
            )
            if _NAME.fullmatch(normalized)
            else None
        )
        dummy = await self._dummy()  # made by the first sign-in, whatever the name: no timing tell
        stored = row[1] if row is not None else dummy
        usable = len(password) <= MAX_PASSWORD_CHARS
        verified = await asyncio.to_thread(self._verify, stored, password if usable else "")
        if not (verified and usable and row is not None):
            if self.limiter is not None:
                await self.limiter.failed(normalized, client_address)
            raise sign_in_failed()
        user_id = str(row[0])
        if self.limiter is not None:
            await self.limiter.succeeded(normalized)
        if self.hasher.check_needs_rehash(stored):
            new_hash = await asyncio.to_thread(self.hasher.hash, password)
            await self.ledger.db.run(
                lambda tx: tx.execute("UPDATE users SET password_hash = ? WHERE id = ?", (new_hash, user_id))
            )
        token = SESSION_TOKEN_PREFIX + secrets.token_urlsafe(32)
        session_id = _new_id("sess")
        now = self.ledger.now_ms()
        expires = now + self.lifetime_ms

        def tx_fn(tx: Tx) -> Row | None:
            # Only for a user and account still enabled (checked again, in the insert).
            return tx.one(
                "INSERT INTO sessions (id, token_hash, user_id, created_at_ms, expires_at_ms)"
                " SELECT ?, ?, u.id, ?, ? FROM users u JOIN accounts a ON a.id = u.account_id"
                " WHERE u.id = ? AND u.disabled_at_ms IS NULL AND a.disabled_at_ms IS NULL RETURNING id",
                (session_id, hash_session_token(token), now, expires, user_id),
            )

        if await self.ledger.db.run(tx_fn) is None:
            raise sign_in_failed()  # a disabled user or account: the same answer as a wrong password
        account = _account(row[3:])
        session = SessionRecord(session_id, user_id, normalized, account.id, now, expires)
        return SignedIn(account, session, token, csrf_token_for(token))

    async def authenticate(self, token: str) -> tuple[AccountRecord, SessionRecord]:
        """The account and session of a live session token; AuthenticationFailed otherwise."""
        now = self.ledger.now_ms()
        return await self.ledger.db.run(lambda tx: find_session(tx, token, now), write=False)

    async def sign_out(self, token: str) -> bool:
        """Revokes the session of ``token``; False when it was unknown or already ended."""
        if not token or len(token) > MAX_SESSION_TOKEN_CHARS:
            return False
        now = self.ledger.now_ms()
        changed = await self.ledger.db.run(
            lambda tx: tx.execute(
                "UPDATE sessions SET revoked_at_ms = ? WHERE token_hash = ? AND revoked_at_ms IS NULL"
                " AND expires_at_ms > ?",
                (now, hash_session_token(token), now),
            )
        )
        return changed == 1

    async def revoke_user_sessions(self, name: str) -> int:
        """Revokes every live session of a user; returns how many."""
        user = await self.get_user(name)
        now = self.ledger.now_ms()
        return await self.ledger.db.run(lambda tx: _revoke_user_sessions(tx, user.id, now))

    async def list_sessions(self, name: str) -> list[SessionRecord]:
        """A user's sessions, newest first (ended ones too)."""
        user = await self.get_user(name)
        rows = await self.ledger.db.run(
            lambda tx: tx.all(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE user_id = ? ORDER BY created_at_ms DESC, id",
                (user.id,),
            ),
            write=False,
        )
        return [
            SessionRecord(r[0], r[1], user.name, user.account_id, int(r[2]), int(r[3]), r[4]) for r in rows
        ]

    # --- passwords ---

    def _verify(self, stored: str, password: str) -> bool:
        try:
            return bool(self.hasher.verify(stored, password))
        except (VerificationError, InvalidHashError):
            return False

    async def _dummy(self) -> str:
        """A hash with this hasher's parameters, verified for unknown names (equal time)."""
        if self._dummy_hash is None:
            self._dummy_hash = await asyncio.to_thread(self.hasher.hash, secrets.token_hex(16))
        return self._dummy_hash


def _revoke_user_sessions(tx: Tx, user_id: str, now: int) -> int:
    return tx.execute(
        "UPDATE sessions SET revoked_at_ms = ? WHERE user_id = ? AND revoked_at_ms IS NULL AND expires_at_ms > ?",
        (now, user_id, now),
    )
