"""Asynchronous tasks at the edge: deferring a paid request, and the worker that runs it later.

A task is a paid request answered later. Every synchronous route can become one,
with no code of its own:

* **Deferring** (:func:`defer`, called by the billed flow in place of the work):
  a request that asks for it (``Prefer: respond-async``, or ``POST /v1/tasks``,
  which builds the route's request from its ``input``) is checked exactly as the
  synchronous call, its body is stored as a media file, and billing's CreateTask
  holds its price and queues it in one transaction (402 then, nothing queued).
  The answer is ``202 Accepted`` with the task.
* **Running** (:class:`TaskWorker`, in every edge): claims the oldest due task
  from billing, replays its stored request against this edge with the run token
  billing gave it as the credential (billing answers that credential with the
  task's own hold, so the route's billed flow commits or releases it as usual),
  renews its lease while it runs (reporting the progress events of routes that
  stream progress, and stopping the run when its owner cancels it), and records
  the answer: JSON as it is, a file by its URL.

Tasks live in billing's database (see :mod:`services.billing.tasks` for why no
queue library): an edge that restarts loses nothing, several edges share one queue,
and a run whose edge died is taken over once by another.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from typing import Any, cast

import aiohttp
from aiohttp import web

from edge.keys import MEDIA, REQUEST_ID, SETTINGS, UPSTREAMS
from edge.media_store import MIME_EXTENSIONS
from edge.webhooks import WEBHOOK_DELIVERER, check_webhook_url
from kiln.billing.v1 import billing_service_pb2 as billing_pb
from kiln.billing.v1 import task_service_pb2 as task_pb
from services.billing.task_servicer import task_record
from services.billing.tasks import is_run_token, task_document
from services.common.errors import InvalidRequest, KilnError, cancelled_task_error, envelope_json
from services.common.mesh_auth import mesh_secret

log = logging.getLogger("kiln.edge.tasks")

#: RFC 7240: the client prefers a 202 and a task to waiting for the answer.
PREFER_ASYNC = "respond-async"
#: Set by ``POST /v1/tasks`` on the request it builds: ``<media id>.<signature>`` of the stored body.
TASK_INPUT_HEADER = "X-Kiln-Task-Input"
#: Where a task's outcome is posted (``POST /v1/tasks``'s ``callback_url``, or a client's own).
CALLBACK_HEADER = "X-Callback-URL"
#: The origin (scheme://host) the task was created at, sent with its run: the base of its media URLs.
ORIGIN_HEADER = "X-Kiln-Task-Origin"
#: Bytes of a stored task input's media type.
INPUT_MIME = "application/octet-stream"

SELF_URL = web.AppKey("task_self_url", asyncio.Future)
WAKE = web.AppKey("task_wake", asyncio.Event)
SESSION = web.AppKey("task_session", aiohttp.ClientSession)


def _signature(secret: bytes, media_id: str) -> str:
    digest = hmac.new(secret, b"kiln-task-input:" + media_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def sign_input(settings: Any, media_id: str) -> str:
    """The value of :data:`TASK_INPUT_HEADER` for a stored body (only the edge can make one)."""
    return f"{media_id}.{_signature(mesh_secret(settings), media_id)}"


def _signed_input(request: web.Request) -> str | None:
    value = request.headers.get(TASK_INPUT_HEADER)
    if value is None:
        return None
    media_id, _, signature = value.partition(".")
    expected = _signature(mesh_secret(request.app[SETTINGS]), media_id)
    if not hmac.compare_digest(signature, expected):
        raise InvalidRequest(f"Invalid {TASK_INPUT_HEADER} header")
    return media_id


def wants_async(request: web.Request) -> bool:
    """``Prefer: respond-async`` (RFC 7240; tokens are case-insensitive), or a request built by
    ``POST /v1/tasks``."""
    if TASK_INPUT_HEADER in request.headers:
        return True
    for value in request.headers.getall("Prefer", ()):
        for token in value.split(","):
            if token.split(";", 1)[0].strip().lower() == PREFER_ASYNC:
                return True
    return False


def task_origin(request: web.Request) -> str | None:
    """The origin a task's run was sent with (:data:`ORIGIN_HEADER`), honoured only from a
    run-token credential (which only a task worker has)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not is_run_token(token.strip()):
        return None
    origin = request.headers.get(ORIGIN_HEADER, "")
    return origin if origin.startswith(("http://", "https://")) and len(origin) <= 512 else None


def request_origin(request: web.Request) -> str:
    """scheme://host the client reached (``public_base_url`` when set)."""
    base = request.app[SETTINGS].public_base_url
    return base.rstrip("/") if base else f"{request.scheme}://{request.host}"


async def defer(
    request: web.Request,
    credential: billing_pb.Credential,
    usage: Sequence[billing_pb.Usage],
    idempotency: billing_pb.IdempotencyKey | None = None,
) -> web.Response | billing_pb.StoredResponse | None:
    """Queues a checked request as a task and answers 202, or None to answer it now (or, for
    an Idempotency-Key whose earlier request finished, that request's stored answer).

    Only a request that asked for it is deferred, and only when its body can be replayed:
    a JSON body is stored as it came; a multipart body only when ``POST /v1/tasks`` stored it
    (a client's ``Prefer: respond-async`` on an upload is ignored, as RFC 7240 allows).
    """
    if not wants_async(request):
        return None
    store = request.app[MEDIA]
    media_id = _signed_input(request)
    if media_id is None:
        if request.content_type != "application/json":
            return None
        media_id = await store.put_async(await request.read(), INPUT_MIME)
    callback = request.headers.get(CALLBACK_HEADER, "")
    if callback:  # the address is checked again before every delivery (edge.webhooks)
        check_webhook_url(callback, request.app[SETTINGS].webhook_allowed_hosts, name="X-Callback-URL")
    settings = request.app[SETTINGS]
    try:
        response = await request.app[UPSTREAMS].tasks.call(
            "CreateTask",
            task_pb.CreateTaskRequest(
                credential=credential,
                usage=usage,
                request_id=request[REQUEST_ID],
                model=_model_of(usage),
                route=f"{request.method} {request.path_qs}",
                input_media_id=media_id,
                content_type=request.headers.get("Content-Type", "application/json"),
                callback_url=callback,
                ttl_seconds=settings.task_hold_seconds,
                origin=request_origin(request),
                # A repeat of the key while the task is queued or runs is a 409, never a second task.
                idempotency=(
                    billing_pb.IdempotencyKey(key=idempotency.key, fingerprint=idempotency.fingerprint)
                    if idempotency is not None
                    else None
                ),
            ),
            request[REQUEST_ID],
        )
    except BaseException:
        await store.delete_async(media_id)
        raise
    if response.HasField("replay"):  # the key's earlier request finished: its answer again
        await store.delete_async(media_id)
        return response.replay
    request.app[WAKE].set()
    document = task_document(task_record(response.task))
    return web.json_response(
        document,
        status=202,
        headers={"Location": f"/v1/tasks/{response.task.id}", "Preference-Applied": PREFER_ASYNC},
    )


def _model_of(usage: Sequence[billing_pb.Usage]) -> str:
    for item in usage:
        kind = item.WhichOneof("kind")
        if kind is not None:
            return str(getattr(item, kind).model)
    return ""


# --- promotion: a request that runs past the wait becomes a task ---

#: Routes of OpenAI's API: its SDKs cannot follow a 202, so these are promoted only when
#: ``sync_wait_openai_routes`` says so.
OPENAI_ROUTES = frozenset(
    {"/v1/chat/completions", "/v1/images/generations", "/v1/images/edits", "/v1/audio/speech"}
)
#: Runs of adopted requests (kept so that the edge's shutdown can cancel them).
ADOPTED = web.AppKey("task_adopted", set)


def promotion_wait(request: web.Request, streamed: bool) -> float | None:
    """Seconds a paid request may run before it is answered 202 as a task (None: never).

    Off unless ``sync_wait_seconds`` is set; never for a streamed answer, a task's own run,
    or (unless ``sync_wait_openai_routes``) OpenAI's routes."""
    settings = request.app[SETTINGS]
    wait = settings.sync_wait_seconds
    if wait is None or streamed or task_origin(request) is not None:
        return None
    if request.path in OPENAI_ROUTES and not settings.sync_wait_openai_routes:
        return None
    return wait


async def promote(
    request: web.Request, reservation_id: str, usage: Sequence[billing_pb.Usage], job: asyncio.Future[Any]
) -> web.StreamResponse:
    """Answers 202 with a task for a request still running (``job``), which goes on in the
    background under the task's lease; if billing cannot make the task, waits for the job."""
    settings = request.app[SETTINGS]
    callback = request.headers.get(CALLBACK_HEADER, "")
    try:
        if callback:
            check_webhook_url(callback, settings.webhook_allowed_hosts, name="X-Callback-URL")
        adopted = await request.app[UPSTREAMS].tasks.call(
            "AdoptTask",
            task_pb.AdoptTaskRequest(
                reservation_id=reservation_id,
                model=_model_of(usage),
                route=f"{request.method} {request.path_qs}",
                origin=request_origin(request),
                worker_id=f"edge-{secrets.token_hex(4)}",
                lease_seconds=settings.task_lease_seconds,
                callback_url=callback,
            ),
            request[REQUEST_ID],
        )
    except KilnError as err:
        log.warning(
            "request %s: not promoted to a task (%s); answering it when done",
            request[REQUEST_ID],
            err.message,
        )
        return await cast("asyncio.Future[web.StreamResponse]", job)
    run = TaskRun(request.app, adopted.task, adopted.run_token)
    background = asyncio.ensure_future(run.execute(run.response_outcome(job)))
    running = request.app[ADOPTED]
    running.add(background)
    background.add_done_callback(running.discard)
    document = task_document(task_record(adopted.task))
    return web.json_response(document, status=202, headers={"Location": f"/v1/tasks/{adopted.task.id}"})


# --- the worker ---


async def _sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, bytes]]:
    """(event, data) of a server-sent event stream."""
    event, data = "message", b""
    async for raw in response.content:
        line = raw.rstrip(b"\r\n")
        if not line:
            if data:
                yield event, data
            event, data = "message", b""
        elif line.startswith(b"event:"):
            event = line[6:].strip().decode()
        elif line.startswith(b"data:"):
            data += line[5:].strip()
    if data:
        yield event, data


def _failure(message: str, error_type: str = "processing_error") -> bytes:
    """A failed run's error: the contract's envelope, as the route would have answered."""
    return envelope_json(message, error_type)


#: How a run ended: status, output JSON, error JSON, files stored for the answer.
Outcome = tuple[str, bytes, bytes, list[billing_pb.MediaRecord]]


class TaskRun:
    """One claimed task, replayed against this edge."""

    def __init__(self, app: web.Application, task: task_pb.Task, run_token: str) -> None:
        self.app = app
        self.task = task
        self.run_token = run_token
        self.step = 0
        self.total = 0

    async def execute(self, outcome: Awaitable[Outcome] | None = None) -> None:
        """Runs the task (``outcome``: an adopted request's own work, else a replay of its stored
        request) while renewing its lease, then records how it ended."""
        settings = self.app[SETTINGS]
        lease = settings.task_lease_seconds
        work = asyncio.ensure_future(outcome if outcome is not None else self._attempts())
        cancelled = False
        try:
            while not work.done():
                # Renewals carry progress and bring cancellations: at most RENEW_SECONDS apart.
                await asyncio.wait({work}, timeout=min(lease / 3, RENEW_SECONDS))
                if work.done():
                    break
                try:
                    renewed = await self.app[UPSTREAMS].tasks.call(
                        "RenewTask",
                        task_pb.RenewTaskRequest(
                            task_id=self.task.id,
                            run_token=self.run_token,
                            lease_seconds=lease,
                            progress_step=self.step,
                            progress_total=self.total,
                        ),
                    )
                except KilnError as err:  # billing unreachable: keep working; the lease may lapse
                    log.warning("task %s: lease renewal failed: %s", self.task.id, err.message)
                    continue
                if renewed.cancel_requested or renewed.lost:
                    cancelled = renewed.cancel_requested
                    work.cancel()
                    if renewed.lost:
                        log.warning("task %s: the lease was lost; the run stops", self.task.id)
                        return
            status, output, error, media = (
                work.result() if not work.cancelled() else ("cancelled", b"", b"", [])
            )
        except asyncio.CancelledError:
            work.cancel()
            raise
        if cancelled:
            status, error = "cancelled", cancelled_task_error()
        finished = await self.app[UPSTREAMS].tasks.call(
            "FinishTask",
            task_pb.FinishTaskRequest(
                task_id=self.task.id,
                run_token=self.run_token,
                status=_FINISH[status],
                output_json=output,
                error_json=error,
                media=media,
                progress_step=self.step,
                progress_total=self.total,
            ),
        )
        if finished.task.callback_url:
            self.app[WEBHOOK_DELIVERER].wake()  # its webhook is in the outbox: send it now

    async def _attempts(self) -> Outcome:
        """:meth:`_replay`, again after a transient refusal (a model still loading, maintenance,
        a rate limit: nothing was held by it) with backoff, until ``task_retry_seconds`` ran out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.app[SETTINGS].task_retry_seconds
        delay = 1.0
        while True:
            try:
                return await self._replay()
            except _Transient as refused:
                wait = max(delay, refused.retry_after or 0.0)
                if loop.time() + wait > deadline:
                    return "failed", b"", refused.error, []
                log.info("task %s: retrying in %.0f s after a transient refusal", self.task.id, wait)
                await asyncio.sleep(wait)
                delay = min(delay * 2, 30.0)

    async def _replay(self) -> Outcome:
        """Sends the task's request to this edge; (status, output, error, stored files)."""
        app = self.app
        body = await app[MEDIA].read_async(self.task.input_media_id)
        if body is None:
            return "failed", b"", _failure("The task's input is no longer stored."), []
        method, _, path = self.task.route.partition(" ")
        headers = {
            "Authorization": f"Bearer {self.run_token}",
            "Content-Type": self.task.content_type,
            "Accept": "text/event-stream, application/json;q=0.9, */*;q=0.8",
            "X-Request-ID": self.task.id,
            ORIGIN_HEADER: self.task.origin,
        }
        base = await app[SELF_URL]
        async with app[SESSION].request(method, f"{base}{path}", data=body, headers=headers) as response:
            kind = response.content_type
            if response.status in TRANSIENT_STATUSES:
                raise _Transient(await _bounded(response), _retry_after(response.headers.get("Retry-After")))
            if response.status >= 400:
                return "failed", b"", await _bounded(response), []
            if kind == "text/event-stream":
                async for event, data in _sse_events(response):
                    if event == "progress":
                        progress = json.loads(data)
                        self.step, self.total = (
                            int(progress.get("step", 0)),
                            int(progress.get("total_steps", 0)),
                        )
                    elif event == "result":
                        return "completed", data, b"", []
                    elif event == "error":
                        return "failed", b"", data, []
                return "failed", b"", _failure("The task's answer ended early."), []
            if kind == "application/json":
                return "completed", await response.read(), b"", []
            return await self._file(response)

    async def _file(self, response: aiohttp.ClientResponse) -> Outcome:
        return await self.file_outcome(await response.read(), response.content_type, response.headers)

    async def file_outcome(self, data: bytes, mime: str, headers: Mapping[str, str]) -> Outcome:
        """A file answer: its URL (the route stored it, ``Content-Location``) or stored here."""
        location = headers.get("Content-Location", "")
        records: list[billing_pb.MediaRecord] = []
        if not location.startswith("/v1/media/"):
            store = self.app[MEDIA]
            media_id = await store.put_async(data, mime if mime in _STORABLE else INPUT_MIME)
            location = f"/v1/media/{media_id}"
            records.append(
                billing_pb.MediaRecord(media_id=media_id, kind="output", mime_type=mime, size_bytes=len(data))
            )
        output: dict[str, Any] = {
            "url": f"{self.task.origin}{location}",
            "content_type": mime,
            "size_bytes": len(data),
        }
        for name, value in headers.items():
            if name.lower().startswith("x-") and name.lower() not in ("x-request-id",):
                output.setdefault("headers", {})[name] = value
        return "completed", json.dumps(output).encode(), b"", records

    async def response_outcome(self, job: Awaitable[web.StreamResponse]) -> Outcome:
        """An adopted request's answer (a plain response its handler built) as the task's outcome."""
        try:
            response = await job
        except KilnError as err:
            return "failed", b"", _failure(err.message, str(err.error_type)), []
        except Exception:
            log.exception("task %s: the request failed", self.task.id)
            return (
                "failed",
                b"",
                _failure("Internal error while processing the request."),
                [],
            )
        if not isinstance(response, web.Response) or not isinstance(response.body, bytes):
            return "failed", b"", _failure("The answer could not be kept."), []
        if response.content_type == "application/json":
            return "completed", response.body, b"", []
        return await self.file_outcome(response.body, response.content_type, response.headers)


#: Longest time between two renewals of a running task (progress, cancellation).
RENEW_SECONDS = 2.0
#: Answers that say "not now" rather than "no": the run is tried again (``_attempts``).
TRANSIENT_STATUSES = frozenset({429, 503})


class _Transient(Exception):
    def __init__(self, error: bytes, retry_after: float | None) -> None:
        super().__init__("transient refusal")
        self.error = error
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    try:
        return min(300.0, max(0.0, float(value))) if value else None
    except ValueError:
        return None


async def _bounded(response: aiohttp.ClientResponse, limit: int = 64 * 1024) -> bytes:
    data = await response.content.read(limit)
    try:
        json.loads(data)
    except ValueError:
        return _failure(f"The task failed with HTTP {response.status}.")
    return data


_FINISH = {
    "completed": task_pb.TASK_STATUS_COMPLETED,
    "failed": task_pb.TASK_STATUS_FAILED,
    "cancelled": task_pb.TASK_STATUS_CANCELLED,
}


_STORABLE = frozenset(MIME_EXTENSIONS)


class TaskWorker:
    """Claims and runs tasks, ``slots`` at a time, until cancelled."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.worker_id = f"edge-{secrets.token_hex(4)}"
        self.running: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        app = self.app
        settings = app[SETTINGS]
        slots = asyncio.Semaphore(settings.task_workers)
        await app[SELF_URL]
        wake = app[WAKE]
        while True:
            await slots.acquire()
            wake.clear()  # before the claim: a task created while it runs wakes the next wait
            try:
                claimed = await app[UPSTREAMS].tasks.call(
                    "ClaimTask",
                    task_pb.ClaimTaskRequest(
                        worker_id=self.worker_id, lease_seconds=settings.task_lease_seconds
                    ),
                )
            except KilnError as err:
                slots.release()
                log.warning("task worker: claiming failed: %s", err.message)
                await asyncio.sleep(settings.task_poll_seconds)
                continue
            if not claimed.HasField("task"):
                slots.release()
                try:
                    await asyncio.wait_for(wake.wait(), settings.task_poll_seconds)
                except TimeoutError:
                    pass
                continue
            job = asyncio.ensure_future(self._run_one(claimed.task, claimed.run_token, slots))
            self.running.add(job)
            job.add_done_callback(self.running.discard)

    async def _run_one(self, task: task_pb.Task, run_token: str, slots: asyncio.Semaphore) -> None:
        try:
            await TaskRun(self.app, task, run_token).execute()
        except asyncio.CancelledError:
            raise
        except Exception:  # the lease lapses and another run (or this edge's next claim) takes over
            log.exception("task %s: the run failed", task.id)
        finally:
            slots.release()
            self.app[WAKE].set()  # a slot is free: look for the next task at once


async def tasks_ctx(app: web.Application) -> AsyncIterator[None]:
    """The task worker of this edge (runs once :func:`announce_self` gave it the edge's URL)."""
    app[SELF_URL] = asyncio.get_running_loop().create_future()
    app[WAKE] = asyncio.Event()
    app[SESSION] = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10), auto_decompress=True
    )
    app[ADOPTED] = set()
    worker = TaskWorker(app)
    loop_task = asyncio.ensure_future(worker.run()) if app[SETTINGS].task_workers > 0 else None
    yield
    if loop_task is not None:
        loop_task.cancel()
    for job in [*worker.running, *app[ADOPTED]]:
        job.cancel()
    pending = [t for t in (loop_task, *worker.running, *app[ADOPTED]) if t is not None]
    await asyncio.gather(*pending, return_exceptions=True)
    await app[SESSION].close()


def announce_self(app: web.Application, url: str) -> None:
    """Tells the task worker where this edge listens (after its site started)."""
    future = app[SELF_URL]
    if not future.done():
        future.set_result(url.rstrip("/"))


def decoded_file(value: str, field: str) -> tuple[bytes, str]:
    """A task input's file: base64 or a ``data:`` URL -> (bytes, media type)."""
    mime = "application/octet-stream"
    if value.startswith("data:"):
        head, sep, value = value.partition(",")
        if not sep or ";base64" not in head:
            raise InvalidRequest(f"'{field}' must be a base64 data: URL or base64")
        mime = head[5:].split(";", 1)[0] or mime
    try:
        return base64.b64decode(value, validate=True), mime
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"'{field}' is not valid base64") from None
