"""Task webhooks: each account's signing secret and the durable outbox the edge delivers from.

When a task completes, fails or is cancelled, the code that finishes it calls
:func:`enqueue_webhook` **in the same transaction**: the message exists if and
only if the task's new state does, and nothing is sent from the inference
worker. The edge's delivery worker (``edge.webhooks``) then, through billing's
``WebhookService``:

1. **claims** due messages (:func:`claim_webhooks`): each gets a lease (a token
   and an expiry) so that several edges never send the same message at once; a
   node that dies mid-delivery loses its lease and another node takes the
   message over when it expires. On PostgreSQL the candidates are picked with
   ``FOR UPDATE SKIP LOCKED`` (concurrent claimers skip each other's rows
   instead of waiting); on SQLite the write lock (``BEGIN IMMEDIATE``) makes
   claims one at a time.
2. POSTs the payload signed with the account's secret(s) and **records** the
   outcome (:func:`record_webhook_attempt`), which logs the attempt in
   ``webhook_attempts`` and moves the message on:

   ==============================  ===============================================
   answer                          message
   ==============================  ===============================================
   2xx                             ``delivered``
   410 Gone                        ``disabled``, and the endpoint (account, URL)
                                   with it: its pending messages and every later
                                   one are kept in state ``disabled``, never sent
   anything else, or no answer     ``pending`` again after the schedule's next
                                   wait (+-20 % jitter; a longer ``Retry-After``
                                   wins, up to the schedule's longest wait)
   ... after the schedule's last   ``dead``: the dead letter, kept and shown on
   attempt                         the task
   ==============================  ===============================================

Delivery is at least once: every attempt of a message carries the same id (the
``webhook-id`` header), and an attempt whose outcome was lost is repeated.

Secrets are ``whsec_`` + base64 of 32 random bytes (the Standard Webhooks
format), made on first use. :func:`rotate_webhook_secret` makes a new one and
keeps the old one signing for a grace period: meanwhile each message carries
both signatures (``webhook-signature: v1,<new> v1,<old>``), so a receiver can
switch secrets whenever it likes within the period. Secrets are stored as they
are (an HMAC key must be known to sign), so keep the database as you keep the
mesh secret.

Everything is a plain function of a :class:`~services.billing.store.Tx`;
:class:`Webhooks` runs them on a :class:`~services.billing.store.Database`.
Nothing here knows about gRPC or HTTP.
"""

from __future__ import annotations

import base64
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from services.billing.store import Database, Row, Tx
from services.common.errors import InvalidRequest, NotFound

WebhookState = Literal["pending", "delivered", "dead", "disabled"]

MESSAGE_ID_PREFIX = "msg_"
SECRET_PREFIX = "whsec_"
#: Random bytes of a signing secret (Standard Webhooks asks for 24 to 64).
SECRET_BYTES = 32
#: Longest error text kept per attempt and on the message.
MAX_ERROR_CHARS = 500
MAX_URL_CHARS = 2048
MAX_EVENT_TYPE_CHARS = 100
MAX_TASK_ID_CHARS = 200
#: Largest payload accepted into the outbox.
MAX_PAYLOAD_BYTES = 1024 * 1024
#: Each wait of the schedule is multiplied by a random factor in 1 +- this.
JITTER = 0.2
#: Most messages one claim hands out.
MAX_CLAIM = 100
#: Longest lease a claimer may ask for.
MAX_LEASE_MS = 15 * 60 * 1000
#: Longest grace period of a rotated secret.
MAX_GRACE_MS = 30 * 24 * 3600 * 1000
DEFAULT_GRACE_MS = 24 * 3600 * 1000

_MESSAGE_COLUMNS = (
    "id, account_id, task_id, url, event_type, state, attempts, next_attempt_at_ms, "
    "last_status, last_error, created_at_ms, delivered_at_ms"
)


@dataclass(frozen=True)
class WebhookMessage:
    """One message of the outbox (without its payload)."""

    id: str
    account_id: str
    task_id: str
    url: str
    event_type: str
    state: WebhookState
    #: Attempts made so far.
    attempts: int
    next_attempt_at_ms: int
    #: The last attempt's HTTP status (0: no answer); None before the first attempt.
    last_status: int | None
    last_error: str | None
    created_at_ms: int
    delivered_at_ms: int | None

    def summary(self) -> dict[str, Any]:
        """What a task shows of its webhook: ``{state, attempts, last_status, last_error}``."""
        return {
            "state": self.state,
            "attempts": self.attempts,
            "last_status": self.last_status,
            "last_error": self.last_error,
        }


@dataclass(frozen=True)
class WebhookAttempt:
    """One delivery attempt of a message."""

    message_id: str
    attempt: int
    at_ms: int
    #: The HTTP status, 0 when there was no answer.
    status: int
    error: str
    duration_ms: int


@dataclass(frozen=True)
class WebhookSecrets:
    """An account's signing secret, and the previous one while its grace period runs."""

    account_id: str
    secret: str
    previous_secret: str | None
    previous_expires_at_ms: int | None

    def signing_secrets(self, now_ms: int) -> tuple[str, ...]:
        """The secrets a message is signed with at ``now_ms``: the current one first."""
        if (
            self.previous_secret is not None
            and self.previous_expires_at_ms is not None
            and self.previous_expires_at_ms > now_ms
        ):
            return (self.secret, self.previous_secret)
        return (self.secret,)


@dataclass(frozen=True)
class Delivery:
    """A claimed message: what the deliverer needs to send one attempt."""

    message: WebhookMessage
    payload: bytes
    #: The number of the attempt about to be made (1 for the first).
    attempt: int
    #: Proves the claim when the attempt is recorded.
    lease_token: str
    lease_expires_at_ms: int
    #: Sign with each (the current secret first).
    secrets: tuple[str, ...]


@dataclass(frozen=True)
class AttemptOutcome:
    """What recording an attempt did to its message."""

    message_id: str
    state: WebhookState
    attempts: int
    #: When the next attempt is due; None unless the state is ``pending``.
    next_attempt_at_ms: int | None
    #: False when the caller's lease was no longer valid (the attempt is logged, the
    #: message left as the lease's current holder or an earlier outcome put it).
    applied: bool


def new_webhook_secret() -> str:
    """A fresh ``whsec_...`` secret."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def new_message_id() -> str:
    return MESSAGE_ID_PREFIX + secrets.token_hex(16)


def next_delay_seconds(
    schedule: Sequence[float],
    attempts_done: int,
    *,
    retry_after_seconds: float | None = None,
    rng: Callable[[], float] = random.random,
) -> float | None:
    """The wait before the next attempt once ``attempts_done`` failed; None when none is left.

    ``schedule[n]`` is the wait before attempt ``n + 1`` (``schedule[0]``, normally 0, before
    the first), so a schedule allows ``len(schedule)`` attempts. The wait gets +-:data:`JITTER`;
    a ``Retry-After`` longer than it is honoured, capped at the schedule's longest wait.
    """
    if attempts_done >= len(schedule):
        return None
    delay = float(schedule[attempts_done]) * (1.0 + JITTER * (2.0 * rng() - 1.0))
    if retry_after_seconds is not None and retry_after_seconds > 0:
        delay = max(delay, min(float(retry_after_seconds), float(max(schedule))))
    return max(0.0, delay)


# --- rows ---


def _message(row: Row) -> WebhookMessage:
    return WebhookMessage(
        id=str(row[0]),
        account_id=str(row[1]),
        task_id=str(row[2]),
        url=str(row[3]),
        event_type=str(row[4]),
        state=row[5],
        attempts=int(row[6]),
        next_attempt_at_ms=int(row[7]),
        last_status=None if row[8] is None else int(row[8]),
        last_error=None if row[9] is None else str(row[9]),
        created_at_ms=int(row[10]),
        delivered_at_ms=None if row[11] is None else int(row[11]),
    )


def _secrets(row: Row) -> WebhookSecrets:
    return WebhookSecrets(
        account_id=str(row[0]),
        secret=str(row[1]),
        previous_secret=None if row[2] is None else str(row[2]),
        previous_expires_at_ms=None if row[3] is None else int(row[3]),
    )


def _truncate(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "\u2026"


def _require_account(tx: Tx, account_id: str) -> None:
    if tx.one("SELECT 1 FROM accounts WHERE id = ?", (account_id,)) is None:
        raise NotFound(f"No account with id '{account_id[:100]}'.")


# --- the outbox ---


def enqueue_webhook(
    tx: Tx, *, account_id: str, task_id: str, url: str, event_type: str, payload: bytes, now_ms: int
) -> str:
    """Puts a message in the outbox, due at once; returns its id (``msg_...``).

    Call it inside the transaction that finishes the task. A URL the account's receiver
    disabled with a 410 gets the message in state ``disabled`` (kept, never sent).
    """
    if not url or len(url) > MAX_URL_CHARS or not url.startswith(("https://", "http://")):
        raise InvalidRequest(f"A webhook URL is an http(s) URL of at most {MAX_URL_CHARS} characters.")
    if not event_type or len(event_type) > MAX_EVENT_TYPE_CHARS:
        raise InvalidRequest(f"A webhook event type is 1 to {MAX_EVENT_TYPE_CHARS} characters.")
    if not task_id or len(task_id) > MAX_TASK_ID_CHARS:
        raise InvalidRequest(f"A task id is 1 to {MAX_TASK_ID_CHARS} characters.")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise InvalidRequest(f"A webhook payload is at most {MAX_PAYLOAD_BYTES} bytes.")
    _require_account(tx, account_id)
    disabled = tx.one(
        "SELECT disabled_at_ms, reason FROM webhook_disabled_endpoints WHERE account_id = ? AND url = ?",
        (account_id, url),
    )
    message_id = new_message_id()
    tx.execute(
        "INSERT INTO webhook_messages (id, account_id, task_id, url, event_type, payload, state, "
        "attempts, next_attempt_at_ms, last_error, created_at_ms, updated_at_ms) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?)",
        (
            message_id,
            account_id,
            task_id,
            url,
            event_type,
            bytes(payload),
            "pending" if disabled is None else "disabled",
            now_ms,
            None if disabled is None else _truncate(f"endpoint disabled: {disabled[1]}"),
            now_ms,
            now_ms,
        ),
    )
    return message_id


def claim_webhooks(tx: Tx, *, now_ms: int, limit: int, lease_ms: int) -> list[Delivery]:
    """Leases up to ``limit`` due messages (oldest due first) for ``lease_ms`` to the caller.

    A message is due when it is ``pending``, its next attempt's time has come and no
    unexpired lease holds it. Two claimers never get the same message while a lease runs.
    """
    limit = max(1, min(limit, MAX_CLAIM))
    lease_ms = max(1000, min(lease_ms, MAX_LEASE_MS))
    lock = " FOR UPDATE SKIP LOCKED" if tx.dialect == "postgresql" else ""
    rows = tx.all(
        f"SELECT {_MESSAGE_COLUMNS}, payload FROM webhook_messages "
        "WHERE state = 'pending' AND next_attempt_at_ms <= ? "
        "AND (lease_expires_at_ms IS NULL OR lease_expires_at_ms <= ?) "
        f"ORDER BY next_attempt_at_ms, id LIMIT ?{lock}",
        (now_ms, now_ms, limit),
    )
    token = secrets.token_hex(16)
    expires = now_ms + lease_ms
    claimed: list[Delivery] = []
    account_secrets: dict[str, tuple[str, ...]] = {}
    for row in rows:
        message = _message(row)
        changed = tx.execute(
            "UPDATE webhook_messages SET lease_token = ?, lease_expires_at_ms = ?, updated_at_ms = ? "
            "WHERE id = ? AND state = 'pending' "
            "AND (lease_expires_at_ms IS NULL OR lease_expires_at_ms <= ?)",
            (token, expires, now_ms, message.id, now_ms),
        )
        if changed != 1:  # taken meanwhile (only possible without row locks)
            continue
        if message.account_id not in account_secrets:
            account_secrets[message.account_id] = webhook_secrets(
                tx, message.account_id, now_ms=now_ms
            ).signing_secrets(now_ms)
        claimed.append(
            Delivery(
                message=message,
                payload=bytes(row[12]),
                attempt=message.attempts + 1,
                lease_token=token,
                lease_expires_at_ms=expires,
                secrets=account_secrets[message.account_id],
            )
        )
    return claimed


def record_webhook_attempt(
    tx: Tx,
    *,
    message_id: str,
    lease_token: str,
    status: int,
    error: str,
    duration_ms: int,
    now_ms: int,
    schedule: Sequence[float],
    retry_after_seconds: float | None = None,
    rng: Callable[[], float] = random.random,
) -> AttemptOutcome:
    """Logs one attempt and moves its message on (see the module's table).

    ``status`` is the HTTP status, 0 when there was no answer (``error`` says why). The
    attempt is always logged; the message changes only while ``lease_token`` holds it.
    """
    if not 0 <= status <= 999:
        raise InvalidRequest("An HTTP status is 0 (no answer) or 100 to 999.")
    row = tx.one(
        "UPDATE webhook_messages SET attempts = attempts + 1, updated_at_ms = ? WHERE id = ? "
        "RETURNING attempts, state, lease_token, lease_expires_at_ms, account_id, url",
        (now_ms, message_id),
    )
    if row is None:
        raise NotFound(f"No webhook message with id '{message_id[:100]}'.")
    attempts, state, holder = int(row[0]), row[1], row[2]
    account_id, url = str(row[4]), str(row[5])
    ok = 200 <= status <= 299
    error = "" if ok else _truncate(error or f"HTTP {status}")
    tx.execute(
        "INSERT INTO webhook_attempts (message_id, attempt, at_ms, status, error, duration_ms) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (message_id, attempts, now_ms, status, error, max(0, duration_ms)),
    )
    if state != "pending" or holder is None or holder != lease_token:
        return AttemptOutcome(message_id, state, attempts, None, applied=False)
    last_error = error or None
    if ok:
        tx.execute(
            "UPDATE webhook_messages SET state = 'delivered', delivered_at_ms = ?, last_status = ?, "
            "last_error = NULL, lease_token = NULL, lease_expires_at_ms = NULL WHERE id = ?",
            (now_ms, status, message_id),
        )
        return AttemptOutcome(message_id, "delivered", attempts, None, applied=True)
    if status == 410:
        reason = f"the receiver answered 410 Gone to {message_id}"
        disable_webhook_endpoint(tx, account_id=account_id, url=url, reason=reason, now_ms=now_ms)
        tx.execute(
            "UPDATE webhook_messages SET last_status = ?, last_error = ?, lease_token = NULL, "
            "lease_expires_at_ms = NULL WHERE id = ?",
            (status, last_error, message_id),
        )
        return AttemptOutcome(message_id, "disabled", attempts, None, applied=True)
    delay = next_delay_seconds(schedule, attempts, retry_after_seconds=retry_after_seconds, rng=rng)
    if delay is None:
        tx.execute(
            "UPDATE webhook_messages SET state = 'dead', last_status = ?, last_error = ?, "
            "lease_token = NULL, lease_expires_at_ms = NULL WHERE id = ?",
            (status, last_error, message_id),
        )
        return AttemptOutcome(message_id, "dead", attempts, None, applied=True)
    due = now_ms + round(delay * 1000)
    tx.execute(
        "UPDATE webhook_messages SET next_attempt_at_ms = ?, last_status = ?, last_error = ?, "
        "lease_token = NULL, lease_expires_at_ms = NULL WHERE id = ?",
        (due, status, last_error, message_id),
    )
    return AttemptOutcome(message_id, "pending", attempts, due, applied=True)


def disable_webhook_endpoint(tx: Tx, *, account_id: str, url: str, reason: str, now_ms: int) -> int:
    """Stops deliveries to ``url`` for the account; returns how many pending messages it disabled."""
    tx.execute(
        "INSERT INTO webhook_disabled_endpoints (account_id, url, disabled_at_ms, reason) "
        "VALUES (?, ?, ?, ?) ON CONFLICT (account_id, url) DO NOTHING",
        (account_id, url, now_ms, _truncate(reason)),
    )
    return tx.execute(
        "UPDATE webhook_messages SET state = 'disabled', updated_at_ms = ?, "
        "last_error = COALESCE(last_error, ?) WHERE account_id = ? AND url = ? AND state = 'pending'",
        (now_ms, _truncate(f"endpoint disabled: {reason}"), account_id, url),
    )


def enable_webhook_endpoint(tx: Tx, *, account_id: str, url: str) -> bool:
    """Lets messages to a disabled endpoint be sent again (later ones; disabled ones stay)."""
    return (
        tx.execute(
            "DELETE FROM webhook_disabled_endpoints WHERE account_id = ? AND url = ?", (account_id, url)
        )
        > 0
    )


def is_webhook_endpoint_disabled(tx: Tx, *, account_id: str, url: str) -> bool:
    return (
        tx.one("SELECT 1 FROM webhook_disabled_endpoints WHERE account_id = ? AND url = ?", (account_id, url))
        is not None
    )


def task_webhooks(tx: Tx, task_id: str, *, account_id: str | None = None) -> list[WebhookMessage]:
    """A task's messages, oldest first (only the account's when ``account_id`` is given)."""
    if account_id is None:
        rows = tx.all(
            f"SELECT {_MESSAGE_COLUMNS} FROM webhook_messages WHERE task_id = ? ORDER BY created_at_ms, id",
            (task_id,),
        )
    else:
        rows = tx.all(
            f"SELECT {_MESSAGE_COLUMNS} FROM webhook_messages WHERE task_id = ? AND account_id = ? "
            "ORDER BY created_at_ms, id",
            (task_id, account_id),
        )
    return [_message(row) for row in rows]


def task_webhook_summary(tx: Tx, task_id: str, *, account_id: str | None = None) -> dict[str, Any] | None:
    """``{state, attempts, last_status, last_error}`` of the task's newest message, or None."""
    messages = task_webhooks(tx, task_id, account_id=account_id)
    return messages[-1].summary() if messages else None


def get_webhook_message(tx: Tx, message_id: str) -> WebhookMessage:
    row = tx.one(f"SELECT {_MESSAGE_COLUMNS} FROM webhook_messages WHERE id = ?", (message_id,))
    if row is None:
        raise NotFound(f"No webhook message with id '{message_id[:100]}'.")
    return _message(row)


def webhook_attempts(tx: Tx, message_id: str) -> list[WebhookAttempt]:
    """A message's attempts, first first."""
    rows = tx.all(
        "SELECT message_id, attempt, at_ms, status, error, duration_ms FROM webhook_attempts "
        "WHERE message_id = ? ORDER BY attempt",
        (message_id,),
    )
    return [WebhookAttempt(str(r[0]), int(r[1]), int(r[2]), int(r[3]), str(r[4]), int(r[5])) for r in rows]


# --- secrets ---


def webhook_secrets(tx: Tx, account_id: str, *, now_ms: int) -> WebhookSecrets:
    """The account's secrets, made on first use (so this needs a write transaction)."""
    columns = "account_id, secret, previous_secret, previous_expires_at_ms"
    row = tx.one(f"SELECT {columns} FROM webhook_secrets WHERE account_id = ?", (account_id,))
    if row is None:
        _require_account(tx, account_id)
        tx.execute(
            "INSERT INTO webhook_secrets (account_id, secret, created_at_ms) VALUES (?, ?, ?) "
            "ON CONFLICT (account_id) DO NOTHING",
            (account_id, new_webhook_secret(), now_ms),
        )
        row = tx.one(f"SELECT {columns} FROM webhook_secrets WHERE account_id = ?", (account_id,))
        assert row is not None
    return _secrets(row)


def rotate_webhook_secret(tx: Tx, account_id: str, *, grace_ms: int, now_ms: int) -> WebhookSecrets:
    """Makes a new secret; the current one keeps signing for ``grace_ms`` (0: it stops at once)."""
    if not 0 <= grace_ms <= MAX_GRACE_MS:
        raise InvalidRequest(f"The grace period is 0 to {MAX_GRACE_MS // 3_600_000} hours.")
    current = webhook_secrets(tx, account_id, now_ms=now_ms)
    previous = current.secret if grace_ms > 0 else None
    expires = now_ms + grace_ms if grace_ms > 0 else None
    tx.execute(
        "UPDATE webhook_secrets SET secret = ?, previous_secret = ?, previous_expires_at_ms = ?, "
        "rotated_at_ms = ? WHERE account_id = ?",
        (new_webhook_secret(), previous, expires, now_ms, account_id),
    )
    return webhook_secrets(tx, account_id, now_ms=now_ms)


# --- on a database ---


class Webhooks:
    """The functions above on a :class:`Database`, with a clock and the retry schedule."""

    def __init__(
        self,
        db: Database,
        *,
        schedule: Sequence[float],
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not schedule:
            raise ValueError("the retry schedule needs at least one step")
        self.db = db
        self.schedule = tuple(schedule)
        self._clock = clock
        self._rng = rng

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def enqueue(
        self, *, account_id: str, task_id: str, url: str, event_type: str, payload: bytes
    ) -> str:
        now = self.now_ms()
        return await self.db.run(
            lambda tx: enqueue_webhook(
                tx,
                account_id=account_id,
                task_id=task_id,
                url=url,
                event_type=event_type,
                payload=payload,
                now_ms=now,
            )
        )

    async def claim(self, *, limit: int, lease_ms: int) -> list[Delivery]:
        now = self.now_ms()
        return await self.db.run(lambda tx: claim_webhooks(tx, now_ms=now, limit=limit, lease_ms=lease_ms))

    async def record(
        self,
        *,
        message_id: str,
        lease_token: str,
        status: int,
        error: str = "",
        duration_ms: int = 0,
        retry_after_seconds: float | None = None,
    ) -> AttemptOutcome:
        now = self.now_ms()
        return await self.db.run(
            lambda tx: record_webhook_attempt(
                tx,
                message_id=message_id,
                lease_token=lease_token,
                status=status,
                error=error,
                duration_ms=duration_ms,
                now_ms=now,
                schedule=self.schedule,
                retry_after_seconds=retry_after_seconds,
                rng=self._rng,
            )
        )

    async def task_deliveries(
        self, task_id: str, *, account_id: str | None = None
    ) -> list[tuple[WebhookMessage, list[WebhookAttempt]]]:
        """A task's messages with their attempts, oldest first."""

        def read(tx: Tx) -> list[tuple[WebhookMessage, list[WebhookAttempt]]]:
            messages = task_webhooks(tx, task_id, account_id=account_id)
            return [(m, webhook_attempts(tx, m.id)) for m in messages]

        return await self.db.run(read, write=False)

    async def message(self, message_id: str) -> WebhookMessage:
        return await self.db.run(lambda tx: get_webhook_message(tx, message_id), write=False)

    async def attempts(self, message_id: str) -> list[WebhookAttempt]:
        return await self.db.run(lambda tx: webhook_attempts(tx, message_id), write=False)

    async def secrets(self, account_id: str) -> WebhookSecrets:
        now = self.now_ms()
        return await self.db.run(lambda tx: webhook_secrets(tx, account_id, now_ms=now))

    async def rotate_secret(self, account_id: str, *, grace_ms: int = DEFAULT_GRACE_MS) -> WebhookSecrets:
        now = self.now_ms()
        return await self.db.run(
            lambda tx: rotate_webhook_secret(tx, account_id, grace_ms=grace_ms, now_ms=now)
        )

    async def endpoint_disabled(self, account_id: str, url: str) -> bool:
        return await self.db.run(
            lambda tx: is_webhook_endpoint_disabled(tx, account_id=account_id, url=url), write=False
        )

    async def enable_endpoint(self, account_id: str, url: str) -> bool:
        return await self.db.run(lambda tx: enable_webhook_endpoint(tx, account_id=account_id, url=url))
