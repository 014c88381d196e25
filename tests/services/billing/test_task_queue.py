"""Billing's task queue (services.billing.tasks), on SQLite and on PostgreSQL: a task and its
hold are created, run, taken over and ended together."""

from __future__ import annotations

import asyncio
import json

import pytest

from services.billing.ledger import Authorization, Ledger, api_key_finder
from services.billing.tasks import NewTask, TaskStore, task_document
from services.common.errors import AuthenticationFailed, Conflict, InsufficientCredits, NotFound

from .billing_fakes import FakeClock
from .test_billing_ledger import assert_books_balance, funded

PRICE = 40  # hundredths


async def _customer(ledger: Ledger, credits: str = "1") -> tuple[str, str]:
    account = await funded(ledger, credits)
    _, key = await ledger.create_api_key(account.id)
    return account.id, key


async def create(store: TaskStore, key: str, price: int = PRICE, callback_url: str = "") -> Authorization:
    new = NewTask(
        "lanczos", "POST /v1/images/upscale", "m" * 24, "application/json", callback_url, "http://x"
    )
    return await store.ledger.authorize(
        api_key_finder(key), lambda account: [price], "req-1", 3600, then=store.creator(new)
    )


@pytest.fixture
def store(ledger: Ledger) -> TaskStore:
    return TaskStore(ledger)


async def test_a_task_is_queued_with_its_hold_in_one_transaction(store: TaskStore, ledger: Ledger) -> None:
    account_id, key = await _customer(ledger)
    task = await store.for_hold(await create(store, key))
    assert task.status == "pending" and task.held == PRICE and task.account_id == account_id
    assert (await ledger.get_account(account_id)).held == PRICE
    with pytest.raises(InsufficientCredits):  # 0.40 + 0.70 > 1: neither hold nor task
        await create(store, key, price=70)
    tasks, _ = await store.list(account_id)
    assert [t.id for t in tasks] == [task.id]
    await assert_books_balance(ledger, account_id)


async def test_another_accounts_task_is_not_found(store: TaskStore, ledger: Ledger) -> None:
    _, key = await _customer(ledger)
    other_id, _ = await _customer(ledger)
    task = await store.for_hold(await create(store, key))
    with pytest.raises(NotFound):
        await store.get(other_id, task.id)
    with pytest.raises(NotFound):
        await store.cancel(other_id, task.id)


async def test_cancelling_a_pending_task_releases_its_hold_and_a_finished_one_is_a_conflict(
    store: TaskStore, ledger: Ledger
) -> None:
    account_id, key = await _customer(ledger)
    task = await store.for_hold(await create(store, key))
    cancelled = await store.cancel(account_id, task.id)
    assert cancelled.status == "cancelled" and cancelled.completed_at_ms
    assert (await ledger.get_account(account_id)).held == 0
    assert (await ledger.get_reservation(task.reservation_id)).state == "released"
    with pytest.raises(Conflict):
        await store.cancel(account_id, task.id)
    assert await store.claim("w", 30) is None  # nothing left to run
    await assert_books_balance(ledger, account_id)


async def test_a_run_token_authorizes_only_its_running_task_with_its_own_hold(
    store: TaskStore, ledger: Ledger
) -> None:
    account_id, key = await _customer(ledger)
    task = await store.for_hold(await create(store, key))
    claim = await store.claim("w", 30)
    assert claim is not None and claim.task.id == task.id and claim.task.status == "processing"
    auth = await store.run_authorization(claim.run_token)
    assert auth.reservation is not None and auth.reservation.id == task.reservation_id
    assert auth.account.id == account_id
    assert (await ledger.get_account(account_id)).held == PRICE  # no second hold
    with pytest.raises(AuthenticationFailed):
        await store.run_authorization(claim.run_token + "x")
    await ledger.commit(task.reservation_id, 30)
    done = await store.finish(task.id, claim.run_token, "completed", output=b'{"data": []}')
    assert done.status == "completed" and done.charged == 30
    assert task_document(done)["credits_charged"] == "0.3"
    with pytest.raises(AuthenticationFailed):  # the token died with the run
        await store.run_authorization(claim.run_token)
    await assert_books_balance(ledger, account_id)


async def test_a_run_that_ends_uncharged_or_failed_releases_its_hold(
    store: TaskStore, ledger: Ledger
) -> None:
    account_id, key = await _customer(ledger)
    task = await store.for_hold(await create(store, key))
    claim = await store.claim("w", 30)
    assert claim is not None
    ended = await store.finish(task.id, claim.run_token, "completed", output=b"{}")
    assert ended.status == "failed"  # completed without a commit is not believed
    assert json.loads(ended.error_json or b"")["error"]["type"] == "processing_error"
    assert (await ledger.get_reservation(task.reservation_id)).state == "released"
    await assert_books_balance(ledger, account_id)


async def test_a_run_whose_worker_stopped_is_taken_over_once_then_failed(
    store: TaskStore, ledger: Ledger, clock: FakeClock
) -> None:
    account_id, key = await _customer(ledger)
    task = await store.for_hold(await create(store, key))
    first = await store.claim("edge-a", 30)
    assert first is not None
    assert await store.claim("edge-b", 30) is None  # leased
    clock.advance(31)  # edge-a died: its lease ran out
    second = await store.claim("edge-b", 30)
    assert second is not None and second.task.id == task.id and second.task.attempts == 2
    cancel, lost = await store.renew(task.id, first.run_token, 30)
    assert lost and not cancel  # the old run learns it lost the task
    with pytest.raises(Conflict):
        await store.finish(task.id, first.run_token, "completed")
    clock.advance(31)  # edge-b died too
    assert await store.claim("edge-c", 30) is None
    failed = await store.get(account_id, task.id)
    assert failed.status == "failed"
    assert (await ledger.get_reservation(task.reservation_id)).state == "released"
    await assert_books_balance(ledger, account_id)


async def test_cancelling_a_running_task_asks_its_worker_to_stop(store: TaskStore, ledger: Ledger) -> None:
    account_id, key = await _customer(ledger)
    task = await store.for_hold(await create(store, key))
    claim = await store.claim("w", 30)
    assert claim is not None
    assert (await store.cancel(account_id, task.id)).cancel_requested
    cancel, lost = await store.renew(task.id, claim.run_token, 30, step=2, total=8)
    assert cancel and not lost
    assert (await store.get(account_id, task.id)).progress_step == 2
    ended = await store.finish(task.id, claim.run_token, "cancelled")
    assert ended.status == "cancelled"
    assert (await ledger.get_account(account_id)).held == 0
    await assert_books_balance(ledger, account_id)


async def test_concurrent_workers_never_claim_the_same_task(store: TaskStore, ledger: Ledger) -> None:
    _, key = await _customer(ledger, "10")
    created = {(await store.for_hold(await create(store, key, price=10))).id for _ in range(6)}
    claims = await asyncio.gather(*(store.claim(f"w{i}", 30) for i in range(10)))
    claimed = [c.task.id for c in claims if c is not None]
    assert len(claimed) == len(set(claimed)) == 6 and set(claimed) == created


async def test_pages_list_newest_first_and_filter_by_status(
    store: TaskStore, ledger: Ledger, clock: FakeClock
) -> None:
    account_id, key = await _customer(ledger, "10")
    ids = []
    for _ in range(5):
        ids.append((await store.for_hold(await create(store, key, price=1))).id)
        clock.advance(1)
    await store.cancel(account_id, ids[0])
    first, token = await store.list(account_id, page_size=2)
    second, token2 = await store.list(account_id, page_size=2, page_token=token)
    third, token3 = await store.list(account_id, page_size=2, page_token=token2)
    assert [t.id for t in first + second + third] == ids[::-1] and token3 == ""
    cancelled, _ = await store.list(account_id, status="cancelled")
    assert [t.id for t in cancelled] == [ids[0]]


async def test_an_ended_task_with_a_callback_puts_its_object_in_the_webhook_outbox(
    store: TaskStore, ledger: Ledger
) -> None:
    account_id, key = await _customer(ledger)
    task = await store.for_hold(await create(store, key, callback_url="https://example.com/hook"))
    assert await store.webhook(account_id, task.id) is None  # nothing sent before it ends
    await store.cancel(account_id, task.id)
    summary = await store.webhook(account_id, task.id)
    assert summary is not None and summary["state"] == "pending"
    rows = await ledger.db.run(
        lambda tx: tx.all(
            "SELECT event_type, payload, url FROM webhook_messages WHERE task_id = ?", (task.id,)
        ),
        write=False,
    )
    [(event, payload, url)] = rows
    assert event == "task.cancelled" and url == "https://example.com/hook"
    document = json.loads(bytes(payload))
    assert document["task_id"] == task.id and document["status"] == "cancelled"
