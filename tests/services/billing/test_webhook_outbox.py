"""The webhook outbox and secrets (services.billing.webhooks) on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook

from services.billing.ledger import Ledger
from services.billing.store import Tx
from services.billing.webhooks import (
    MAX_ERROR_CHARS,
    Webhooks,
    enqueue_webhook,
    next_delay_seconds,
    task_webhook_summary,
)
from services.common.errors import InvalidRequest, NotFound

from .billing_fakes import FakeClock

SCHEDULE = (0.0, 5.0, 60.0, 600.0)
URL = "https://hooks.example.com/kiln"


@pytest.fixture
def webhooks(ledger: Ledger, clock: FakeClock) -> Webhooks:
    # rng 0.5: no jitter, so the waits are the schedule's exactly
    return Webhooks(ledger.db, schedule=SCHEDULE, clock=clock, rng=lambda: 0.5)


async def _account(ledger: Ledger) -> str:
    return (await ledger.create_account("hooks")).id


async def _enqueue(webhooks: Webhooks, account_id: str, task_id: str = "task_1", url: str = URL) -> str:
    return await webhooks.enqueue(
        account_id=account_id,
        task_id=task_id,
        url=url,
        event_type="task.completed",
        payload=b'{"id": "%s", "status": "completed"}' % task_id.encode(),
    )


async def test_a_message_is_claimed_once_per_lease_and_taken_over_when_the_lease_expires(
    ledger: Ledger, webhooks: Webhooks, clock: FakeClock
) -> None:
    account_id = await _account(ledger)
    message_id = await _enqueue(webhooks, account_id)
    assert message_id.startswith("msg_")

    [first] = await webhooks.claim(limit=10, lease_ms=30_000)
    assert first.message.id == message_id and first.attempt == 1
    assert first.payload == b'{"id": "task_1", "status": "completed"}'
    assert first.message.account_id == account_id and first.message.task_id == "task_1"
    assert len(first.secrets) == 1 and first.secrets[0].startswith("whsec_")
    assert await webhooks.claim(limit=10, lease_ms=30_000) == []  # leased

    clock.advance(31)  # the claimer died: another takes the message over
    [second] = await webhooks.claim(limit=10, lease_ms=30_000)
    assert second.message.id == message_id and second.attempt == 1
    assert second.lease_token != first.lease_token

    # the first claimer's late outcome is logged but changes nothing
    late = await webhooks.record(message_id=message_id, lease_token=first.lease_token, status=200)
    assert not late.applied and late.state == "pending"
    done = await webhooks.record(message_id=message_id, lease_token=second.lease_token, status=204)
    assert done.applied and done.state == "delivered"
    message = await webhooks.message(message_id)
    assert message.state == "delivered" and message.delivered_at_ms is not None
    assert message.attempts == 2 and message.last_status == 204 and message.last_error is None
    assert [a.status for a in await webhooks.attempts(message_id)] == [200, 204]
    assert await webhooks.claim(limit=10, lease_ms=30_000) == []


async def test_concurrent_claimers_never_get_the_same_message(ledger: Ledger, webhooks: Webhooks) -> None:
    account_id = await _account(ledger)
    ids = {await _enqueue(webhooks, account_id, f"task_{n}") for n in range(40)}
    batches = await asyncio.gather(*(webhooks.claim(limit=8, lease_ms=60_000) for _ in range(6)))
    claimed = [d.message.id for batch in batches for d in batch]
    assert len(claimed) == len(set(claimed)) == 40
    assert set(claimed) == ids


async def test_failures_back_off_on_the_schedule_honour_retry_after_and_end_as_a_dead_letter(
    ledger: Ledger, webhooks: Webhooks, clock: FakeClock
) -> None:
    account_id = await _account(ledger)
    message_id = await _enqueue(webhooks, account_id, "task_dead")

    async def attempt(status: int, retry_after: float | None = None, error: str = "") -> None:
        [delivery] = await webhooks.claim(limit=1, lease_ms=30_000)
        await webhooks.record(
            message_id=delivery.message.id,
            lease_token=delivery.lease_token,
            status=status,
            error=error,
            duration_ms=12,
            retry_after_seconds=retry_after,
        )

    start = webhooks.now_ms()
    await attempt(503, retry_after=30)  # longer than the schedule's 5 s: honoured
    assert (await webhooks.message(message_id)).next_attempt_at_ms == start + 30_000
    clock.advance(29)
    assert await webhooks.claim(limit=1, lease_ms=30_000) == []
    clock.advance(1)
    await attempt(429, retry_after=99_999)  # capped at the schedule's longest wait
    assert (await webhooks.message(message_id)).next_attempt_at_ms == webhooks.now_ms() + 600_000
    clock.advance(600)
    await attempt(0, error="x" * 5000)  # no answer; the error is kept truncated
    message = await webhooks.message(message_id)
    assert message.next_attempt_at_ms == webhooks.now_ms() + 600_000  # the schedule's step 3
    assert message.last_status == 0 and message.last_error is not None
    assert len(message.last_error) == MAX_ERROR_CHARS
    clock.advance(600)
    await attempt(500)  # the schedule's last attempt: the dead letter
    message = await webhooks.message(message_id)
    assert message.state == "dead" and message.attempts == 4 and message.last_status == 500
    assert message.last_error == "HTTP 500"
    clock.advance(10_000)
    assert await webhooks.claim(limit=1, lease_ms=30_000) == []
    log = await webhooks.attempts(message_id)
    assert [(a.attempt, a.status) for a in log] == [(1, 503), (2, 429), (3, 0), (4, 500)]
    assert all(a.duration_ms == 12 for a in log)
    summary = await ledger.db.run(lambda tx: task_webhook_summary(tx, "task_dead"), write=False)
    assert summary == {"state": "dead", "attempts": 4, "last_status": 500, "last_error": "HTTP 500"}


def test_the_waits_get_jitter_and_the_schedule_bounds_the_attempts() -> None:
    assert next_delay_seconds(SCHEDULE, 1, rng=lambda: 0.0) == pytest.approx(4.0)
    assert next_delay_seconds(SCHEDULE, 1, rng=lambda: 1.0) == pytest.approx(6.0)
    assert next_delay_seconds(SCHEDULE, 2, rng=lambda: 0.5) == pytest.approx(60.0)
    assert next_delay_seconds(SCHEDULE, 1, retry_after_seconds=2, rng=lambda: 0.5) == pytest.approx(5.0)
    assert next_delay_seconds(SCHEDULE, 4) is None


async def test_a_410_disables_the_endpoint_and_later_messages_are_kept_unsent(
    ledger: Ledger, webhooks: Webhooks
) -> None:
    account_id = await _account(ledger)
    other_url = "https://other.example.com/hook"
    first = await _enqueue(webhooks, account_id, "task_a")
    second = await _enqueue(webhooks, account_id, "task_b")
    elsewhere = await _enqueue(webhooks, account_id, "task_c", url=other_url)
    claimed = {d.message.id: d for d in await webhooks.claim(limit=10, lease_ms=30_000)}
    delivery = claimed[first]
    outcome = await webhooks.record(message_id=first, lease_token=delivery.lease_token, status=410)
    assert outcome.applied and outcome.state == "disabled"
    assert (await webhooks.message(first)).last_status == 410
    assert (await webhooks.message(second)).state == "disabled"  # same endpoint: not sent either
    assert (await webhooks.message(elsewhere)).state == "pending"
    assert await webhooks.endpoint_disabled(account_id, URL)

    later = await _enqueue(webhooks, account_id, "task_d")
    message = await webhooks.message(later)
    assert message.state == "disabled" and message.last_error is not None and "410" in message.last_error
    late = await webhooks.record(message_id=second, lease_token=claimed[second].lease_token, status=200)
    assert not late.applied and late.state == "disabled"  # claimed before the 410: its send is moot
    # another account's endpoint of the same URL is not affected
    stranger = await _account(ledger)
    assert (await webhooks.message(await _enqueue(webhooks, stranger, "task_e"))).state == "pending"

    assert await webhooks.enable_endpoint(account_id, URL)
    assert (await webhooks.message(await _enqueue(webhooks, account_id, "task_f"))).state == "pending"


async def test_a_rotated_secret_signs_beside_the_new_one_for_its_grace_period(
    ledger: Ledger, webhooks: Webhooks, clock: FakeClock
) -> None:
    account_id = await _account(ledger)
    original = await webhooks.secrets(account_id)
    assert original.secret.startswith("whsec_")
    assert len(base64.b64decode(original.secret.removeprefix("whsec_"))) == 32
    assert (await webhooks.secrets(account_id)).secret == original.secret  # stable

    rotated = await webhooks.rotate_secret(account_id, grace_ms=3_600_000)
    assert rotated.secret != original.secret and rotated.previous_secret == original.secret
    await _enqueue(webhooks, account_id)
    [delivery] = await webhooks.claim(limit=1, lease_ms=30_000)
    assert delivery.secrets == (rotated.secret, original.secret)
    # both signatures in one header: a receiver on either secret verifies the message
    when = datetime.fromtimestamp(clock.now, tz=UTC)
    signature = " ".join(
        Webhook(s).sign(delivery.message.id, when, delivery.payload) for s in delivery.secrets
    )
    headers = {
        "webhook-id": delivery.message.id,
        "webhook-timestamp": str(int(clock.now)),
        "webhook-signature": signature,
    }
    with pytest.MonkeyPatch.context() as patch:  # the library checks the timestamp against now
        patch.setattr("standardwebhooks.webhooks.datetime", _FrozenDatetime(when))
        for secret in (rotated.secret, original.secret):
            assert Webhook(secret).verify(delivery.payload, headers)["status"] == "completed"

    clock.advance(3601)
    assert (await webhooks.secrets(account_id)).signing_secrets(webhooks.now_ms()) == (rotated.secret,)
    again = await webhooks.rotate_secret(account_id, grace_ms=0)
    assert again.signing_secrets(webhooks.now_ms()) == (again.secret,)
    with pytest.raises(InvalidRequest):
        await webhooks.rotate_secret(account_id, grace_ms=-1)
    with pytest.raises(NotFound):
        await webhooks.secrets("acct_missing")


async def test_enqueue_runs_inside_the_callers_transaction(ledger: Ledger, webhooks: Webhooks) -> None:
    account_id = await _account(ledger)

    def finish_task_then_fail(tx: Tx) -> None:
        enqueue_webhook(
            tx,
            account_id=account_id,
            task_id="task_rolled_back",
            url=URL,
            event_type="task.failed",
            payload=b"{}",
            now_ms=webhooks.now_ms(),
        )
        raise RuntimeError("the task's own update failed")

    with pytest.raises(RuntimeError):
        await ledger.db.run(finish_task_then_fail)
    assert await webhooks.task_deliveries("task_rolled_back") == []
    for bad in ("ftp://x.example.com/", "", "https://x.example.com/" + "a" * 3000):
        with pytest.raises(InvalidRequest):
            await _enqueue(webhooks, account_id, url=bad)
    with pytest.raises(NotFound):
        await _enqueue(webhooks, "acct_missing")


class _FrozenDatetime:
    """Stands in for ``datetime`` in the library's module: ``now`` is the fake clock's."""

    def __init__(self, when: datetime) -> None:
        self._when = when

    def now(self, tz: object = None) -> datetime:
        return self._when

    def __getattr__(self, name: str) -> object:
        return getattr(datetime, name)
