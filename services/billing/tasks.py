"""Asynchronous tasks in the billing database: queued with their credit hold, claimed by
the edges' task workers, finished with the outcome of their run.

Why here, and not in a queue library: a task and its hold are one thing. The
task row is inserted in the transaction that places the hold
(:meth:`~services.billing.ledger.Ledger.authorize`), and a task that ends unpaid
releases its hold in the transaction that ends it, so neither can outlive the
other on a crash. ``dbos`` (the one maintained library that runs on SQLite and
PostgreSQL) keeps its queue in its own system tables and would need the edge
to open the database billing owns; procrastinate and pgqueuer are
PostgreSQL-only. The queue itself is small: claiming is one conditional
``UPDATE`` of the oldest due row, ``FOR UPDATE SKIP LOCKED`` on PostgreSQL (two
workers never claim the same task; neither waits on the other's claim), and
SQLite's single writer there.

Life of a task::

    pending --claim--> processing --finish--> completed | failed | cancelled
       \\--cancel--> cancelled      \\--lease ran out--> pending again (once) | failed

A claim hands the worker a **run token** (only its SHA-256 is stored). The
worker replays the task's HTTP request against its edge with
``Authorization: Bearer <run token>``; billing's Authorize answers such a
credential with the task's own hold instead of placing a new one (see
:meth:`TaskStore.run_authorization`), so the synchronous route's billed flow
commits or releases the task's hold exactly as it does a request's. A run whose
worker stopped renewing its lease is taken over once (the hold is kept; a commit
that already happened is not repeated, as commits are idempotent); after that the
task fails and its hold is released.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from services.billing.ledger import (
    AccountRecord,
    Authorization,
    Ledger,
    MediaRecord,
    ReservationRecord,
    account_in,
    read_reservation,
    record_media,
    release_hold,
)
from services.billing.store import Row, Tx
from services.billing.webhooks import enqueue_webhook, task_webhook_summary
from services.common.errors import (
    AuthenticationFailed,
    Conflict,
    InvalidRequest,
    NotFound,
    cancelled_task_error,
    envelope_json,
    quoted,
)
from services.common.money import format_credits

TaskStatus = Literal["pending", "processing", "completed", "failed", "cancelled"]
STATUSES: tuple[TaskStatus, ...] = ("pending", "processing", "completed", "failed", "cancelled")
FINISHED: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
#: Prefix of a run token (a bearer credential only the task's worker holds).
RUN_TOKEN_PREFIX = "ktask_"
#: Runs a task may start: the first, and one more after a worker stopped.
MAX_ATTEMPTS = 2
MAX_PAGE = 100
DEFAULT_PAGE = 20
#: The longest stored callback URL.
MAX_CALLBACK_URL_CHARS = 2048

_COLUMNS = (
    "id, account_id, reservation_id, model, route, input_media_id, content_type, callback_url, origin, status,"
    " cancel_requested, attempts, progress_step, progress_total, output_json, error_json, created_at_ms,"
    " started_at_ms, completed_at_ms"
)
_TASK_COLUMNS = ", ".join(f"t.{c.strip()}" for c in _COLUMNS.split(","))


@dataclass(frozen=True)
class TaskRecord:
    """One task row, with its hold's amounts."""

    id: str
    account_id: str
    reservation_id: str
    model: str
    route: str
    input_media_id: str
    content_type: str
    callback_url: str
    origin: str
    status: TaskStatus
    cancel_requested: bool
    attempts: int
    progress_step: int
    progress_total: int
    output_json: bytes | None
    error_json: bytes | None
    created_at_ms: int
    started_at_ms: int | None
    completed_at_ms: int | None
    held: int = 0
    charged: int = 0


@dataclass(frozen=True)
class NewTask:
    """What a task is created with (the edge stored the request body as ``input_media_id``)."""

    model: str
    route: str
    input_media_id: str
    content_type: str
    callback_url: str = ""
    origin: str = ""


@dataclass(frozen=True)
class Claim:
    """A claimed task and the token that authorizes its run."""

    task: TaskRecord
    run_token: str


def _task(row: Row) -> TaskRecord:
    return TaskRecord(
        id=row[0],
        account_id=row[1],
        reservation_id=row[2],
        model=row[3],
        route=row[4],
        input_media_id=row[5],
        content_type=row[6],
        callback_url=row[7],
        origin=row[8],
        status=row[9],
        cancel_requested=bool(row[10]),
        attempts=int(row[11]),
        progress_step=int(row[12]),
        progress_total=int(row[13]),
        output_json=bytes(row[14]) if row[14] is not None else None,
        error_json=bytes(row[15]) if row[15] is not None else None,
        created_at_ms=int(row[16]),
        started_at_ms=int(row[17]) if row[17] is not None else None,
        completed_at_ms=int(row[18]) if row[18] is not None else None,
        held=int(row[19]) if len(row) > 19 else 0,
        charged=int(row[20]) if len(row) > 20 else 0,
    )


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def is_run_token(token: str) -> bool:
    return token.startswith(RUN_TOKEN_PREFIX)


def task_document(task: TaskRecord, webhook: dict[str, Any] | None = None) -> dict[str, Any]:
    """The public task object (``GET /v1/tasks/{id}`` and the webhook payload)."""
    doc: dict[str, Any] = {
        "task_id": task.id,
        "status": task.status,
        "model": task.model,
        "created_at": task.created_at_ms // 1000,
        "started_at": task.started_at_ms // 1000 if task.started_at_ms else None,
        "completed_at": task.completed_at_ms // 1000 if task.completed_at_ms else None,
        "credits_held": format_credits(task.held),
        "credits_charged": format_credits(task.charged) if task.status == "completed" else "0",
    }
    if task.progress_total:
        doc["progress"] = {"step": task.progress_step, "total_steps": task.progress_total}
    if task.status == "completed" and task.output_json is not None:
        doc["output"] = json.loads(task.output_json)
    if task.status in ("failed", "cancelled") and task.error_json is not None:
        doc["error"] = json.loads(task.error_json)
    if task.callback_url:
        doc["callback_url"] = task.callback_url
    if webhook is not None:
        doc["webhook"] = webhook  # the delivery's state: delivered, pending (retrying), dead, disabled
    return doc


def _page_token(created_at_ms: int, task_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at_ms}:{task_id}".encode()).decode().rstrip("=")


def _parse_page_token(token: str) -> tuple[int, str]:
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        created, _, task_id = text.partition(":")
        return int(created), task_id
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest(f"Invalid page token '{quoted(token)}'") from None


#: Called inside the transaction that ends a task (the webhook outbox), with the finished
#: task and the time (Unix ms).
OnFinish = Callable[[Tx, TaskRecord, int], None]


def enqueue_outcome(tx: Tx, task: TaskRecord, now_ms: int) -> None:
    """Puts the finished task's object in the webhook outbox for its ``callback_url`` (in the
    transaction that ends it: a task never ends without its message, nor the reverse)."""
    enqueue_webhook(
        tx,
        account_id=task.account_id,
        task_id=task.id,
        url=task.callback_url,
        event_type=f"task.{task.status}",
        payload=json.dumps(task_document(task)).encode(),
        now_ms=now_ms,
    )


class TaskStore:
    """The tasks of one billing database (the ledger's clock and transactions)."""

    def __init__(self, ledger: Ledger, *, on_finish: OnFinish | None = enqueue_outcome) -> None:
        self.ledger = ledger
        self.db = ledger.db
        self.on_finish = on_finish

    # --- owners ---

    def creator(self, new: NewTask) -> Callable[[Tx, AccountRecord, ReservationRecord], None]:
        """The in-transaction insert of a task for a hold (``Ledger.authorize(then=...)``);
        the id is made here, never taken from the client."""
        if len(new.callback_url) > MAX_CALLBACK_URL_CHARS:
            raise InvalidRequest(f"'callback_url' is longer than {MAX_CALLBACK_URL_CHARS} characters")
        task_id = "task_" + secrets.token_hex(12)
        now = self.ledger.now_ms()

        def insert(tx: Tx, account: AccountRecord, reservation: ReservationRecord) -> None:
            tx.execute(
                "INSERT INTO tasks (id, account_id, reservation_id, model, route, input_media_id,"
                " content_type, callback_url, origin, status, created_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?,"
                " ?, 'pending', ?)",
                (
                    task_id,
                    account.id,
                    reservation.id,
                    new.model,
                    new.route,
                    new.input_media_id,
                    new.content_type,
                    new.callback_url,
                    new.origin,
                    now,
                ),
            )

        return insert

    async def for_hold(self, authorization: Authorization) -> TaskRecord:
        """The task created with a hold."""
        if authorization.reservation is None:
            raise InvalidRequest("No task was created (an idempotent replay).")
        reservation_id = authorization.reservation.id
        return await self.db.run(lambda tx: _by_reservation(tx, reservation_id), write=False)

    async def get(self, account_id: str, task_id: str) -> TaskRecord:
        """An account's task; another account's is NotFound, as an unknown id is."""
        return await self.db.run(lambda tx: _owned(tx, account_id, task_id), write=False)

    async def holds(self, reservation_id: str) -> bool:
        """Whether the hold belongs to a task that has not ended (only its end releases it)."""
        row = await self.db.run(
            lambda tx: tx.one(
                "SELECT id FROM tasks WHERE reservation_id = ? AND status IN ('pending', 'processing')",
                (reservation_id,),
            ),
            write=False,
        )
        return row is not None

    async def webhook(self, account_id: str, task_id: str) -> dict[str, Any] | None:
        """The state of the task's newest webhook message (None: no callback, or not ended yet)."""
        return await self.db.run(
            lambda tx: task_webhook_summary(tx, task_id, account_id=account_id), write=False
        )

    async def list(
        self, account_id: str, *, status: str | None = None, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[TaskRecord], str]:
        if status is not None and status not in STATUSES:
            raise InvalidRequest(
                f"Invalid status '{quoted(status)}'. Supported statuses: {', '.join(STATUSES)}"
            )
        size = page_size or DEFAULT_PAGE
        if not 1 <= size <= MAX_PAGE:
            raise InvalidRequest(f"'limit' must be between 1 and {MAX_PAGE}")
        sql = f"{_select()} WHERE t.account_id = ?"
        params: list[Any] = [account_id]
        if status is not None:
            sql += " AND t.status = ?"
            params.append(status)
        if page_token:
            created, last_id = _parse_page_token(page_token)
            sql += " AND (t.created_at_ms < ? OR (t.created_at_ms = ? AND t.id < ?))"
            params += [created, created, last_id]
        sql += " ORDER BY t.created_at_ms DESC, t.id DESC LIMIT ?"
        params.append(size + 1)
        rows = await self.db.run(lambda tx: tx.all(sql, params), write=False)
        tasks = [_task(row) for row in rows[:size]]
        more = len(rows) > size
        return tasks, _page_token(tasks[-1].created_at_ms, tasks[-1].id) if more and tasks else ""

    async def cancel(self, account_id: str, task_id: str) -> TaskRecord:
        """A pending task ends now (its hold released); a running one is asked to stop."""
        now = self.ledger.now_ms()

        def tx_fn(tx: Tx) -> TaskRecord:
            task = _owned(tx, account_id, task_id)
            if task.status in FINISHED:
                raise Conflict(f"Task '{task.id}' is already {task.status}; it cannot be cancelled.")
            if task.status == "processing":
                tx.execute("UPDATE tasks SET cancel_requested = TRUE WHERE id = ?", (task.id,))
                return _owned(tx, account_id, task_id)
            error = cancelled_task_error()
            return self._end(tx, task, "cancelled", now, error=error)

        return await self.db.run(tx_fn)

    # --- workers ---

    async def claim(self, worker_id: str, lease_seconds: float) -> Claim | None:
        """The oldest due task for ``worker_id``: a pending one, or one whose lease ran out
        (retried once, then failed with its hold released)."""
        now = self.ledger.now_ms()
        lease = now + int(lease_seconds * 1000)
        token = RUN_TOKEN_PREFIX + secrets.token_urlsafe(24)
        skip_locked = " FOR UPDATE SKIP LOCKED" if self.db.dialect == "postgresql" else ""
        # Idle workers poll: a read first, so that an empty queue never takes the write lock.
        due = await self.db.run(
            lambda tx: tx.one(
                "SELECT id FROM tasks WHERE status = 'pending' OR (status = 'processing'"
                " AND lease_expires_at_ms < ?) LIMIT 1",
                (now,),
            ),
            write=False,
        )
        if due is None:
            return None

        def tx_fn(tx: Tx) -> Claim | None:
            # Runs whose worker stopped: retried once, else failed (their hold released).
            stale = tx.all(
                f"SELECT {_COLUMNS} FROM tasks WHERE status = 'processing' AND lease_expires_at_ms < ?"
                f" ORDER BY lease_expires_at_ms LIMIT 10{skip_locked}",
                (now,),
            )
            for row in stale:
                task = _task(row)
                if task.cancel_requested:
                    self._end(tx, task, "cancelled", now, error=cancelled_task_error())
                elif not task.input_media_id:  # an adopted request: nothing to replay
                    message = "The server running the task stopped before it finished; nothing was charged."
                    self._end(tx, task, "failed", now, error=envelope_json(message, "processing_error"))
                elif task.attempts >= MAX_ATTEMPTS:
                    message = "The task's worker stopped twice before it finished; nothing was charged."
                    self._end(tx, task, "failed", now, error=envelope_json(message, "processing_error"))
                else:
                    return self._start(tx, task, worker_id, token, now, lease)
            oldest = tx.one(
                f"SELECT {_COLUMNS} FROM tasks WHERE status = 'pending' ORDER BY created_at_ms, id LIMIT 1"
                f"{skip_locked}",
            )
            if oldest is None:
                return None
            return self._start(tx, _task(oldest), worker_id, token, now, lease)

        return await self.db.run(tx_fn)

    def _start(
        self, tx: Tx, task: TaskRecord, worker_id: str, token: str, now: int, lease: int
    ) -> Claim | None:
        changed = tx.execute(
            "UPDATE tasks SET status = 'processing', worker_id = ?, run_token_hash = ?, lease_expires_at_ms = ?,"
            " attempts = attempts + 1, started_at_ms = ? WHERE id = ? AND status = ? AND attempts = ?",
            (worker_id, _token_hash(token), lease, now, task.id, task.status, task.attempts),
        )
        if changed != 1:  # taken by another worker in the meantime (SQLite never gets here)
            return None
        return Claim(_by_id(tx, task.id), token)

    async def adopt(self, reservation_id: str, new: NewTask, worker_id: str, lease_seconds: float) -> Claim:
        """A running task for a request already under way on its own hold (it ran past its
        edge's wait): claimed by that edge, with no stored input (it cannot be replayed, so a
        run whose edge died fails and releases the hold)."""
        now = self.ledger.now_ms()
        token = RUN_TOKEN_PREFIX + secrets.token_urlsafe(24)
        task_id = "task_" + secrets.token_hex(12)

        def tx_fn(tx: Tx) -> Claim:
            reservation = read_reservation(tx, reservation_id)
            if reservation.state != "held":
                raise Conflict(f"Reservation '{quoted(reservation_id)}' is {reservation.state}, not held.")
            tx.execute(
                "INSERT INTO tasks (id, account_id, reservation_id, model, route, input_media_id, content_type,"
                " callback_url, origin, status, worker_id, run_token_hash, lease_expires_at_ms, attempts,"
                " created_at_ms, started_at_ms) VALUES (?, ?, ?, ?, ?, '', '', ?, ?, 'processing', ?, ?, ?,"
                " 1, ?, ?)",
                (
                    task_id,
                    reservation.account_id,
                    reservation.id,
                    new.model,
                    new.route,
                    new.callback_url,
                    new.origin,
                    worker_id,
                    _token_hash(token),
                    now + int(lease_seconds * 1000),
                    now,
                    now,
                ),
            )
            return Claim(_by_id(tx, task_id), token)

        return await self.db.run(tx_fn)

    async def renew(
        self, task_id: str, run_token: str, lease_seconds: float, step: int = 0, total: int = 0
    ) -> tuple[bool, bool]:
        """Extends the run's lease and records progress; (cancel requested, lease lost)."""
        now = self.ledger.now_ms()

        def tx_fn(tx: Tx) -> tuple[bool, bool]:
            row = tx.one(
                "UPDATE tasks SET lease_expires_at_ms = ?, progress_step = CASE WHEN ? > 0 THEN ? ELSE"
                " progress_step END, progress_total = CASE WHEN ? > 0 THEN ? ELSE progress_total END"
                " WHERE id = ? AND run_token_hash = ? AND status = 'processing' RETURNING cancel_requested",
                (now + int(lease_seconds * 1000), total, step, total, total, task_id, _token_hash(run_token)),
            )
            if row is None:
                return False, True
            return bool(row[0]), False

        return await self.db.run(tx_fn)

    async def finish(
        self,
        task_id: str,
        run_token: str,
        status: str,
        *,
        output: bytes = b"",
        error: bytes = b"",
        media: Sequence[MediaRecord] = (),
        progress: tuple[int, int] = (0, 0),
    ) -> TaskRecord:
        """Ends a run. ``completed`` needs the task's hold committed (the run's billed flow
        did it; ``media``, files the worker stored for the answer, are recorded with it); any
        other end releases a hold still held. A run that ends otherwise after its hold was
        committed (cancelled as it finished) is completed: it was done and paid for."""
        if status not in FINISHED:
            raise InvalidRequest(f"A run ends completed, failed or cancelled, not '{quoted(status)}'.")
        now = self.ledger.now_ms()

        def tx_fn(tx: Tx) -> TaskRecord:
            row = tx.one(
                f"SELECT {_COLUMNS} FROM tasks WHERE id = ? AND run_token_hash = ? AND status = 'processing'",
                (task_id, _token_hash(run_token)),
            )
            if row is None:
                raise Conflict(f"Task '{quoted(task_id)}' is not running under this run token.")
            task = _task(row)
            if progress[1] > 0:  # the last steps may have come after the last renewal
                tx.execute(
                    "UPDATE tasks SET progress_step = ?, progress_total = ? WHERE id = ?",
                    (progress[0], progress[1], task.id),
                )
            reservation = read_reservation(tx, task.reservation_id)
            end, out, err = status, output or None, error or None
            if reservation.state == "committed":
                end = "completed"
                if out is None:
                    out = json.dumps(
                        {"message": "The task was done and charged; its answer was not kept."}
                    ).encode()
                for record in media:
                    record_media(tx, reservation, record, now)
            elif end == "completed":
                end, err = (
                    "failed",
                    envelope_json("The task ended without being charged.", "processing_error"),
                )
            return self._end(tx, task, end, now, output=out, error=err)

        return await self.db.run(tx_fn)

    def _end(
        self,
        tx: Tx,
        task: TaskRecord,
        status: str,
        now: int,
        *,
        output: bytes | None = None,
        error: bytes | None = None,
    ) -> TaskRecord:
        if status != "completed":
            release_hold(tx, task.reservation_id, now)
        tx.execute(
            "UPDATE tasks SET status = ?, output_json = ?, error_json = ?, completed_at_ms = ?,"
            " run_token_hash = NULL, lease_expires_at_ms = NULL WHERE id = ?",
            (status, output, error, now, task.id),
        )
        done = _by_id(tx, task.id)
        if self.on_finish is not None and done.callback_url:
            self.on_finish(tx, done, now)
        return done

    async def run_authorization(self, run_token: str) -> Authorization:
        """What billing's Authorize answers for a run token: the task's account and its own
        hold (nothing new is held). Only a running task's current token is accepted."""

        def tx_fn(tx: Tx) -> Authorization:
            row = tx.one(
                "SELECT reservation_id, account_id FROM tasks WHERE run_token_hash = ? AND status = 'processing'",
                (_token_hash(run_token),),
            )
            if row is None:
                raise AuthenticationFailed()
            reservation = read_reservation(tx, str(row[0]))
            return Authorization(account_in(tx, str(row[1])), reservation, [reservation.amount])

        return await self.db.run(tx_fn, write=False)


def _select() -> str:
    return f"SELECT {_TASK_COLUMNS}, r.amount, r.charged FROM tasks t JOIN reservations r ON r.id = t.reservation_id"


def _by_id(tx: Tx, task_id: str) -> TaskRecord:
    row = tx.one(f"{_select()} WHERE t.id = ?", (task_id,))
    if row is None:
        raise NotFound(f"Task '{quoted(task_id)}' was not found.")
    return _task(row)


def _by_reservation(tx: Tx, reservation_id: str) -> TaskRecord:
    row = tx.one(f"{_select()} WHERE t.reservation_id = ?", (reservation_id,))
    if row is None:
        raise NotFound("No task was created for this hold.")
    return _task(row)


def _owned(tx: Tx, account_id: str, task_id: str) -> TaskRecord:
    row = tx.one(f"{_select()} WHERE t.id = ? AND t.account_id = ?", (task_id, account_id))
    if row is None:
        raise NotFound(f"Task '{quoted(task_id)}' was not found.")
    return _task(row)
