"""Accounts, API keys, credit holds and the ledger: the business rules of billing money.

Amounts are integer units (hundredths of a credit). An account has a
spendable ``balance`` and a ``held`` amount (open reservations). Every change
of the spendable balance is a row in ``ledger_entries``, so ``balance`` is
always the sum of the account's ledger rows:

====================  ===========  ==========================================
event                 ledger rows  balance / held
====================  ===========  ==========================================
purchase / grant      +credits     balance += credits
reserve (hold H)      hold -H      balance -= H, held += H
commit (charge C<=H)  release +H,  balance += H - C, held -= H
                      charge -C
release               release +H   balance += H, held -= H
expiry (TTL passed)   expire +H    balance += H, held -= H
====================  ===========  ==========================================

Rows of amount 0 (premium accounts hold 0) are not written.

The balance can never go negative: a hold is a conditional
``UPDATE ... WHERE balance >= amount`` and the table has a CHECK constraint.
Every hold gets a new id made here; the caller's request id is only recorded
(a trace id), so repeating it never selects an existing hold.

Idempotency keys (a client's ``Idempotency-Key``) are scoped to the account
and stored with a fingerprint of the request in ``idempotency_keys``, in the
same transaction as the hold: a repeat of a finished request gets its stored
answer back (no hold), a repeat of a running or streamed one a
:class:`~services.common.errors.Conflict`, another request under the same key an
``invalid_request_error``. A release or an expired hold frees the key.

A disabled account (``disabled_at_ms`` set by :meth:`Ledger.set_disabled`)
is refused by every credential finder, so it gets no new hold; holds placed
before it was disabled settle normally (commit charges, release returns).

Commit charges what a price function says the work done costs, capped at the
hold. Commit and release are idempotent when repeated; mixing them, or
committing after expiry, fails with ``invalid_request_error``. Nothing here
knows about gRPC.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Literal

from services.billing.pricing import purchase_paid_units
from services.billing.store import Database, Row, Tx
from services.common.errors import (
    AUTHENTICATION_MESSAGE,
    AuthenticationFailed,
    Conflict,
    InsufficientCredits,
    InvalidRequest,
    KilnError,
    NotFound,
    quoted,
)
from services.common.money import UNITS_PER_CREDIT, format_credits

ReservationState = Literal["held", "committed", "released", "expired"]
CreditKind = Literal["purchase", "grant"]

API_KEY_PREFIX = "sk-kiln-"
MAX_REQUEST_ID_CHARS = 200
#: Idempotency-Key: 1 to 255 printable ASCII characters, kept this long.
MAX_IDEMPOTENCY_KEY_CHARS = 255
IDEMPOTENCY_TTL_SECONDS = 24 * 3600
#: Upper bound of one purchase or grant (a typo guard), in credits.
MAX_CREDITS_PER_ADD = Decimal(10) ** 12
MAINTENANCE_FLAG = "maintenance"

_ACCOUNT_COLUMNS = "id, name, premium, balance, held, external_id, disabled_at_ms"
_RESERVATION_COLUMNS = "id, account_id, request_id, amount, charged, state, expires_at_ms"
_MEDIA_COLUMNS = "media_id, kind, mime_type, model, prompt, width, height, frames, fps, duration_seconds, size_bytes, created_at_ms"
#: ListMedia's sort keys -> columns (a whitelist: the name goes into the SQL).
MEDIA_SORT_COLUMNS = {
    "created_at": "created_at_ms",
    "duration_seconds": "duration_seconds",
    "frames": "frames",
    "size_bytes": "size_bytes",
    "width": "width",
    "height": "height",
}
#: Most records one ListMedia page returns.
MAX_MEDIA_PAGE = 100
#: Most records one media sweep expires, and most candidate ids it checks.
MAX_MEDIA_SWEEP = 1000


@dataclass(frozen=True)
class MediaRecord:
    """A file a committed request produced (the account's library)."""

    media_id: str
    kind: str
    mime_type: str
    model: str = ""
    prompt: str = ""
    width: int = 0
    height: int = 0
    frames: int = 0
    fps: float = 0.0
    duration_seconds: float = 0.0
    size_bytes: int = 0
    created_at_ms: int = 0


@dataclass(frozen=True)
class IdempotencyClaim:
    """A client's idempotency key with the fingerprint of the request it came with."""

    key: str
    fingerprint: str
    #: The answer is streamed: never replayed, a repeat is refused once it started.
    streamed: bool = False


@dataclass(frozen=True)
class StoredAnswer:
    """An answer kept for an idempotency key: status, headers and body (or the
    media store id of a large body)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    body_media_id: str = ""


@dataclass(frozen=True)
class Authorization:
    """What :meth:`Ledger.authorize` did: a new hold, or the stored answer of a finished
    request with the same idempotency key (then ``reservation`` is None: nothing is held)."""

    account: AccountRecord
    reservation: ReservationRecord | None
    amounts: list[int]
    replay: StoredAnswer | None = None


@dataclass(frozen=True)
class AccountRecord:
    id: str
    name: str
    premium: bool
    balance: int
    held: int
    external_id: str | None
    #: When the account was disabled (Unix ms); None while it is enabled.
    disabled_at_ms: int | None = None

    @property
    def disabled(self) -> bool:
        return self.disabled_at_ms is not None


@dataclass(frozen=True)
class ReservationRecord:
    id: str
    account_id: str
    request_id: str
    amount: int
    charged: int
    state: ReservationState
    expires_at_ms: int


@dataclass(frozen=True)
class LedgerEntry:
    id: int
    account_id: str
    kind: str
    amount: int
    reservation_id: str | None
    created_at_ms: int
    note: str


@dataclass(frozen=True)
class PurchaseRecord:
    id: str
    account_id: str
    credits_units: int
    discount_percent: int
    paid_units: int


@dataclass(frozen=True)
class ApiKeyRecord:
    id: str
    account_id: str
    name: str
    prefix: str
    created_at_ms: int
    revoked_at_ms: int | None


def _account(row: Row) -> AccountRecord:
    return AccountRecord(
        id=row[0],
        name=row[1],
        premium=bool(row[2]),
        balance=int(row[3]),
        held=int(row[4]),
        external_id=row[5],
        disabled_at_ms=int(row[6]) if row[6] is not None else None,
    )


def _reservation(row: Row) -> ReservationRecord:
    return ReservationRecord(
        id=row[0],
        account_id=row[1],
        request_id=row[2],
        amount=int(row[3]),
        charged=int(row[4]),
        state=row[5],
        expires_at_ms=int(row[6]),
    )


def hash_api_key(key: str) -> str:
    """The stored form of an API key: hex SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()


def _new_id(prefix: str, nbytes: int = 12) -> str:
    return f"{prefix}_{secrets.token_hex(nbytes)}"


def _account_not_found(account_id: str) -> NotFound:
    return NotFound(f"Account '{account_id}' not found.")


def account_disabled() -> AuthenticationFailed:
    """The refusal of every credential of a disabled account."""
    return AuthenticationFailed(f"{AUTHENTICATION_MESSAGE} (account disabled)")


def _reservation_not_found(reservation_id: str) -> NotFound:
    return NotFound(f"Reservation '{reservation_id}' not found.")


def _credits_to_units(credits: Decimal | int | str) -> int:
    try:
        value = Decimal(str(credits))
    except InvalidOperation:
        raise InvalidRequest(f"Invalid credit amount {credits!r}.") from None
    if not value.is_finite() or value <= 0:
        raise InvalidRequest(f"The credit amount must be positive, got {credits}.")
    if value > MAX_CREDITS_PER_ADD:
        raise InvalidRequest(f"The credit amount {credits} is too large.")
    units = value * UNITS_PER_CREDIT
    if units != units.to_integral_value():
        raise InvalidRequest(f"Credit amounts have at most two decimals (0.01 credit), got {credits}.")
    return int(units)


class Ledger:
    """The billing rules over a :class:`~services.billing.store.Database`.

    ``clock`` returns Unix seconds (``time.time``); tests inject their own to
    move time. ``maintenance_cache_seconds`` bounds how stale
    :meth:`maintenance` may be (it is read on every request).
    """

    def __init__(
        self,
        db: Database,
        *,
        clock: Callable[[], float] = time.time,
        maintenance_cache_seconds: float = 1.0,
    ) -> None:
        self.db = db
        self.clock = clock
        self.maintenance_cache_seconds = maintenance_cache_seconds
        self._maintenance: tuple[bool, float] | None = None

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # --- accounts ---

    async def create_account(
        self, name: str, *, premium: bool = False, external_id: str | None = None
    ) -> AccountRecord:
        name = name.strip()
        if not name:
            raise InvalidRequest("An account needs a name.")
        if external_id is not None and not external_id.strip():
            raise InvalidRequest("An external id (JWT subject) must not be empty.")
        account_id = _new_id("acct")
        now = self.now_ms()

        def tx_fn(tx: Tx) -> Row | None:
            return tx.one(
                "INSERT INTO accounts (id, name, premium, balance, held, external_id, created_at_ms)"
                " VALUES (?, ?, ?, 0, 0, ?, ?) ON CONFLICT DO NOTHING RETURNING " + _ACCOUNT_COLUMNS,
                (account_id, name, premium, external_id, now),
            )

        row = await self.db.run(tx_fn)
        if row is None:
            raise InvalidRequest(f"The subject '{external_id}' already belongs to another account.")
        return _account(row)

    async def get_account(self, account_id: str) -> AccountRecord:
        return await self.db.run(lambda tx: account_in(tx, account_id), write=False)

    async def find_account_by_subject(self, sub: str) -> AccountRecord | None:
        """The account a JWT subject names: by external id first, then by account id."""
        if not sub:
            return None
        return await self.db.run(lambda tx: _account_by_subject(tx, sub), write=False)

    async def find_accounts_by_name(self, name: str) -> list[AccountRecord]:
        """Accounts with this display name, oldest first."""
        rows = await self.db.run(
            lambda tx: tx.all(
                f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE name = ? ORDER BY created_at_ms, id",
                (name,),
            ),
            write=False,
        )
        return [_account(row) for row in rows]

    async def set_premium(self, account_id: str, premium: bool) -> AccountRecord:
        row = await self.db.run(
            lambda tx: tx.one(
                f"UPDATE accounts SET premium = ? WHERE id = ? RETURNING {_ACCOUNT_COLUMNS}",
                (premium, account_id),
            )
        )
        if row is None:
            raise _account_not_found(account_id)
        return _account(row)

    async def set_disabled(self, account_id: str, disabled: bool) -> AccountRecord:
        """Disables an account (every credential of it is refused from now on, and it gets no
        new hold) or enables it again. Disabling twice keeps the first time; holds already
        placed settle normally."""
        now = self.now_ms()
        row = await self.db.run(
            lambda tx: tx.one(
                "UPDATE accounts SET disabled_at_ms = "
                + ("COALESCE(disabled_at_ms, ?)" if disabled else "NULL")
                + f" WHERE id = ? RETURNING {_ACCOUNT_COLUMNS}",
                (now, account_id) if disabled else (account_id,),
            )
        )
        if row is None:
            raise _account_not_found(account_id)
        return _account(row)

    # --- API keys ---

    async def create_api_key(
        self, account_id: str, *, name: str = "", key: str | None = None
    ) -> tuple[str, str]:
        """Creates a key; returns (key id, the key). The key is shown once and stored hashed.

        ``key`` registers a fixed key (the demo key) instead of a random one.
        """
        if key is None:
            key = API_KEY_PREFIX + secrets.token_urlsafe(32)
        elif len(key) < 16 or key != key.strip() or "." in key:
            raise InvalidRequest("An API key must have at least 16 characters, no spaces and no dots.")
        key_id = _new_id("key", 8)
        now = self.now_ms()

        def tx_fn(tx: Tx) -> None:
            if tx.one("SELECT id FROM accounts WHERE id = ?", (account_id,)) is None:
                raise _account_not_found(account_id)
            inserted = tx.one(
                "INSERT INTO api_keys (id, account_id, name, key_hash, prefix, created_at_ms)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                (key_id, account_id, name, hash_api_key(key), key[:12], now),
            )
            if inserted is None:
                raise InvalidRequest("This API key is already registered.")

        await self.db.run(tx_fn)
        return key_id, key

    async def revoke_api_key(self, key_id: str) -> ApiKeyRecord:
        """Revokes a key (at once: it is checked on every request). Revoking twice is a no-op."""
        now = self.now_ms()

        def tx_fn(tx: Tx) -> Row | None:
            tx.execute(
                "UPDATE api_keys SET revoked_at_ms = ? WHERE id = ? AND revoked_at_ms IS NULL", (now, key_id)
            )
            return tx.one(
                "SELECT id, account_id, name, prefix, created_at_ms, revoked_at_ms FROM api_keys WHERE id = ?",
                (key_id,),
            )

        row = await self.db.run(tx_fn)
        if row is None:
            raise NotFound(f"API key '{key_id}' not found.")
        return ApiKeyRecord(*row)

    async def list_api_keys(self, account_id: str) -> list[ApiKeyRecord]:
        rows = await self.db.run(
            lambda tx: tx.all(
                "SELECT id, account_id, name, prefix, created_at_ms, revoked_at_ms FROM api_keys"
                " WHERE account_id = ? ORDER BY created_at_ms, id",
                (account_id,),
            ),
            write=False,
        )
        return [ApiKeyRecord(*row) for row in rows]

    async def find_api_key(self, key: str) -> ApiKeyRecord | None:
        """The record of a key, revoked or not (None when unknown)."""
        row = await self.db.run(
            lambda tx: tx.one(
                "SELECT id, account_id, name, prefix, created_at_ms, revoked_at_ms FROM api_keys"
                " WHERE key_hash = ?",
                (hash_api_key(key),),
            ),
            write=False,
        )
        return ApiKeyRecord(*row) if row is not None else None

    async def account_for_api_key(self, key: str) -> AccountRecord:
        """The account of a valid key; AuthenticationFailed for an unknown or revoked key, or a
        disabled account."""
        return await self.find_account(api_key_finder(key))

    async def find_account(self, find: AccountFinder) -> AccountRecord:
        """Runs an account finder (see :func:`api_key_finder`) in a read-only transaction."""
        return await self.db.run(find, write=False)

    # --- credits ---

    async def add_credits(
        self, account_id: str, credits: Decimal | int | str, *, kind: CreditKind = "purchase"
    ) -> PurchaseRecord:
        """Adds credits: a purchase (bulk discounts apply, the price paid is recorded) or a free grant."""
        if kind not in ("purchase", "grant"):
            raise InvalidRequest(f"Unknown credit kind '{kind}'.")
        units = _credits_to_units(credits)
        discount, paid = purchase_paid_units(units) if kind == "purchase" else (0, 0)
        purchase_id = _new_id("pur")
        now = self.now_ms()
        note = f"{format_credits(units)} credits"
        if kind == "purchase":
            note += f", {discount}% off, paid ${Decimal(paid) / (UNITS_PER_CREDIT * 100):.4f}"

        def tx_fn(tx: Tx) -> None:
            if tx.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (units, account_id)) != 1:
                raise _account_not_found(account_id)
            tx.execute(
                "INSERT INTO purchases (id, account_id, kind, credits_units, discount_percent, paid_units,"
                " created_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (purchase_id, account_id, kind, units, discount, paid, now),
            )
            _ledger_row(tx, account_id, kind, units, None, now, note)

        await self.db.run(tx_fn)
        return PurchaseRecord(purchase_id, account_id, units, discount, paid)

    # --- reservations ---

    async def reserve(
        self, account_id: str, amount: int, request_id: str, ttl_seconds: float
    ) -> ReservationRecord:
        """Holds ``amount`` units; the same (account, request id) returns the first hold."""
        reservation, _ = await self.reserve_with_account(account_id, amount, request_id, ttl_seconds)
        return reservation

    async def reserve_with_account(
        self, account_id: str, amount: int, request_id: str, ttl_seconds: float
    ) -> tuple[ReservationRecord, AccountRecord]:
        """:meth:`reserve`, also returning the account as it is after the hold (one transaction)."""
        if amount < 0:
            raise InvalidRequest(f"The amount to hold must not be negative, got {amount}.")
        hold = self._hold_fn(request_id, ttl_seconds)
        return await self.db.run(lambda tx: hold(tx, account_id, amount))

    async def authorize(
        self,
        find_account: AccountFinder,
        price: Callable[[AccountRecord], list[int]],
        request_id: str,
        ttl_seconds: float,
        idempotency: IdempotencyClaim | None = None,
        then: Callable[[Tx, AccountRecord, ReservationRecord], None] | None = None,
    ) -> Authorization:
        """Finds the caller's account, prices the work for it and holds the total: one transaction.

        ``price`` may refuse the account (e.g. PremiumRequired); nothing is held
        then. With ``idempotency``, the key is claimed for the new hold in the same
        transaction, or the stored answer of its finished request is returned.
        ``then(tx, account, reservation)`` runs in the same transaction after the hold
        (a task is queued with its hold, or neither is).
        """
        hold = self._hold_fn(request_id, ttl_seconds)
        if idempotency is not None:
            _check_idempotency_key(idempotency.key)
        now = self.now_ms()

        def tx_fn(tx: Tx) -> Authorization:
            account = find_account(tx)
            if idempotency is not None:
                replay = _earlier_answer(tx, account.id, idempotency, now)
                if replay is not None:
                    return Authorization(account, None, [], replay)
            amounts = price(account)
            reservation, after = hold(tx, account.id, sum(amounts))
            if idempotency is not None:
                claimed = tx.one(
                    "INSERT INTO idempotency_keys (account_id, idem_key, fingerprint, reservation_id, streamed,"
                    " created_at_ms, expires_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (account_id, idem_key) DO NOTHING RETURNING idem_key",
                    (
                        account.id,
                        idempotency.key,
                        idempotency.fingerprint,
                        reservation.id,
                        idempotency.streamed,
                        now,
                        now + IDEMPOTENCY_TTL_SECONDS * 1000,
                    ),
                )
                if claimed is None:  # a concurrent request took the key first (PostgreSQL)
                    raise _in_progress(idempotency.key)
            if then is not None:
                then(tx, after, reservation)
            return Authorization(after, reservation, amounts)

        return await self.db.run(tx_fn)

    async def save_response(self, reservation_id: str, answer: StoredAnswer) -> bool:
        """Stores the answer of a committed request that claimed an idempotency key.

        Returns False when there is nothing to store it for (no key, a streamed answer, or
        already stored).
        """
        headers = json.dumps([list(pair) for pair in answer.headers])

        def tx_fn(tx: Tx) -> int:
            res = _read_reservation(tx, reservation_id)
            if res.state != "committed":
                raise InvalidRequest(f"Reservation '{res.id}' is not committed; there is no answer to store.")
            return tx.execute(
                "UPDATE idempotency_keys SET response_status = ?, response_headers = ?, response_body = ?,"
                " response_media_id = ? WHERE reservation_id = ? AND response_status IS NULL"
                " AND streamed = FALSE",
                (answer.status, headers, answer.body, answer.body_media_id, reservation_id),
            )

        return await self.db.run(tx_fn) == 1

    def _hold_fn(
        self, request_id: str, ttl_seconds: float
    ) -> Callable[[Tx, str, int], tuple[ReservationRecord, AccountRecord]]:
        """Checks a hold's trace id and TTL; returns the in-transaction hold for them."""
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequest(f"'request_id' is longer than {MAX_REQUEST_ID_CHARS} characters.")
        if ttl_seconds <= 0:
            raise InvalidRequest(f"The time to live of a hold must be positive, got {ttl_seconds}.")
        reservation_id = _new_id("res", 16)
        now = self.now_ms()
        expires = now + int(ttl_seconds * 1000)

        def hold(tx: Tx, account_id: str, amount: int) -> tuple[ReservationRecord, AccountRecord]:
            inserted = tx.one(
                "INSERT INTO reservations (id, account_id, request_id, amount, charged, state,"
                " created_at_ms, expires_at_ms) SELECT ?, id, ?, ?, 0, 'held', ?, ? FROM accounts"
                f" WHERE id = ? AND disabled_at_ms IS NULL RETURNING {_RESERVATION_COLUMNS}",
                (reservation_id, request_id, amount, now, expires, account_id),
            )
            if inserted is None:
                if tx.one("SELECT id FROM accounts WHERE id = ?", (account_id,)) is not None:
                    raise account_disabled()  # a disabled account gets no new hold
                raise _account_not_found(account_id)
            if amount == 0:
                row = tx.one(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE id = ?", (account_id,))
                assert row is not None
                return _reservation(inserted), _account(row)
            # The account row last: on PostgreSQL its lock is then held only for this
            # statement and the commit, not across the inserts (one account's requests
            # queue on that lock). A refusal rolls the ledger row back.
            _ledger_row(tx, account_id, "hold", -amount, reservation_id, now, "")
            row = tx.one(
                "UPDATE accounts SET balance = balance - ?, held = held + ? WHERE id = ? AND balance >= ?"
                f" RETURNING {_ACCOUNT_COLUMNS}",
                (amount, amount, account_id, amount),
            )
            if row is None:
                balance = tx.one("SELECT balance FROM accounts WHERE id = ?", (account_id,))
                available = int(balance[0]) if balance else 0
                raise InsufficientCredits(
                    "You do not have enough credits. "
                    f"Required: {format_credits(amount)}, Available: {format_credits(available)}"
                )
            return _reservation(inserted), _account(row)

        return hold

    async def commit(
        self,
        reservation_id: str,
        price: Callable[[AccountRecord], int] | int,
        media: tuple[MediaRecord, ...] = (),
    ) -> ReservationRecord:
        """Charges the price of the work done, capped at the hold, and returns the rest.

        ``price`` is the amount, or a function of the reservation's account that
        prices the work done (billing's pricing, as for the hold). ``media`` (the
        files the request produced) are recorded for the account in the same
        transaction, so a file is listed exactly when it was paid for.
        Committing again at the same price returns the committed reservation
        (recording nothing twice); any other second settlement, and a commit
        after the hold expired, fail with InvalidRequest.
        """
        now = self.now_ms()

        def tx_fn(tx: Tx) -> tuple[ReservationRecord, KilnError | None]:
            found = tx.one(
                f"SELECT {_prefixed('r', _RESERVATION_COLUMNS)}, {_prefixed('a', _ACCOUNT_COLUMNS)}"
                " FROM reservations r JOIN accounts a ON a.id = r.account_id WHERE r.id = ?",
                (reservation_id,),
            )
            if found is None:
                raise _reservation_not_found(reservation_id)
            held = _reservation(found[:7])
            full = price(_account(found[7:])) if callable(price) else price
            if full < 0:
                raise InvalidRequest(f"The amount to charge must not be negative, got {full}.")
            amount = min(full, held.amount)
            row = tx.one(
                "UPDATE reservations SET state = 'committed', charged = ?, settled_at_ms = ?"
                " WHERE id = ? AND state = 'held' AND amount >= ? AND expires_at_ms > ?"
                f" RETURNING {_RESERVATION_COLUMNS}",
                (amount, now, reservation_id, amount, now),
            )
            if row is not None:
                res = _reservation(row)
                entries = [("release", res.amount, "settled by commit")] if res.amount else []
                entries += [("charge", -amount, "")] if amount else []
                _ledger_rows(tx, res.account_id, res.id, now, entries)
                for record in media:
                    record_media(tx, res, record, now)
                if res.amount:  # the account row last (its lock is held for this and the commit only)
                    tx.execute(
                        "UPDATE accounts SET held = held - ?, balance = balance + ? WHERE id = ?",
                        (res.amount, res.amount - amount, res.account_id),
                    )
                return res, None
            res = _read_reservation(tx, reservation_id)
            if res.state == "committed":
                if res.charged == amount:
                    return res, None
                return res, InvalidRequest(
                    f"Reservation '{res.id}' was already committed at {format_credits(res.charged)} credits."
                )
            if res.state == "released":
                return res, InvalidRequest(f"Reservation '{res.id}' was released; it cannot be committed.")
            if res.state == "expired":
                return res, _expired_error(res)
            # Held but past its time to live, not yet swept: expire it now.
            expired = _expire(tx, [res], now)
            return (expired[0] if expired else _read_reservation(tx, res.id)), _expired_error(res)

        res, error = await self.db.run(tx_fn)
        if error is not None:
            raise error
        return res

    async def list_media(
        self,
        account_id: str,
        kind: str,
        *,
        sort_by: str = "created_at",
        ascending: bool = False,
        limit: int = 20,
        offset: int = 0,
    ) -> tuple[list[MediaRecord], int]:
        """One page of an account's files of one kind, and how many there are in all.

        Ordered by ``sort_by`` (a key of :data:`MEDIA_SORT_COLUMNS`), ties
        broken by time and id, so pages never overlap or skip.
        """
        column = MEDIA_SORT_COLUMNS.get(sort_by)
        if column is None:
            raise InvalidRequest(
                f"Invalid sort field '{sort_by}'. Use one of: {', '.join(MEDIA_SORT_COLUMNS)}."
            )
        if not 1 <= limit <= MAX_MEDIA_PAGE:
            raise InvalidRequest(f"'limit' must be between 1 and {MAX_MEDIA_PAGE}, not {limit}.")
        if offset < 0:
            raise InvalidRequest(f"'offset' must not be negative, not {offset}.")
        direction = "ASC" if ascending else "DESC"

        def tx_fn(tx: Tx) -> tuple[list[MediaRecord], int]:
            total = tx.one(
                "SELECT COUNT(*) FROM media_records WHERE account_id = ? AND kind = ?", (account_id, kind)
            )
            rows = tx.all(
                f"SELECT {_MEDIA_COLUMNS} FROM media_records WHERE account_id = ? AND kind = ?"
                f" ORDER BY {column} {direction}, created_at_ms {direction}, media_id {direction}"
                " LIMIT ? OFFSET ?",
                (account_id, kind, limit, offset),
            )
            records = [
                MediaRecord(
                    media_id=str(r[0]),
                    kind=str(r[1]),
                    mime_type=str(r[2]),
                    model=str(r[3]),
                    prompt=str(r[4]),
                    width=int(r[5]),
                    height=int(r[6]),
                    frames=int(r[7]),
                    fps=float(r[8]),
                    duration_seconds=float(r[9]),
                    size_bytes=int(r[10]),
                    created_at_ms=int(r[11]),
                )
                for r in rows
            ]
            return records, int(total[0]) if total else 0

        return await self.db.run(tx_fn, write=False)

    async def sweep_media(
        self,
        created_before_ms: int,
        keep_kinds: Sequence[str] = (),
        *,
        limit: int = 500,
        candidates: Sequence[str] = (),
    ) -> tuple[list[str], list[str]]:
        """Media retention: deletes up to ``limit`` records made before ``created_before_ms``
        whose kind is not in ``keep_kinds`` (the library, kept while the account exists), and
        says which ``candidates`` (media ids of stored files) have no record and are no stored
        answer of an idempotency key nor the input of an unfinished task. Returns (expired ids, unrecorded candidates); the caller
        deletes those files, after their records, so no record ever points at a missing file.
        """
        if not 1 <= limit <= MAX_MEDIA_SWEEP:
            raise InvalidRequest(f"'limit' must be between 1 and {MAX_MEDIA_SWEEP}, not {limit}.")
        if len(candidates) > MAX_MEDIA_SWEEP:
            raise InvalidRequest(f"At most {MAX_MEDIA_SWEEP} candidate media ids per call.")
        kinds = list(dict.fromkeys(keep_kinds))
        kept = f" AND kind NOT IN ({', '.join('?' * len(kinds))})" if kinds else ""
        wanted = list(dict.fromkeys(candidates))

        def tx_fn(tx: Tx) -> tuple[list[str], list[str]]:
            rows = tx.all(
                f"SELECT media_id FROM media_records WHERE created_at_ms < ?{kept}"
                " ORDER BY created_at_ms, media_id LIMIT ?",
                (created_before_ms, *kinds, limit),
            )
            expired = [str(row[0]) for row in rows]
            if expired:
                marks = ", ".join("?" * len(expired))
                tx.execute(f"DELETE FROM media_records WHERE media_id IN ({marks})", expired)
            if not wanted:
                return expired, []
            marks = ", ".join("?" * len(wanted))
            known = {
                str(row[0])
                for row in tx.all(
                    f"SELECT media_id FROM media_records WHERE media_id IN ({marks}) UNION"
                    f" SELECT response_media_id FROM idempotency_keys WHERE response_media_id IN ({marks})"
                    f" UNION SELECT input_media_id FROM tasks WHERE input_media_id IN ({marks})"
                    " AND status IN ('pending', 'processing')",
                    (*wanted, *wanted, *wanted),
                )
            }
            gone = set(expired)
            return expired, [
                media_id for media_id in wanted if media_id not in known and media_id not in gone
            ]

        return await self.db.run(tx_fn)

    async def release(self, reservation_id: str) -> ReservationRecord:
        """Returns a hold to the balance. Releasing again, or after expiry, returns it unchanged."""
        now = self.now_ms()

        def tx_fn(tx: Tx) -> ReservationRecord:
            released = release_hold(tx, reservation_id, now)
            if released is not None:
                return released
            res = _read_reservation(tx, reservation_id)
            if res.state == "committed":
                raise InvalidRequest(f"Reservation '{res.id}' was already committed; it cannot be released.")
            return res

        return await self.db.run(tx_fn)

    async def get_reservation(self, reservation_id: str) -> ReservationRecord:
        return await self.db.run(lambda tx: _read_reservation(tx, reservation_id), write=False)

    async def expire_holds(self) -> int:
        """Releases every hold whose time to live ran out (state "expired"); returns how many."""
        now = self.now_ms()

        def tx_fn(tx: Tx) -> int:
            rows = tx.all(
                f"SELECT {_RESERVATION_COLUMNS} FROM reservations WHERE state = 'held' AND expires_at_ms <= ?"
                " ORDER BY id",
                (now,),
            )
            tx.execute("DELETE FROM idempotency_keys WHERE expires_at_ms <= ?", (now,))
            return len(_expire(tx, [_reservation(row) for row in rows], now))

        return await self.db.run(tx_fn)

    async def ledger_entries(self, account_id: str, limit: int = 100) -> list[LedgerEntry]:
        """The newest ``limit`` ledger rows of an account, newest first."""
        rows = await self.db.run(
            lambda tx: tx.all(
                "SELECT id, account_id, kind, amount, reservation_id, created_at_ms, note FROM ledger_entries"
                " WHERE account_id = ? ORDER BY id DESC LIMIT ?",
                (account_id, max(0, limit)),
            ),
            write=False,
        )
        return [LedgerEntry(int(r[0]), r[1], r[2], int(r[3]), r[4], int(r[5]), r[6]) for r in rows]

    async def ledger_sum(self, account_id: str) -> int:
        """The sum of an account's ledger rows (equals its balance)."""
        row = await self.db.run(
            lambda tx: tx.one(
                "SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE account_id = ?", (account_id,)
            ),
            write=False,
        )
        return int(row[0]) if row else 0

    # --- maintenance ---

    async def set_maintenance(self, on: bool) -> None:
        """Flips maintenance mode for every billing process sharing this database."""
        now = self.now_ms()
        await self.db.run(
            lambda tx: tx.execute(
                "INSERT INTO service_flags (name, value, updated_at_ms) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at_ms = excluded.updated_at_ms",
                (MAINTENANCE_FLAG, "on" if on else "off", now),
            )
        )
        self._maintenance = (on, self.clock())

    async def maintenance(self) -> bool:
        """Whether maintenance mode is on (cached for ``maintenance_cache_seconds``)."""
        now = self.clock()
        cached = self._maintenance
        if cached is not None and 0 <= now - cached[1] < self.maintenance_cache_seconds:
            return cached[0]
        row = await self.db.run(
            lambda tx: tx.one("SELECT value FROM service_flags WHERE name = ?", (MAINTENANCE_FLAG,)),
            write=False,
        )
        on = row is not None and row[0] == "on"
        self._maintenance = (on, now)
        return on


#: Finds the caller's account inside a transaction, or raises AuthenticationFailed.
AccountFinder = Callable[[Tx], AccountRecord]


def api_key_finder(key: str) -> AccountFinder:
    """The finder of an API key's account (unknown or revoked keys, and disabled accounts, fail)."""
    digest = hash_api_key(key) if key else ""

    def find(tx: Tx) -> AccountRecord:
        if not digest:
            raise AuthenticationFailed()
        row = tx.one(
            f"SELECT k.key_hash, k.revoked_at_ms, {_prefixed('a', _ACCOUNT_COLUMNS)}"
            " FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.key_hash = ?",
            (digest,),
        )
        if row is None or row[1] is not None or not hmac.compare_digest(row[0], digest):
            raise AuthenticationFailed()
        account = _account(row[2:])
        if account.disabled:
            raise account_disabled()
        return account

    return find


def _account_by_subject(tx: Tx, sub: str) -> AccountRecord | None:
    """The account whose external id is ``sub``, else the account with id ``sub`` that has no
    external id (one bound to an external subject is never found by its internal id)."""
    row = tx.one(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE external_id = ?", (sub,))
    row = row or tx.one(
        f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE id = ? AND external_id IS NULL", (sub,)
    )
    return _account(row) if row is not None else None


def subject_finder(sub: str, unknown: Callable[[], AuthenticationFailed]) -> AccountFinder:
    """The finder of a (verified) JWT subject's account; ``unknown()`` is raised when there is none,
    :func:`account_disabled` when it is disabled."""

    def find(tx: Tx) -> AccountRecord:
        account = _account_by_subject(tx, sub) if sub else None
        if account is None:
            raise unknown()
        if account.disabled:
            raise account_disabled()
        return account

    return find


def _ledger_row(
    tx: Tx, account_id: str, kind: str, amount: int, reservation_id: str | None, now: int, note: str
) -> None:
    _ledger_rows(tx, account_id, reservation_id, now, [(kind, amount, note)])


def _ledger_rows(
    tx: Tx, account_id: str, reservation_id: str | None, now: int, entries: list[tuple[str, int, str]]
) -> None:
    """Writes (kind, amount, note) rows of one account in one statement."""
    if not entries:
        return
    values = ", ".join(["(?, ?, ?, ?, ?, ?)"] * len(entries))
    params = [
        p for kind, amount, note in entries for p in (account_id, kind, amount, reservation_id, now, note)
    ]
    tx.execute(
        "INSERT INTO ledger_entries (account_id, kind, amount, reservation_id, created_at_ms, note)"
        f" VALUES {values}",
        params,
    )


def record_media(tx: Tx, reservation: ReservationRecord, record: MediaRecord, now: int) -> None:
    """Records a file a committed request produced, in its account's library (in ``tx``)."""
    tx.execute(
        f"INSERT INTO media_records (account_id, reservation_id, {_MEDIA_COLUMNS})"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            reservation.account_id,
            reservation.id,
            record.media_id,
            record.kind,
            record.mime_type,
            record.model,
            record.prompt,
            record.width,
            record.height,
            record.frames,
            record.fps,
            record.duration_seconds,
            record.size_bytes,
            now,
        ),
    )


def account_in(tx: Tx, account_id: str) -> AccountRecord:
    """One account, read in ``tx`` (NotFound when there is none)."""
    row = tx.one(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE id = ?", (account_id,))
    if row is None:
        raise _account_not_found(account_id)
    return _account(row)


def release_hold(tx: Tx, reservation_id: str, now: int) -> ReservationRecord | None:
    """Returns a held reservation's credits to its account (in ``tx``); None when it is not held."""
    row = tx.one(
        "UPDATE reservations SET state = 'released', settled_at_ms = ? WHERE id = ? AND state = 'held'"
        f" RETURNING {_RESERVATION_COLUMNS}",
        (now, reservation_id),
    )
    if row is None:
        return None
    res = _reservation(row)
    if res.amount:
        tx.execute(
            "UPDATE accounts SET held = held - ?, balance = balance + ? WHERE id = ?",
            (res.amount, res.amount, res.account_id),
        )
        _ledger_row(tx, res.account_id, "release", res.amount, res.id, now, "")
    _free_keys(tx, [res.id])
    return res


def read_reservation(tx: Tx, reservation_id: str) -> ReservationRecord:
    """One reservation (NotFound when there is none)."""
    return _read_reservation(tx, reservation_id)


def _read_reservation(tx: Tx, reservation_id: str) -> ReservationRecord:
    row = tx.one(f"SELECT {_RESERVATION_COLUMNS} FROM reservations WHERE id = ?", (reservation_id,))
    if row is None:
        raise _reservation_not_found(reservation_id)
    return _reservation(row)


def _expired_error(res: ReservationRecord) -> InvalidRequest:
    return InvalidRequest(
        f"Reservation '{res.id}' expired before it was committed; its credits were returned to the account."
    )


def _expire(tx: Tx, holds: list[ReservationRecord], now: int) -> list[ReservationRecord]:
    """Marks held reservations expired and returns their credits (rows already known to be held)."""
    expired: list[ReservationRecord] = []
    per_account: dict[str, int] = defaultdict(int)
    for res in holds:
        row = tx.one(
            "UPDATE reservations SET state = 'expired', settled_at_ms = ? WHERE id = ? AND state = 'held'"
            f" RETURNING {_RESERVATION_COLUMNS}",
            (now, res.id),
        )
        if row is None:  # settled meanwhile by another node
            continue
        done = _reservation(row)
        expired.append(done)
        if done.amount:
            per_account[done.account_id] += done.amount
            _ledger_row(tx, done.account_id, "expire", done.amount, done.id, now, "hold expired")
    _free_keys(tx, [res.id for res in expired])
    for account_id in sorted(per_account):
        total = per_account[account_id]
        tx.execute(
            "UPDATE accounts SET held = held - ?, balance = balance + ? WHERE id = ?",
            (total, total, account_id),
        )
    return expired


def _prefixed(alias: str, columns: str) -> str:
    """``"id, name"`` -> ``"a.id, a.name"``: a column list for a join."""
    return ", ".join(f"{alias}.{column}" for column in columns.split(", "))


def _free_keys(tx: Tx, reservation_ids: list[str]) -> None:
    """Frees the idempotency keys of holds that ended unpaid: the request may be retried."""
    for reservation_id in reservation_ids:
        tx.execute("DELETE FROM idempotency_keys WHERE reservation_id = ?", (reservation_id,))


def _quoted_key(key: str) -> str:
    """A key quoted back in an error message (64 characters at most)."""
    return quoted(key, 64)


def _check_idempotency_key(key: str) -> None:
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS or not all(" " <= c <= "~" for c in key):
        raise InvalidRequest(
            f"The Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII characters."
        )


def _in_progress(key: str) -> Conflict:
    return Conflict(
        f"A request with Idempotency-Key '{_quoted_key(key)}' is in progress; retry once it has finished."
    )


def _earlier_answer(tx: Tx, account_id: str, claim: IdempotencyClaim, now: int) -> StoredAnswer | None:
    """The stored answer of the key's finished request; None when the key is free (or expired).

    Raises InvalidRequest for another request under the key, and Conflict while
    its request runs or when its answer was streamed (never replayed). A key
    whose hold ran out of time is free at once (the hold is expired here if the
    sweep has not come yet).
    """
    row = tx.one(
        "SELECT k.fingerprint, k.streamed, k.response_status, k.response_headers, k.response_body,"
        f" k.response_media_id, k.expires_at_ms, {_prefixed('r', _RESERVATION_COLUMNS)} FROM idempotency_keys k"
        " JOIN reservations r ON r.id = k.reservation_id WHERE k.account_id = ? AND k.idem_key = ?",
        (account_id, claim.key),
    )
    if row is None:
        return None
    fingerprint, streamed, status, headers, body, media_id, expires_at_ms = row[:7]
    hold = _reservation(row[7:])
    if hold.state == "held" and hold.expires_at_ms <= now:
        _expire(tx, [hold], now)  # frees the key too
        return None
    if int(expires_at_ms) <= now:
        tx.execute(
            "DELETE FROM idempotency_keys WHERE account_id = ? AND idem_key = ?", (account_id, claim.key)
        )
        return None
    if not hmac.compare_digest(str(fingerprint), claim.fingerprint):
        raise InvalidRequest(
            f"Idempotency-Key '{_quoted_key(claim.key)}' was already used with a different request "
            "(method, route, query or body); use a new key for a new request."
        )
    if hold.state == "held":
        raise _in_progress(claim.key)
    if streamed:
        raise Conflict(
            f"The request with Idempotency-Key '{_quoted_key(claim.key)}' was answered as a stream; "
            "streamed answers are not replayed."
        )
    if status is not None:
        pairs = tuple((str(name), str(value)) for name, value in json.loads(headers or "[]"))
        return StoredAnswer(int(status), pairs, bytes(body or b""), str(media_id or ""))
    raise Conflict(
        f"The request with Idempotency-Key '{_quoted_key(claim.key)}' was completed and charged, but its "
        "answer was not stored; use a new key to run it again."
    )
