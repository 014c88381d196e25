"""The billed request flow: every paid route goes through :func:`billed` or :func:`billed_stream`.

The order is fixed here, not in the handlers::

    authorize (billing: credential, price, hold; one call)
      -> work (the capability call; the handler's part)
      -> store media (before the charge: a full disk is a 500 that costs nothing)
      -> commit (billing prices the usage the work reports, capped at the hold)
      -> answer (built from the result and the charge billing decided)

On any failure or cancellation before the commit, the hold is released and
the files stored for it are deleted. A crash between the two billing calls
costs nothing either: the hold expires (and the retention sweep of
``edge.retention`` deletes the files, which have no record). Before anything
is held, the disk guard refuses new work with a 503 while the disk is nearly full.
The edge never computes an amount: it reports *usage* (images made, frames
where the object was found, ...) and billing prices it.

Streamed answers (:func:`billed_stream`: SSE chat, streamed speech, streamed
voice cloning) commit before their last bytes (the last PCM chunk, the final
chunk and ``[DONE]``): a client that leaves before the end is not charged,
one that stayed to the end is. A stream that ends with an in-band error never
committed, so it is released.

**Idempotency-Key** (1-255 printable characters, optional, on every paid
POST): billing claims it for the caller's account with a fingerprint of the
method, route, query, ``Accept`` and body, in the Authorize transaction. A
repeat of a finished request gets the stored first answer (same status, body
and headers, plus ``Idempotent-Replayed: true``) with no run and no charge; a
repeat while the first runs, or of a streamed answer, is a 409; the key with a
different request is a 400. A request that failed (its hold released) frees
its key. ``X-Request-ID`` is a trace id only and selects nothing.

**Unknown commit outcome** (billing timed out or restarting): the commit is
retried with the same reservation (billing's commit is idempotent for the same
usage); if the outcome is still unknown, the reservation's state is read: a
committed one is answered as a success, a held one is released and answered
as a 500. Never charged, answered 500, and charged again.

**Tasks** (``Prefer: respond-async``, and ``POST /v1/tasks``, which builds the
route's request): once the handler has checked the request, :func:`_authorize`
queues it as a task instead of running it (:func:`edge.tasks.defer`: billing
holds its price and queues it in one transaction) and answers 202. The task's
run replays the request with a run token as its credential; billing answers
that credential with the task's own hold, so this flow commits or releases it
as for any request. A client's Prefer on a streamed answer (SSE chat, streamed
speech) is ignored; ``POST /v1/tasks`` queues those too (its run reads the whole stream).

**Rate limits**: before the disk guard and Authorize, :func:`edge.ratelimit.check_rate_limit`
counts the request against the account's requests per minute for the route's capability (a
429 holds nothing); Authorize refuses a request past the account's jobs in flight (a 429
too, nothing held). Dry runs are not counted.

**Dry run** (``?dry_run=true`` or ``1`` on every paid route, or the body's or
form's ``dry_run: true``): the handler checks the request exactly as for the
real call, then :func:`_authorize` answers a ``price_preview`` instead of
holding (:func:`price_preview`: billing authenticates the credential and
quotes the usage for the account, with the pricing function Authorize holds
with). Nothing is held, run, stored or claimed (an Idempotency-Key is
ignored), and the disk guard does not apply; an account that cannot pay gets
its 200 with ``balance_sufficient: false``, not a 402.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import orjson
from aiohttp import web

from edge.handlers.session import session_credential
from edge.keys import BODY_DIGEST, MEDIA, PENDING, REQUEST_ID, SETTINGS, UPSTREAMS
from edge.ratelimit import check_rate_limit
from edge.responses import json_response
from edge.retention import DISK_GUARD, OUTPUT_KIND
from edge.tasks import TASK_INPUT_HEADER, defer, promote, promotion_wait
from kiln.billing.v1 import billing_service_pb2 as billing_pb
from services.common.admission import Caller, caller_var
from services.common.errors import (
    AuthenticationFailed,
    InvalidRequest,
    KilnError,
    ProcessingError,
    UpstreamUnavailable,
    quoted,
)
from services.common.money import format_credits

log = logging.getLogger("kiln.edge")
R = TypeVar("R")

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
#: Stored answers up to this size live in the ledger; larger ones in the media store.
MAX_INLINE_ANSWER_BYTES = 256 * 1024
#: A hold outlives the longest capability call by this much (store, commit, retries).
HOLD_MARGIN_SECONDS = 120
#: Commit attempts while its outcome is unknown, and the pause before each retry.
COMMIT_ATTEMPTS = 3
COMMIT_RETRY_SECONDS = 0.5
#: Headers not stored with an answer (the server sets them again).
_UNSTORED_HEADERS = frozenset({"content-length", "content-encoding", "transfer-encoding", "date", "server"})
#: The query parameter of a dry run, and its values (any other is a 400).
DRY_RUN_PARAMETER = "dry_run"
DRY_RUN_VALUES = {"true": True, "1": True, "false": False, "0": False}


def credential_from(request: web.Request) -> billing_pb.Credential:
    """``X-API-Key: <key>``, else ``Authorization: Bearer <key or JWT>``, else the session
    cookie (``kiln_session``; a state-changing request with it also needs ``X-CSRF-Token``, a
    403 otherwise: :mod:`edge.handlers.session`)."""
    api_key = request.headers.get("X-API-Key", "").strip()
    if api_key:
        return billing_pb.Credential(api_key=api_key)
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return billing_pb.Credential(bearer_token=token.strip())
    session = session_credential(request)
    if session is not None:
        return session
    raise AuthenticationFailed()


def dry_run_requested(request: web.Request, field: bool = False) -> bool:
    """True for ``?dry_run=true`` (or ``1``), or when the body or form says ``dry_run: true``
    (``field``); ``false``, ``0`` or no parameter is the real call, any other value a 400."""
    values = request.query.getall(DRY_RUN_PARAMETER, [])
    if len(values) > 1:
        raise InvalidRequest(f"The query parameter '{DRY_RUN_PARAMETER}' is given more than once")
    if values and values[0] not in DRY_RUN_VALUES:
        raise InvalidRequest(
            f"Invalid value for '{DRY_RUN_PARAMETER}': '{quoted(values[0])}' (use true, false, 1 or 0)"
        )
    return field or (bool(values) and DRY_RUN_VALUES[values[0]])


async def price_preview(request: web.Request, usage: Sequence[billing_pb.Usage]) -> dict[str, Any]:
    """What ``usage`` would hold for the caller, holding nothing: the body of a dry run.

    Billing authenticates the credential (a 401 as for the real call), then quotes the usage
    for the account (Quote with its id: premium pays 0, a premium-only model refuses other
    accounts with a 403) with the function Authorize prices its hold with, so the cost is the
    hold the real call would place. ``cost`` is exact: an :class:`orjson.Fragment` holding the
    decimal text of the credits (never a float), so serialise the answer with orjson
    (:func:`edge.responses.json_response`).
    """
    billing = request.app[UPSTREAMS].billing
    request_id = request[REQUEST_ID]
    account = await billing.authenticate(credential_from(request), request_id)
    quote = await billing.quote(usage, account.id, request_id)
    amounts = list(quote.item_amounts_hundredths)
    if len(amounts) != len(usage) or sum(amounts) != quote.amount_hundredths:
        raise ProcessingError("Internal error: billing's quote does not match the request's items.")
    total = quote.amount_hundredths
    return {
        "object": "price_preview",
        "dry_run": True,
        "cost": credits_number(total),
        "cost_hundredths": total,
        "items": [_priced_item(item, amount) for item, amount in zip(usage, amounts, strict=True)],
        "balance_sufficient": account.balance_hundredths >= total,
    }


def credits_number(units: int) -> orjson.Fragment:
    """Credits as an exact JSON number (25 units -> ``0.25``): the decimal text, never a float."""
    return orjson.Fragment(format_credits(units).encode())


def _priced_item(usage: billing_pb.Usage, amount: int) -> dict[str, Any]:
    """One item of a price preview: the usage's kind (``image_generation``, ``segmentation``,
    ...), the fields billing prices it by (model, sizes, steps, count, frames: those set) and
    what it costs."""
    kind = usage.WhichOneof("kind")
    if kind is None:
        raise ProcessingError("Internal error: a usage item names no kind of work.")
    fields = {descriptor.name: value for descriptor, value in getattr(usage, kind).ListFields()}
    return {"kind": kind, **fields, "cost": credits_number(amount), "cost_hundredths": amount}


@dataclass
class MediaFile:
    """A file the work produced, stored before the charge under an id chosen up front
    (``MediaStore.new_id()``), so the answer can name it."""

    data: bytes
    mime_type: str
    media_id: str


@dataclass
class Done(Generic[R]):
    """What a piece of billed work did: its result, the usage actually done (what billing
    charges), the files to store before the charge, and the files to record in the
    account's library with it."""

    result: R
    usage: Sequence[billing_pb.Usage]
    files: Sequence[MediaFile] = ()
    records: Sequence[billing_pb.MediaRecord] = ()


@dataclass(frozen=True)
class Charge:
    """What the flow did after the work: what billing charged, and how long storing the
    files took (for the answer's timing)."""

    charged: int
    store_seconds: float = 0.0


@dataclass
class Hold:
    """One request's credit hold, from Authorize to commit or release."""

    request: web.Request
    auth: billing_pb.AuthorizeResponse
    claimed_key: bool
    #: What billing charged, once committed.
    charged: int | None = None
    store_seconds: float = 0.0
    #: Media ids stored for this request: deleted again when it is released (never paid for).
    stored: list[str] = field(default_factory=list)
    _released: bool = field(default=False, repr=False)

    @property
    def reservation_id(self) -> str:
        return self.auth.reservation.id

    async def settle(
        self,
        usage: Sequence[billing_pb.Usage],
        files: Sequence[MediaFile] = (),
        records: Sequence[billing_pb.MediaRecord] = (),
    ) -> int:
        """Stores ``files``, then commits ``usage`` (with ``records``); returns what billing charged.

        Every file is recorded with the charge (those without a record of the handler's as
        ``OUTPUT_KIND``), so the retention sweep (``edge.retention``) knows it was paid for.
        Streamed answers call it before their last bytes; :func:`billed` calls it for the others.
        """
        if self.charged is not None:
            raise ProcessingError("Internal error: a request was settled twice.")
        store = self.request.app[MEDIA]
        started = time.perf_counter()
        for file in files:
            await store.put_async(file.data, file.mime_type, file.media_id)
            self.stored.append(file.media_id)
        self.store_seconds = time.perf_counter() - started
        recorded = {record.media_id for record in records}
        records = [
            *records,
            *(
                billing_pb.MediaRecord(
                    media_id=file.media_id,
                    kind=OUTPUT_KIND,
                    mime_type=file.mime_type,
                    size_bytes=len(file.data),
                )
                for file in files
                if file.media_id not in recorded
            ),
        ]
        reservation = await _commit(self.request, self.reservation_id, usage, records)
        self.charged = reservation.charged_hundredths
        return self.charged

    async def release(self) -> None:
        """Returns the hold unless it was committed, then deletes the files stored for it
        (shielded: it finishes even when the request is cancelled; the edge's shutdown waits
        for it). Files of a hold whose release failed are left to the retention sweep."""
        if self.charged is not None or self._released:
            return
        self._released = True
        task = asyncio.ensure_future(self._release_and_discard())
        self.request.app[PENDING].add(task)
        await asyncio.shield(task)

    async def _release_and_discard(self) -> None:
        if await _released(self.request, self.reservation_id) and self.stored:
            store = self.request.app[MEDIA]
            for media_id in self.stored:
                await store.delete_async(media_id)


async def billed(
    request: web.Request,
    usage: Sequence[billing_pb.Usage],
    work: Callable[[billing_pb.AuthorizeResponse], Awaitable[Done[R]]],
    answer: Callable[[R, Charge], Awaitable[web.StreamResponse]],
    *,
    streamed: bool = False,
    dry_run: bool = False,
) -> web.StreamResponse:
    """Authorize ``usage`` -> ``work`` -> store its files -> commit its usage -> ``answer``.

    ``answer(result, charge)`` builds the response once the charge is known.
    ``streamed``: the answer is a stream (server-sent progress, a streamed file)
    and is never replayed for an idempotency key. ``dry_run``: the body's or
    form's ``dry_run`` field (``?dry_run`` is read here): the price preview is
    the answer, and nothing is held or run.
    """
    hold = await _authorize(request, usage, streamed=streamed, dry_run=dry_run)
    if isinstance(hold, web.Response):
        return hold

    async def run(held: Hold) -> web.StreamResponse:
        try:
            done = await work(held.auth)
            charged = await held.settle(done.usage, done.files, done.records)
        except BaseException:
            await held.release()
            raise
        return await answer(done.result, Charge(charged, held.store_seconds))

    wait = promotion_wait(request, streamed)
    if wait is None:
        response = await run(hold)
    else:  # KILN_SYNC_WAIT_SECONDS: past the wait, the request goes on as a task (a 202)
        job = asyncio.ensure_future(run(hold))
        try:
            finished, _ = await asyncio.wait({job}, timeout=wait)
        except asyncio.CancelledError:
            job.cancel()
            raise
        if not finished:
            return await promote(request, hold.reservation_id, usage, job)
        response = job.result()
    if hold.claimed_key and not streamed:
        await _save_answer(request, hold, response)
    return response


async def billed_stream(
    request: web.Request,
    usage: Sequence[billing_pb.Usage],
    work: Callable[[Hold], Awaitable[web.StreamResponse]],
    *,
    dry_run: bool = False,
) -> web.StreamResponse:
    """Authorize ``usage`` -> ``work`` streams its answer and calls ``hold.settle(...)``
    before its last bytes. A stream that ends without settling (an in-band error) is
    released: nothing is charged. Never replayed for an idempotency key. ``dry_run``
    as for :func:`billed`."""
    # Queued only from POST /v1/tasks (a task's run reads the whole stream); a client's own
    # Prefer: respond-async on a stream it asked for is ignored.
    deferrable = TASK_INPUT_HEADER in request.headers
    hold = await _authorize(request, usage, streamed=True, dry_run=dry_run, deferrable=deferrable)
    if isinstance(hold, web.Response):  # a dry run's price (a stream is never replayed)
        return hold
    try:
        response = await work(hold)
    except BaseException:
        await hold.release()
        raise
    await hold.release()  # a no-op once settled
    return response


async def _authorize(
    request: web.Request,
    usage: Sequence[billing_pb.Usage],
    *,
    streamed: bool,
    dry_run: bool,
    deferrable: bool = True,
) -> Hold | web.Response:
    """The hold for ``usage``, the stored answer of the idempotency key's earlier request, or
    (a dry run: ``dry_run`` or ``?dry_run=true``) the price preview, holding nothing."""
    if dry_run_requested(request, dry_run):
        return json_response(await price_preview(request, usage))
    await check_rate_limit(request)  # a 429 before anything is held (edge.ratelimit)
    settings = request.app[SETTINGS]
    request.app[DISK_GUARD].check()  # a 503 before anything is held while the disk is nearly full
    key = request.headers.get(IDEMPOTENCY_HEADER)
    idempotency = None
    if key is not None:  # billing checks the key (one rule for the edge and direct callers)
        idempotency = billing_pb.IdempotencyKey(
            key=key, fingerprint=await request_fingerprint(request), streamed=streamed
        )
    if deferrable:  # Prefer: respond-async, or POST /v1/tasks: queued as a task, answered 202
        deferred = await defer(request, credential_from(request), usage, idempotency)
        if isinstance(deferred, billing_pb.StoredResponse):
            return await _replay(request, deferred)
        if deferred is not None:
            return deferred
    ttl = min(24 * 3600, math.ceil(settings.service_timeout_seconds) + HOLD_MARGIN_SECONDS)
    call = asyncio.ensure_future(
        request.app[UPSTREAMS].billing.authorize(
            credential_from(request), usage, request[REQUEST_ID], ttl_seconds=ttl, idempotency=idempotency
        )
    )
    try:
        auth = await asyncio.shield(call)
    except asyncio.CancelledError:
        # The client left while billing was holding: release the hold once it is known,
        # rather than leave it until it expires.
        call.add_done_callback(functools.partial(_release_late_hold, request))
        raise
    if auth.HasField("replay"):
        return await _replay(request, auth.replay)
    # The capability calls of this request name its account, for the engines' fair queues
    # (services.common.admission; edge.clients sends it with every call).
    caller_var.set(Caller(auth.account.id, auth.account.premium))
    return Hold(request, auth, claimed_key=idempotency is not None)


async def request_fingerprint(request: web.Request) -> str:
    """SHA-256 of what makes a request the same request: method, route, query, ``Accept``,
    content type and body. Multipart bodies are fingerprinted part by part as they are read
    (``edge.forms``), so a new boundary on a retry does not change the fingerprint."""
    digest = hashlib.sha256()
    for part in (
        request.method,
        request.path,
        request.query_string,
        request.headers.get("Accept", ""),
        request.content_type,
    ):
        digest.update(part.encode() + b"\0")
    if request.content_type == "multipart/form-data" or request.content_type.startswith("multipart/"):
        body = request.get(BODY_DIGEST)
        if body is None:
            raise ProcessingError("Internal error: the multipart body was not fingerprinted.")
        digest.update(body.digest())
    else:
        digest.update(hashlib.sha256(await request.read()).digest())
    return digest.hexdigest()


async def _replay(request: web.Request, stored: billing_pb.StoredResponse) -> web.Response:
    body = stored.body
    if stored.body_media_id:
        saved = await request.app[MEDIA].read_async(stored.body_media_id)
        if saved is None:
            raise ProcessingError("The stored answer of this Idempotency-Key is no longer available.")
        body = saved
    response = web.Response(status=stored.status, body=body)
    for header in stored.headers:
        response.headers.add(header.name, header.value)
    response.headers[REPLAYED_HEADER] = "true"
    return response


async def _save_answer(request: web.Request, hold: Hold, response: web.StreamResponse) -> None:
    """Stores the answer for replays of the idempotency key (after the commit). A failure
    is logged: the request is done and charged; a repeat then gets a 409 that says so."""
    if not isinstance(response, web.Response) or not isinstance(response.body, bytes):
        log.error("request %s: an answer that is not a plain body cannot be stored", request[REQUEST_ID])
        return
    headers = [
        billing_pb.Header(name=name, value=value)
        for name, value in response.headers.items()
        if name.lower() not in _UNSTORED_HEADERS
    ]
    stored = billing_pb.StoredResponse(status=response.status, headers=headers)
    body = response.body
    try:
        if len(body) > MAX_INLINE_ANSWER_BYTES:
            store = request.app[MEDIA]
            stored.body_media_id = await store.put_async(body, "application/octet-stream")
        else:
            stored.body = body
        await request.app[UPSTREAMS].billing.save_response(hold.reservation_id, stored, request[REQUEST_ID])
    except Exception as err:  # the request is done and charged: its answer goes out regardless
        log.error(
            "request %s: its answer could not be stored for its idempotency key: %s", request[REQUEST_ID], err
        )


async def _commit(
    request: web.Request,
    reservation_id: str,
    usage: Sequence[billing_pb.Usage],
    records: Sequence[billing_pb.MediaRecord],
) -> billing_pb.Reservation:
    """Commits, retrying while the outcome is unknown; then reads the reservation's state."""
    billing = request.app[UPSTREAMS].billing
    request_id = request[REQUEST_ID]
    for attempt in range(COMMIT_ATTEMPTS):
        try:
            return await billing.commit(reservation_id, usage, records, request_id)
        except UpstreamUnavailable:
            log.warning("commit of %s: outcome unknown (attempt %d)", reservation_id, attempt + 1)
            await asyncio.sleep(COMMIT_RETRY_SECONDS * (attempt + 1))
        except KilnError as err:  # billing refused our own commit: a fault of ours, not the client's
            log.error("commit of %s refused: %s", reservation_id, err.message)
            raise ProcessingError("The request could not be charged; nothing was charged.") from None
    reservation = await billing.get_reservation(reservation_id, request_id)
    if reservation.state == billing_pb.RESERVATION_STATE_COMMITTED:
        return reservation
    raise UpstreamUnavailable("Billing did not confirm the charge; the request was not charged.")


def _release_late_hold(request: web.Request, call: asyncio.Future[billing_pb.AuthorizeResponse]) -> None:
    """Releases the hold of an Authorize whose request was cancelled while it ran."""
    if call.cancelled() or call.exception() is not None:
        return
    auth = call.result()
    if auth.HasField("reservation"):
        request.app[PENDING].add(asyncio.ensure_future(_release(request, auth.reservation.id)))


async def _release(request: web.Request, reservation_id: str) -> None:
    await _released(request, reservation_id)


async def _released(request: web.Request, reservation_id: str) -> bool:
    """Releases a hold; False (logged) when billing did not confirm it."""
    try:
        await request.app[UPSTREAMS].billing.release(reservation_id, request[REQUEST_ID])
    except KilnError as err:  # the hold expires on its own; say so and go on
        log.warning("release of %s failed (%s); it will expire", reservation_id, err.message)
        return False
    return True
