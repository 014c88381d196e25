"""Delivering task webhooks: the edge's worker that empties billing's outbox.

Billing keeps the outbox (``services.billing.webhooks``; a message is written in the
transaction that finishes its task). Every edge runs one :class:`WebhookDeliverer` while
it runs (:func:`webhooks_ctx`, a cleanup context of the app), which loops:

1. **claim** the due messages from billing's ``WebhookService`` (at most as many as it has
   free sending slots, ``webhook_concurrency``), each leased for longer than one attempt
   can take, so no other edge sends it meanwhile; with nothing due, wait
   ``webhook_poll_seconds`` (or until :meth:`WebhookDeliverer.wake`);
2. **send** each in its own task: the raw payload bytes POSTed with the Standard Webhooks
   headers, signed with the ``standardwebhooks`` library (``webhook-id`` is the message
   id, the same on every attempt; ``webhook-signature`` holds one ``v1,`` signature per
   secret of the account, two during a rotation's grace period), within
   ``webhook_timeout_seconds``, redirects not followed (a 3xx is a failed attempt), at most
   :data:`MAX_RESPONSE_BYTES` of the answer read;
3. **record** the outcome with billing, which decides what follows (delivered, retried
   after the schedule's next wait or the receiver's ``Retry-After``, dead letter, or the
   endpoint disabled by a 410).

The target gets the SSRF checks of remote images (``edge.fetch``): https only, an IP
literal must be public, a host name must resolve to public addresses only and the
connection goes to the addresses checked. ``webhook_allowed_hosts`` (tests) lists hosts
(``host`` or ``host:port``) let through whatever their address, over http too. A refused
target is a failed attempt (status 0) whose error says why.

A deliverer that stops (the edge shuts down) abandons its attempts in flight: their leases
expire and the messages are sent again, by this edge or another (at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import aiohttp
import grpc
from aiohttp import web
from standardwebhooks import Webhook
from yarl import URL

from edge.clients import _call, _Client
from edge.fetch import REDIRECT_STATUSES, UnsafeAddress, check_host, host_allowed, image_session
from edge.keys import SETTINGS, UPSTREAMS
from edge.metrics import METRICS, EdgeMetrics
from kiln.billing.v1 import webhook_service_pb2 as pb
from kiln.billing.v1 import webhook_service_pb2_grpc as pb_grpc
from services.common.errors import InvalidRequest, KilnError, quoted
from services.common.mesh_auth import EDGE, mesh_secret, mesh_token
from services.common.settings import Settings

log = logging.getLogger("kiln.edge.webhooks")

#: Most bytes of a receiver's answer read (its start goes into the attempt's error).
MAX_RESPONSE_BYTES = 4096
#: A lease outlives the attempt's deadline by this much (the RPCs around it, a busy loop).
LEASE_MARGIN_SECONDS = 30
#: Characters of a failed answer's body kept in the attempt's error.
ERROR_BODY_CHARS = 200
USER_AGENT = "Kiln-Webhooks/1"


def check_webhook_url(
    url: str | URL, allowed_hosts: Sequence[str] = (), *, name: str = "callback_url"
) -> URL:
    """The URL a webhook may be sent to, or InvalidRequest saying why not.

    https, and a host that is a name (its addresses are checked when it is resolved) or a
    public IP literal; a host in ``allowed_hosts`` (``host`` or ``host:port``) passes
    whatever its address, over http or https. The tasks API checks ``callback_url`` with it
    when a task is submitted; the deliverer again before every attempt.
    """
    try:
        target = URL(url) if isinstance(url, str) else url
    except (ValueError, TypeError):
        raise InvalidRequest(f"{name}: not a valid URL") from None
    host = target.raw_host
    if target.scheme not in ("https", "http") or not host or not target.is_absolute():
        raise InvalidRequest(f"{name}: an https:// URL is required")
    if target.user is not None or target.password is not None:
        raise InvalidRequest(f"{name}: the URL must not carry a user name or password")
    if host_allowed(host, target.port, allowed_hosts):
        return target
    if target.scheme != "https":
        raise InvalidRequest(f"{name}: only https:// URLs are accepted")
    try:
        check_host(host)
    except UnsafeAddress as exc:
        raise InvalidRequest(f"{name}: {exc}") from None
    return target


def signed_headers(message_id: str, payload: bytes, secrets: Sequence[str], when: datetime) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt: one ``v1,`` signature per secret."""
    if not secrets:
        raise ValueError("a webhook needs at least one signing secret")
    signature = " ".join(Webhook(secret).sign(message_id, when, payload) for secret in secrets)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(math.floor(when.timestamp())),
        "webhook-signature": signature,
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
    }


def parse_retry_after(value: str | None, now: float) -> float | None:
    """A ``Retry-After`` header (seconds, or an HTTP date) as seconds from ``now``; None when
    absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


class WebhookClient(_Client):
    """The edge's calls to billing's ``WebhookService``."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float, token: str) -> None:
        super().__init__(pb_grpc.WebhookServiceStub(channel), timeout=timeout, token=token)

    async def claim(self, *, max_messages: int, lease_seconds: int) -> list[pb.WebhookDelivery]:
        request = pb.ClaimDeliveriesRequest(max_messages=max_messages, lease_seconds=lease_seconds)
        reply = await _call(
            self._stub.ClaimDeliveries(request, timeout=self._timeout, metadata=self._metadata("-"))
        )
        return list(reply.deliveries)

    async def record(self, request: pb.RecordAttemptRequest) -> pb.RecordAttemptResponse:
        return await _call(
            self._stub.RecordAttempt(
                request, timeout=self._timeout, metadata=self._metadata(request.message_id)
            )
        )

    async def task_deliveries(self, task_id: str, account_id: str = "") -> list[pb.TaskDelivery]:
        request = pb.ListTaskDeliveriesRequest(task_id=task_id, account_id=account_id)
        reply = await _call(
            self._stub.ListTaskDeliveries(request, timeout=self._timeout, metadata=self._metadata(task_id))
        )
        return list(reply.deliveries)


class WebhookDeliverer:
    """Claims due messages from billing and sends them (see the module docstring)."""

    def __init__(
        self, client: WebhookClient, settings: Settings, *, metrics: EdgeMetrics | None = None
    ) -> None:
        self._client = client
        self._metrics = metrics or EdgeMetrics()
        self._timeout = settings.webhook_timeout_seconds
        self._poll = settings.webhook_poll_seconds
        self._concurrency = settings.webhook_concurrency
        self._allowed_hosts = tuple(settings.webhook_allowed_hosts)
        self._lease_seconds = math.ceil(self._timeout + LEASE_MARGIN_SECONDS)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slot_free = asyncio.Event()
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Claims at once instead of at the next poll (e.g. right after a task finished)."""
        self._wake.set()

    async def run_forever(self) -> None:
        """Delivers until cancelled; a failing round is logged and retried at the next poll."""
        session = image_session(timeout_seconds=self._timeout, allow_hosts=self._allowed_hosts)
        try:
            failing = False  # log a failing billing once, not at every poll
            while True:
                self._wake.clear()  # before the claim: a wake-up during it is not lost
                try:
                    busy = await self.run_once(session)
                except Exception as exc:
                    if not failing:
                        detail = exc.message if isinstance(exc, KilnError) else repr(exc)
                        log.warning(
                            "webhooks: claiming from billing failed (%s); retrying every poll", detail
                        )
                    failing, busy = True, False
                else:
                    if failing:
                        log.info("webhooks: claiming from billing works again")
                    failing = False
                if not busy:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self._poll)
        finally:
            for task in self._in_flight:
                task.cancel()
            await asyncio.gather(*self._in_flight, return_exceptions=True)
            await session.close()

    async def run_once(self, session: aiohttp.ClientSession) -> bool:
        """Claims as many messages as there are free slots and starts sending them; True when
        every slot was filled (so more may be due at once)."""
        while len(self._in_flight) >= self._concurrency:
            self._slot_free.clear()
            await self._slot_free.wait()
        free = self._concurrency - len(self._in_flight)
        deliveries = await self._client.claim(max_messages=free, lease_seconds=self._lease_seconds)
        for delivery in deliveries:
            task = asyncio.create_task(self._deliver(session, delivery))
            self._in_flight.add(task)
            task.add_done_callback(self._done)
        return len(deliveries) >= free

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._slot_free.set()

    async def _deliver(self, session: aiohttp.ClientSession, delivery: pb.WebhookDelivery) -> None:
        message = delivery.message
        started = time.monotonic()
        status, error, retry_after = await self.send(session, delivery)
        record = pb.RecordAttemptRequest(
            message_id=message.id,
            lease_token=delivery.lease_token,
            status=status,
            error=error,
            duration_ms=round((time.monotonic() - started) * 1000),
        )
        if retry_after is not None:
            record.retry_after_seconds = retry_after
        self._metrics.webhook("failed" if error else "delivered")
        try:
            recorded = await self._client.record(record)
        except Exception as exc:  # the lease expires and the message is sent again: at least once
            detail = exc.message if isinstance(exc, KilnError) else repr(exc)
            log.warning(
                "webhooks: recording attempt %d of %s failed: %s", delivery.attempt, message.id, detail
            )
        else:
            if recorded.applied and recorded.message.state in _FINAL_FAILURES:
                self._metrics.webhook(_FINAL_FAILURES[recorded.message.state])
        if error:
            log.info(
                "webhooks: attempt %d of %s to %s failed: %s",
                delivery.attempt,
                message.id,
                message.url,
                error,
            )

    async def send(
        self, session: aiohttp.ClientSession, delivery: pb.WebhookDelivery
    ) -> tuple[int, str, float | None]:
        """One attempt: (HTTP status or 0, error or "", Retry-After seconds or None)."""
        message = delivery.message
        try:
            target = check_webhook_url(message.url, self._allowed_hosts, name="refused")
            headers = signed_headers(
                message.id, delivery.payload, list(delivery.signing_secrets), datetime.now(UTC)
            )
            async with session.post(
                target, data=delivery.payload, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                body = await response.content.read(MAX_RESPONSE_BYTES)
                retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
        except InvalidRequest as exc:
            return 0, exc.message, None
        except UnsafeAddress as exc:
            return 0, f"refused: {exc}", None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, UnsafeAddress):
                return 0, f"refused: {exc.os_error}", None
            return 0, f"could not connect ({exc.os_error})", None
        except TimeoutError:
            return 0, f"no answer within {self._timeout:g} seconds", None
        except (aiohttp.ClientError, ValueError) as exc:  # ValueError: a host IDNA cannot encode
            return 0, f"the request failed ({type(exc).__name__}: {str(exc)[:200]})", None
        if 200 <= status <= 299:
            return status, "", None
        if status in REDIRECT_STATUSES:
            location = quoted(response.headers.get("Location", ""))
            return status, f"HTTP {status}: redirects are not followed (Location: '{location}')", retry_after
        text = body[:ERROR_BODY_CHARS].decode("utf-8", "replace").strip()
        return status, f"HTTP {status}" + (f": {text}" if text else ""), retry_after


#: Message states an attempt can end a delivery in without success: their metrics outcome.
_FINAL_FAILURES = {pb.WEBHOOK_STATE_DEAD: "dead", pb.WEBHOOK_STATE_DISABLED: "disabled"}

WEBHOOK_DELIVERER = web.AppKey("webhook_deliverer", WebhookDeliverer)


async def webhooks_ctx(app: web.Application) -> AsyncIterator[None]:
    """The edge's cleanup context (after the upstreams'): the deliverer runs while the edge runs."""
    settings = app[SETTINGS]
    client = WebhookClient(
        app[UPSTREAMS].channels["billing"],
        timeout=settings.billing_timeout_seconds,
        token=mesh_token(mesh_secret(settings), EDGE),
    )
    deliverer = WebhookDeliverer(client, settings, metrics=app[METRICS])
    app[WEBHOOK_DELIVERER] = deliverer
    task = asyncio.create_task(deliverer.run_forever())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
