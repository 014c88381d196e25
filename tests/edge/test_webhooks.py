"""Task webhooks end to end: billing's outbox, the edge's deliverer, a receiver on loopback.

Billing and the edge run for real (``tests.stack.offline_stack``, once on SQLite and once on
PostgreSQL) with a short retry schedule and ``127.0.0.1`` allow-listed; messages are put in
the outbox as the tasks code does (``services.billing.webhooks``), and the receiver checks
them with the ``standardwebhooks`` library's own verifier.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import grpc
import pytest
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from yarl import URL

from edge.fetch import host_allowed
from edge.webhooks import check_webhook_url, parse_retry_after, signed_headers
from kiln.billing.v1 import webhook_service_pb2 as pb
from kiln.billing.v1 import webhook_service_pb2_grpc as pb_grpc
from services.billing.webhook_servicer import EDGE_ONLY_METHODS, READ_ONLY_METHODS, SERVICE_NAME
from services.billing.webhooks import WebhookMessage, Webhooks
from services.common.errors import InvalidRequest
from services.common.grpc_client import create_channel
from services.common.mesh_auth import mesh_secret, mesh_token
from tests.stack import OfflineStack, offline_stack, postgres_database

#: The last wait is the longest a Retry-After may ask for.
SCHEDULE = (0.0, 0.2, 0.2, 1.5)


@dataclass
class Receiver:
    """A webhook receiver on loopback that answers from a script (then 200)."""

    answers: list[int | tuple[int, dict[str, str]]]
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    port: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(({k.lower(): v for k, v in request.headers.items()}, await request.read()))
        answer = self.answers.pop(0) if self.answers else 200
        status, headers = answer if isinstance(answer, tuple) else (answer, {})
        return web.Response(status=status, text=f"answer {status}", headers=headers)


@contextlib.asynccontextmanager
async def receiver(answers: list[int | tuple[int, dict[str, str]]]) -> AsyncIterator[Receiver]:
    found = Receiver(list(answers))
    app = web.Application()
    app.router.add_post("/{tail:.*}", found.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    found.port = runner.addresses[0][1]
    try:
        yield found
    finally:
        await runner.cleanup()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[OfflineStack]:
    overrides: dict[str, object] = {
        "webhook_allowed_hosts": ("127.0.0.1",),
        "webhook_retry_schedule": SCHEDULE,
        "webhook_poll_seconds": 0.1,
        "webhook_timeout_seconds": 3.0,
    }
    with contextlib.ExitStack() as databases:
        if request.param == "postgresql":
            overrides["database_url"] = databases.enter_context(postgres_database())
        data_dir: Path = tmp_path_factory.mktemp("webhooks")
        async with offline_stack(data_dir, **overrides) as running:
            yield running


def outbox(stack: OfflineStack) -> Webhooks:
    return Webhooks(stack.ledger.db, schedule=SCHEDULE)


async def settled(webhooks: Webhooks, message_id: str, *, seconds: float = 20.0) -> WebhookMessage:
    """The message once it left state 'pending'."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        message = await webhooks.message(message_id)
        if message.state != "pending":
            return message
        await asyncio.sleep(0.05)
    raise AssertionError(f"{message_id} is still pending: {await webhooks.message(message_id)}")


async def enqueue(webhooks: Webhooks, account_id: str, task_id: str, url: str) -> str:
    payload = b'{"id":"%s","object":"task","status":"completed"}' % task_id.encode()
    return await webhooks.enqueue(
        account_id=account_id, task_id=task_id, url=url, event_type="task.completed", payload=payload
    )


async def test_a_receiver_that_fails_twice_gets_the_same_signed_message_a_third_time(
    stack: OfflineStack,
) -> None:
    webhooks = outbox(stack)
    account_id, _ = await stack.customer()
    secret = (await webhooks.secrets(account_id)).secret
    async with receiver([500, 500, 200]) as hook:
        message_id = await enqueue(webhooks, account_id, "task_retry", f"http://127.0.0.1:{hook.port}/hook")
        message = await settled(webhooks, message_id)
    assert message.state == "delivered" and message.attempts == 3 and message.last_status == 200
    assert len(hook.received) == 3
    assert {headers["webhook-id"] for headers, _ in hook.received} == {message_id}
    headers, body = hook.received[-1]
    assert headers["content-type"] == "application/json"
    assert Webhook(secret).verify(body, headers) == {
        "id": "task_retry",
        "object": "task",
        "status": "completed",
    }
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"completed", b"failed"), headers)
    with pytest.raises(WebhookVerificationError):  # another account's secret does not verify it
        other, _ = await stack.customer()
        Webhook((await webhooks.secrets(other)).secret).verify(body, headers)
    log = await webhooks.attempts(message_id)
    assert [(a.attempt, a.status) for a in log] == [(1, 500), (2, 500), (3, 200)]
    assert log[0].error.startswith("HTTP 500") and log[2].error == ""
    # the delivery log over the read-only RPC, which any mesh identity may call
    settings = stack.edge.settings
    token = mesh_token(mesh_secret(settings), "operator")
    async with create_channel(settings.address("billing"), token=token) as channel:
        stub = pb_grpc.WebhookServiceStub(channel)
        reply = await stub.ListTaskDeliveries(pb.ListTaskDeliveriesRequest(task_id="task_retry"))
        [delivery] = reply.deliveries
        assert delivery.message.id == message_id
        assert delivery.message.state == pb.WEBHOOK_STATE_DELIVERED
        assert [a.status for a in delivery.attempts] == [500, 500, 200]
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # leasing and secrets are the edge's
            await stub.ClaimDeliveries(pb.ClaimDeliveriesRequest())
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_rotated_secret_signs_both_ways_during_its_grace_period(stack: OfflineStack) -> None:
    webhooks = outbox(stack)
    account_id, _ = await stack.customer()
    old = (await webhooks.secrets(account_id)).secret
    new = (await webhooks.rotate_secret(account_id, grace_ms=60_000)).secret
    async with receiver([200]) as hook:
        message_id = await enqueue(webhooks, account_id, "task_rotated", f"http://127.0.0.1:{hook.port}/")
        assert (await settled(webhooks, message_id)).state == "delivered"
    headers, body = hook.received[0]
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        Webhook(secret).verify(body, headers)


async def test_a_loopback_receiver_off_the_allow_list_is_refused_and_logged(stack: OfflineStack) -> None:
    webhooks = outbox(stack)
    account_id, _ = await stack.customer()
    async with receiver([]) as hook:  # listening on 127.0.0.1 only: a request would never connect
        url = f"https://127.0.0.3:{hook.port}/hook"
        message_id = await enqueue(webhooks, account_id, "task_ssrf", url)
        message = await settled(webhooks, message_id)
    assert hook.received == []
    assert message.state == "dead" and message.attempts == len(SCHEDULE)
    log = await webhooks.attempts(message_id)
    assert len(log) == len(SCHEDULE) and {a.status for a in log} == {0}
    assert "loopback address" in log[0].error, log[0].error


async def test_a_410_disables_the_endpoint(stack: OfflineStack) -> None:
    webhooks = outbox(stack)
    account_id, _ = await stack.customer()
    async with receiver([410]) as hook:
        url = f"http://127.0.0.1:{hook.port}/gone"
        message_id = await enqueue(webhooks, account_id, "task_gone", url)
        message = await settled(webhooks, message_id)
        assert message.state == "disabled" and message.last_status == 410 and message.attempts == 1
        later = await enqueue(webhooks, account_id, "task_after_gone", url)
        assert (await webhooks.message(later)).state == "disabled"
        await asyncio.sleep(0.5)  # a few polls: nothing more is sent
    assert len(hook.received) == 1


async def test_retry_after_from_the_receiver_is_honoured(stack: OfflineStack) -> None:
    webhooks = outbox(stack)
    account_id, _ = await stack.customer()
    async with receiver([(503, {"Retry-After": "1"}), 200]) as hook:
        message_id = await enqueue(webhooks, account_id, "task_later", f"http://127.0.0.1:{hook.port}/")
        message = await settled(webhooks, message_id)
    assert message.state == "delivered"
    first, second = await webhooks.attempts(message_id)
    assert second.at_ms - first.at_ms >= 900  # not the schedule's 0.2 s


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = time.time()
    assert parse_retry_after("120", now) == 120.0
    later = datetime.fromtimestamp(now, tz=UTC) + timedelta(seconds=90)
    assert parse_retry_after(format_datetime(later, usegmt=True), now) == pytest.approx(90, abs=1.5)
    assert parse_retry_after(format_datetime(later - timedelta(hours=1), usegmt=True), now) == 0.0
    for unreadable in (None, "", "soon", "-5", "1.5"):
        assert parse_retry_after(unreadable, now) is None


def test_callback_urls_pass_the_checks_of_remote_images() -> None:
    assert check_webhook_url("https://hooks.example.com/x") == URL("https://hooks.example.com/x")
    refused: dict[str, str] = {
        "http://hooks.example.com/x": "only https",
        "https://127.0.0.1/x": "loopback",
        "https://169.254.169.254/latest": "link-local",
        "https://10.0.0.8/x": "private",
        "https://[::ffff:127.0.0.1]/x": "loopback",
        "https://[2002:7f00:1::]/x": "6to4",
        "https://2130706433/x": "neither a host name",
        "https://user:pw@hooks.example.com/x": "user name",
        "ftp://hooks.example.com/x": "https:// URL is required",
        "/relative": "https:// URL is required",
    }
    for url, reason in refused.items():
        with pytest.raises(InvalidRequest) as info:
            check_webhook_url(url)
        assert reason in info.value.message, (url, info.value.message)
    # the allow-list: host, or host:port
    assert check_webhook_url("http://127.0.0.1:8080/x", ("127.0.0.1",))
    assert check_webhook_url("http://localhost:8080/x", ("localhost:8080",))
    with pytest.raises(InvalidRequest):
        check_webhook_url("https://127.0.0.1:9090/x", ("127.0.0.1:8080",))
    assert host_allowed("::1", 80, ("[::1]:80",)) and not host_allowed("::1", 81, ("[::1]:80",))


def test_signatures_follow_the_standard() -> None:
    secrets = ("whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY")
    when = datetime.now(UTC)
    headers = signed_headers("msg_1", b'{"a":1}', secrets, when)
    assert headers["webhook-id"] == "msg_1" and headers["webhook-timestamp"] == str(int(when.timestamp()))
    assert all(part.startswith("v1,") for part in headers["webhook-signature"].split(" "))
    for secret in secrets:
        assert Webhook(secret).verify(b'{"a":1}', headers) == {"a": 1}


def test_every_webhook_rpc_is_either_edge_only_or_read_only() -> None:
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["WebhookService"].methods}
    assert set(EDGE_ONLY_METHODS) | set(READ_ONLY_METHODS) == methods
    assert not set(EDGE_ONLY_METHODS) & set(READ_ONLY_METHODS)
    assert SERVICE_NAME == "kiln.billing.v1.WebhookService"
