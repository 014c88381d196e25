"""The ledger's rules, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import pytest

from services.billing.ledger import (
    AccountRecord,
    IdempotencyClaim,
    Ledger,
    StoredAnswer,
    api_key_finder,
    hash_api_key,
)
from services.billing.store import Database, Tx, _migrate, load_migrations
from services.common.errors import (
    AuthenticationFailed,
    Conflict,
    InsufficientCredits,
    InvalidRequest,
    NotFound,
)

from .billing_fakes import FakeClock


async def funded(ledger: Ledger, credits: str = "10", **kwargs: object) -> AccountRecord:
    account = await ledger.create_account("test", **kwargs)  # type: ignore[arg-type]
    await ledger.add_credits(account.id, Decimal(credits), kind="grant")
    return await ledger.get_account(account.id)


async def assert_books_balance(ledger: Ledger, account_id: str) -> None:
    """balance == sum of the ledger rows; held == sum of the open holds."""
    account = await ledger.get_account(account_id)
    assert account.balance == await ledger.ledger_sum(account_id)
    held = await ledger.db.run(
        lambda tx: tx.one(
            "SELECT COALESCE(SUM(amount), 0) FROM reservations WHERE account_id = ? AND state = 'held'",
            (account_id,),
        ),
        write=False,
    )
    assert held is not None
    assert account.held == int(held[0])
    assert account.balance >= 0


# --- accounts and credits ---


async def test_new_account_starts_empty_and_can_be_read_back(ledger: Ledger) -> None:
    account = await ledger.create_account("alice", external_id="auth0|alice")
    assert account.balance == 0 and account.held == 0 and not account.premium
    assert await ledger.get_account(account.id) == account
    assert await ledger.find_account_by_subject("auth0|alice") == account
    assert await ledger.find_account_by_subject(account.id) is None  # bound to its external subject
    assert await ledger.find_account_by_subject("someone-else") is None
    unbound = await ledger.create_account("bob")
    assert await ledger.find_account_by_subject(unbound.id) == unbound


async def test_unknown_account_is_not_found(ledger: Ledger) -> None:
    with pytest.raises(NotFound):
        await ledger.get_account("acct_missing")
    with pytest.raises(NotFound):
        await ledger.add_credits("acct_missing", Decimal(5))
    with pytest.raises(NotFound):
        await ledger.reserve("acct_missing", 1, "r1", 60)


async def test_a_subject_belongs_to_one_account(ledger: Ledger) -> None:
    await ledger.create_account("a", external_id="sub-1")
    with pytest.raises(InvalidRequest):
        await ledger.create_account("b", external_id="sub-1")


async def test_set_premium_flips_the_flag(ledger: Ledger) -> None:
    account = await ledger.create_account("p")
    assert (await ledger.set_premium(account.id, True)).premium
    assert not (await ledger.set_premium(account.id, False)).premium


async def test_purchase_applies_bulk_discount_and_records_what_was_paid(ledger: Ledger) -> None:
    account = await ledger.create_account("buyer")
    small = await ledger.add_credits(account.id, Decimal("999"))
    bulk = await ledger.add_credits(account.id, Decimal("1000"))
    huge = await ledger.add_credits(account.id, Decimal("10000"))
    assert (small.credits_units, small.discount_percent, small.paid_units) == (99_900, 0, 99_900)
    assert (bulk.credits_units, bulk.discount_percent, bulk.paid_units) == (100_000, 10, 90_000)
    assert (huge.credits_units, huge.discount_percent, huge.paid_units) == (1_000_000, 20, 800_000)
    assert (await ledger.get_account(account.id)).balance == 1_199_900
    await assert_books_balance(ledger, account.id)


async def test_grant_pays_nothing(ledger: Ledger) -> None:
    account = await ledger.create_account("lucky")
    grant = await ledger.add_credits(account.id, Decimal("5000"), kind="grant")
    assert (grant.discount_percent, grant.paid_units) == (0, 0)
    entries = await ledger.ledger_entries(account.id)
    assert [(e.kind, e.amount) for e in entries] == [("grant", 500_000)]


@pytest.mark.parametrize("credits", ["0", "-5", "0.001", "NaN"])
async def test_credit_amounts_must_be_positive_hundredths(ledger: Ledger, credits: str) -> None:
    account = await ledger.create_account("x")
    with pytest.raises(InvalidRequest):
        await ledger.add_credits(account.id, Decimal(credits))


# --- reservations ---


async def test_reserve_holds_credits_and_commit_charges_the_actual_cost(ledger: Ledger) -> None:
    account = await funded(ledger, "10")
    res, after = await ledger.reserve_with_account(account.id, 300, "req-1", 60)
    assert (res.state, res.amount, res.charged) == ("held", 300, 0)
    assert (after.balance, after.held) == (700, 300)
    done = await ledger.commit(res.id, 120)
    assert (done.state, done.charged) == ("committed", 120)
    account = await ledger.get_account(account.id)
    assert (account.balance, account.held) == (880, 0)
    kinds = [(e.kind, e.amount) for e in reversed(await ledger.ledger_entries(account.id))]
    assert kinds == [("grant", 1000), ("hold", -300), ("release", 300), ("charge", -120)]
    await assert_books_balance(ledger, account.id)


async def test_release_returns_the_hold(ledger: Ledger) -> None:
    account = await funded(ledger, "10")
    res = await ledger.reserve(account.id, 250, "req-1", 60)
    released = await ledger.release(res.id)
    assert released.state == "released"
    account = await ledger.get_account(account.id)
    assert (account.balance, account.held) == (1000, 0)
    await assert_books_balance(ledger, account.id)


async def test_insufficient_credits_names_required_and_available(ledger: Ledger) -> None:
    account = await funded(ledger, "0.5")
    with pytest.raises(InsufficientCredits) as info:
        await ledger.reserve(account.id, 79, "req-1", 60)
    assert info.value.message == "You do not have enough credits. Required: 0.79, Available: 0.5"
    account = await ledger.get_account(account.id)
    assert (account.balance, account.held) == (50, 0)
    # the failed request id is free again: it left no reservation behind
    await ledger.add_credits(account.id, Decimal(1), kind="grant")
    assert (await ledger.reserve(account.id, 79, "req-1", 60)).state == "held"


async def test_the_same_request_id_twice_makes_two_holds_and_charges_twice(ledger: Ledger) -> None:
    account = await funded(ledger, "10")
    first = await ledger.reserve(account.id, 100, "same", 60)
    again = await ledger.reserve(account.id, 300, "same", 60)
    assert first.id != again.id and first.request_id == again.request_id == "same"
    assert (await ledger.get_account(account.id)).held == 400
    await ledger.commit(first.id, 100)
    await ledger.commit(again.id, 300)
    assert (await ledger.get_account(account.id)).balance == 600
    await assert_books_balance(ledger, account.id)


async def test_concurrent_calls_with_one_request_id_each_hold_until_the_money_runs_out(
    database: Database, clock: FakeClock
) -> None:
    ledger = Ledger(database, clock=clock)
    account = await funded(ledger, "5")  # 500 units: 5 holds of 100
    results = await asyncio.gather(
        *(ledger.reserve(account.id, 100, "retry-storm", 60) for _ in range(20)), return_exceptions=True
    )
    held = [r for r in results if not isinstance(r, BaseException)]
    assert len({r.id for r in held}) == 5
    assert all(isinstance(r, InsufficientCredits) for r in results if isinstance(r, BaseException))
    account = await ledger.get_account(account.id)
    assert (account.balance, account.held) == (0, 500)
    await assert_books_balance(ledger, account.id)


async def test_fifty_concurrent_reservations_never_overdraw(db_url: str, clock: FakeClock) -> None:
    # Two Database instances on one database: two connections racing, as two replicas would.
    first, second = await asyncio.gather(Database.open(db_url), Database.open(db_url))
    try:
        ledgers = [Ledger(first, clock=clock), Ledger(second, clock=clock)]
        account = await funded(ledgers[0], "10")  # 1000 units: exactly 10 holds of 100
        outcomes = await asyncio.gather(
            *(ledgers[i % 2].reserve(account.id, 100, f"req-{i}", 60) for i in range(50)),
            return_exceptions=True,
        )
        won = [o for o in outcomes if not isinstance(o, BaseException)]
        lost = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(won) == 10
        assert len(lost) == 40 and all(isinstance(o, InsufficientCredits) for o in lost)
        account = await ledgers[0].get_account(account.id)
        assert (account.balance, account.held) == (0, 1000)
        await assert_books_balance(ledgers[1], account.id)
    finally:
        await asyncio.gather(first.close(), second.close())


async def test_balance_can_not_go_negative_even_by_hand(ledger: Ledger) -> None:
    account = await funded(ledger, "1")
    with pytest.raises(Exception, match=r"(?i)check"):
        await ledger.db.run(
            lambda tx: tx.execute("UPDATE accounts SET balance = -1 WHERE id = ?", (account.id,))
        )
    assert (await ledger.get_account(account.id)).balance == 100


async def test_commit_twice_with_the_same_amount_returns_the_first_result(ledger: Ledger) -> None:
    account = await funded(ledger)
    res = await ledger.reserve(account.id, 100, "r", 60)
    first = await ledger.commit(res.id, 60)
    assert await ledger.commit(res.id, 60) == first
    assert (await ledger.get_account(account.id)).balance == 940
    with pytest.raises(InvalidRequest, match="already committed"):
        await ledger.commit(res.id, 50)
    with pytest.raises(InvalidRequest, match="cannot be released"):
        await ledger.release(res.id)
    await assert_books_balance(ledger, account.id)


async def test_release_twice_returns_it_unchanged_and_commit_after_release_fails(ledger: Ledger) -> None:
    account = await funded(ledger)
    res = await ledger.reserve(account.id, 100, "r", 60)
    first = await ledger.release(res.id)
    assert await ledger.release(res.id) == first
    with pytest.raises(InvalidRequest, match="released"):
        await ledger.commit(res.id, 10)
    assert (await ledger.get_account(account.id)).balance == 1000
    await assert_books_balance(ledger, account.id)


async def test_commit_is_capped_at_the_hold(ledger: Ledger) -> None:
    account = await funded(ledger)
    res = await ledger.reserve(account.id, 100, "r", 60)
    assert (await ledger.commit(res.id, 101)).charged == 100
    assert (await ledger.get_account(account.id)).balance == 900
    await assert_books_balance(ledger, account.id)


async def test_commit_prices_the_work_for_the_reservations_account(ledger: Ledger) -> None:
    account = await funded(ledger)
    vip = await ledger.create_account("vip", premium=True)
    seen: list[str] = []

    def price(holder: AccountRecord) -> int:
        seen.append(holder.id)
        return 0 if holder.premium else 37

    res = await ledger.reserve(account.id, 100, "r", 60)
    free = await ledger.reserve(vip.id, 0, "r", 60)
    assert (await ledger.commit(res.id, price)).charged == 37
    assert (await ledger.commit(free.id, price)).charged == 0
    assert seen == [account.id, vip.id]
    assert (await ledger.commit(res.id, price)).charged == 37  # the same commit again: the first result
    assert (await ledger.get_account(account.id)).balance == 963


async def test_unknown_reservation_is_not_found(ledger: Ledger) -> None:
    with pytest.raises(NotFound):
        await ledger.commit("res_missing", 1)
    with pytest.raises(NotFound):
        await ledger.release("res_missing")


async def test_bad_reservation_arguments_are_invalid_requests(ledger: Ledger) -> None:
    account = await funded(ledger)
    for amount, request_id, ttl in ((-1, "r", 60), (1, "r", 0), (1, "x" * 201, 60)):
        with pytest.raises(InvalidRequest):
            await ledger.reserve(account.id, amount, request_id, ttl)
    res = await ledger.reserve(account.id, 1, "r", 60)
    with pytest.raises(InvalidRequest):
        await ledger.commit(res.id, -1)


async def test_zero_holds_write_no_ledger_rows(ledger: Ledger) -> None:
    account = await ledger.create_account("vip", premium=True)
    res = await ledger.reserve(account.id, 0, "free", 60)
    assert (await ledger.commit(res.id, 0)).state == "committed"
    assert await ledger.ledger_entries(account.id) == []


# --- expiry ---


async def test_holds_past_their_ttl_are_expired_by_the_sweep(ledger: Ledger, clock: FakeClock) -> None:
    account = await funded(ledger)
    short = await ledger.reserve(account.id, 100, "short", 10)
    long = await ledger.reserve(account.id, 200, "long", 100)
    assert await ledger.expire_holds() == 0
    clock.advance(10)
    assert await ledger.expire_holds() == 1
    assert (await ledger.get_reservation(short.id)).state == "expired"
    assert (await ledger.get_reservation(long.id)).state == "held"
    account = await ledger.get_account(account.id)
    assert (account.balance, account.held) == (800, 200)
    assert await ledger.expire_holds() == 0
    await assert_books_balance(ledger, account.id)


async def test_commit_after_expiry_fails_clearly(ledger: Ledger, clock: FakeClock) -> None:
    account = await funded(ledger)
    res = await ledger.reserve(account.id, 100, "r", 10)
    clock.advance(11)
    await ledger.expire_holds()
    with pytest.raises(InvalidRequest, match="expired before it was committed"):
        await ledger.commit(res.id, 100)
    # releasing an expired hold is harmless: it is already back
    assert (await ledger.release(res.id)).state == "expired"
    assert (await ledger.get_account(account.id)).balance == 1000


async def test_commit_of_an_overdue_hold_not_yet_swept_fails_and_expires_it(
    ledger: Ledger, clock: FakeClock
) -> None:
    account = await funded(ledger)
    res = await ledger.reserve(account.id, 100, "r", 10)
    clock.advance(10)
    with pytest.raises(InvalidRequest, match="expired"):
        await ledger.commit(res.id, 100)
    assert (await ledger.get_reservation(res.id)).state == "expired"
    account = await ledger.get_account(account.id)
    assert (account.balance, account.held) == (1000, 0)
    await assert_books_balance(ledger, account.id)


async def test_books_balance_after_a_mixed_workload(ledger: Ledger, clock: FakeClock) -> None:
    account = await ledger.create_account("busy")
    await ledger.add_credits(account.id, Decimal("12.34"))
    await ledger.add_credits(account.id, Decimal("1000"), kind="grant")
    holds = [await ledger.reserve(account.id, 100 + i, f"r{i}", 5 + i) for i in range(12)]
    await asyncio.gather(
        *(ledger.commit(h.id, h.amount // 2) for h in holds[:4]),
        *(ledger.release(h.id) for h in holds[4:7]),
        ledger.commit(holds[7].id, holds[7].amount),
    )
    clock.advance(14)  # holds 0..7 are settled; 8 and 9 (ttl 13 and 14 s) run out, 10 and 11 do not
    assert await ledger.expire_holds() == 2
    await ledger.commit(holds[10].id, 0)
    with pytest.raises(InsufficientCredits):
        await ledger.reserve(account.id, 10**9, "too-much", 60)
    await assert_books_balance(ledger, account.id)
    final = await ledger.get_account(account.id)
    spent = sum(h.amount // 2 for h in holds[:4]) + holds[7].amount
    assert final.balance + final.held == 1234 + 100_000 - spent
    assert final.held == holds[11].amount


# --- API keys ---


async def test_api_key_is_stored_only_as_a_hash_and_authenticates(ledger: Ledger) -> None:
    account = await ledger.create_account("k")
    key_id, key = await ledger.create_api_key(account.id, name="laptop")
    assert key.startswith("sk-kiln-") and len(key) > 40
    assert (await ledger.account_for_api_key(key)).id == account.id
    stored = await ledger.db.run(lambda tx: tx.all("SELECT key_hash, prefix FROM api_keys"), write=False)
    assert stored == [(hash_api_key(key), key[:12])]
    [listed] = await ledger.list_api_keys(account.id)
    assert (listed.id, listed.name, listed.revoked_at_ms) == (key_id, "laptop", None)


async def test_revoked_and_unknown_keys_fail_authentication(ledger: Ledger) -> None:
    account = await ledger.create_account("k")
    key_id, key = await ledger.create_api_key(account.id)
    await ledger.revoke_api_key(key_id)
    for candidate in (key, "sk-kiln-unknown", ""):
        with pytest.raises(AuthenticationFailed):
            await ledger.account_for_api_key(candidate)
    assert (await ledger.list_api_keys(account.id))[0].revoked_at_ms is not None
    with pytest.raises(NotFound):
        await ledger.revoke_api_key("key_missing")


async def test_a_fixed_key_can_be_registered_once(ledger: Ledger) -> None:
    account = await ledger.create_account("demo")
    _, key = await ledger.create_api_key(account.id, key="sk-kiln-fixed-demo-key")
    assert key == "sk-kiln-fixed-demo-key"
    assert (await ledger.account_for_api_key(key)).id == account.id
    with pytest.raises(InvalidRequest):
        await ledger.create_api_key(account.id, key="sk-kiln-fixed-demo-key")


# --- maintenance ---


async def test_maintenance_flag_is_shared_and_cached_for_a_second(ledger: Ledger, clock: FakeClock) -> None:
    operator = Ledger(ledger.db, clock=clock)
    assert await ledger.maintenance() is False
    await operator.set_maintenance(True)
    assert await operator.maintenance() is True
    assert await ledger.maintenance() is False  # still cached
    clock.advance(1.0)
    assert await ledger.maintenance() is True
    await operator.set_maintenance(False)
    clock.advance(1.0)
    assert await ledger.maintenance() is False


# --- migrations ---


async def test_migrations_are_versioned_and_recorded(database: Database) -> None:
    expected = [(m.version, m.name) for m in load_migrations(database.dialect)]
    assert expected[0] == (1, "initial")
    assert await database.applied_migrations() == expected


async def test_migrating_again_is_a_no_op(database: Database) -> None:
    assert await database.migrate() == []
    reopened = await Database.open(database.url)
    try:
        assert await reopened.applied_migrations() == await database.applied_migrations()
    finally:
        await reopened.close()


async def test_two_processes_starting_at_once_migrate_once(db_url: str) -> None:
    dbs = await asyncio.gather(*(Database.open(db_url) for _ in range(3)))
    try:
        rows = await dbs[0].run(lambda tx: tx.all("SELECT version FROM schema_migrations"), write=False)
        assert sorted(rows) == [(m.version,) for m in load_migrations(dbs[0].dialect)]
    finally:
        await asyncio.gather(*(db.close() for db in dbs))


async def test_an_applied_migration_that_changed_is_refused(database: Database) -> None:
    await database.run(
        lambda tx: tx.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
    )
    with pytest.raises(RuntimeError, match="changed after it was applied"):
        await Database.open(database.url)


async def test_a_database_made_before_billing_made_hold_ids_keeps_its_holds(tmp_path: Path) -> None:
    """Migration 0004 rebuilds SQLite's reservations table: rows, references and expiry index survive."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = [m for m in load_migrations("sqlite") if m.version <= 3]
    db = Database(url, "sqlite")
    db._executor = ThreadPoolExecutor(max_workers=1)
    await asyncio.get_running_loop().run_in_executor(
        db._executor, db._connect_sqlite, url[len("sqlite:///") :]
    )
    await db.run(functools.partial(_migrate, old))
    # The rows are written in SQL, as the billing of that time wrote them (today's Ledger
    # reads columns that later migrations add): 10 credits granted, a hold of 1 credit
    # open, one of 2 credits committed at 1.50.
    now = int(FakeClock()() * 1000)
    expires = now + 60_000

    def old_rows(tx: Tx) -> None:
        tx.execute(
            "INSERT INTO accounts (id, name, premium, balance, held, external_id, created_at_ms)"
            " VALUES ('acct_old', 'test', FALSE, 750, 100, NULL, ?)",
            (now,),
        )
        for res_id, request_id, amount, charged, state in (
            ("res_held", "r1", 100, 0, "held"),
            ("res_charged", "r2", 200, 150, "committed"),
        ):
            tx.execute(
                "INSERT INTO reservations (id, account_id, request_id, amount, charged, state,"
                " created_at_ms, expires_at_ms) VALUES (?, 'acct_old', ?, ?, ?, ?, ?, ?)",
                (res_id, request_id, amount, charged, state, now, expires),
            )
        entries: list[tuple[str, int, str | None]] = [
            ("grant", 1000, None),
            ("hold", -100, "res_held"),
            ("hold", -200, "res_charged"),
            ("release", 200, "res_charged"),
            ("charge", -150, "res_charged"),
        ]
        for kind, amount, entry_res in entries:
            tx.execute(
                "INSERT INTO ledger_entries (account_id, kind, amount, reservation_id, created_at_ms)"
                " VALUES ('acct_old', ?, ?, ?, ?)",
                (kind, amount, entry_res, now),
            )

    await db.run(old_rows)
    await db.close()

    db = await Database.open(url)
    try:
        ledger = Ledger(db, clock=FakeClock())
        assert (await ledger.get_reservation("res_held")).state == "held"
        assert (await ledger.get_reservation("res_charged")).charged == 150
        again = await ledger.reserve("acct_old", 100, "r1", 60)  # no unique request id any more
        assert again.id != "res_held"
        await assert_books_balance(ledger, "acct_old")
        assert await db.run(lambda tx: tx.all("PRAGMA foreign_key_check"), write=False) == []
        indexes = await db.run(lambda tx: tx.all("PRAGMA index_list(reservations)"), write=False)
        assert "reservations_held_by_expiry" in {row[1] for row in indexes}
    finally:
        await db.close()


# --- idempotency keys ---


def image_price(holder: AccountRecord) -> list[int]:
    return [0 if holder.premium else 78]


async def test_a_finished_request_key_replays_its_stored_answer_without_a_hold(ledger: Ledger) -> None:
    account = await funded(ledger)
    _, key = await ledger.create_api_key(account.id)
    claim = IdempotencyClaim("key-1", "f" * 64)
    first = await ledger.authorize(api_key_finder(key), image_price, "t1", 60, claim)
    assert first.reservation is not None and first.replay is None
    await ledger.commit(first.reservation.id, 78)
    answer = StoredAnswer(
        200, (("Content-Type", "application/json"), ("X-Credits-Charged", "0.78")), b'{"a":1}'
    )
    assert await ledger.save_response(first.reservation.id, answer) is True
    assert await ledger.save_response(first.reservation.id, answer) is False  # kept once
    again = await ledger.authorize(api_key_finder(key), image_price, "t2", 60, claim)
    assert again.reservation is None and again.replay == answer
    assert (await ledger.get_account(account.id)).balance == 1000 - 78
    await assert_books_balance(ledger, account.id)


async def test_a_key_in_progress_is_a_conflict_and_another_request_under_it_is_invalid(
    ledger: Ledger,
) -> None:
    account = await funded(ledger)
    _, key = await ledger.create_api_key(account.id)
    first = await ledger.authorize(
        api_key_finder(key), image_price, "t1", 60, IdempotencyClaim("k", "a" * 64)
    )
    with pytest.raises(Conflict, match="in progress"):
        await ledger.authorize(api_key_finder(key), image_price, "t2", 60, IdempotencyClaim("k", "a" * 64))
    with pytest.raises(InvalidRequest, match="Idempotency-Key 'k' was already used with a different request"):
        await ledger.authorize(api_key_finder(key), image_price, "t3", 60, IdempotencyClaim("k", "b" * 64))
    assert (await ledger.get_account(account.id)).held == 78  # the refused ones held nothing
    assert first.reservation is not None
    await ledger.release(first.reservation.id)  # the first failed: the key is free again
    retry = await ledger.authorize(
        api_key_finder(key), image_price, "t4", 60, IdempotencyClaim("k", "b" * 64)
    )
    assert retry.reservation is not None


async def test_keys_are_scoped_to_the_account(ledger: Ledger) -> None:
    one, two = await funded(ledger), await funded(ledger)
    (_, key_one), (_, key_two) = await ledger.create_api_key(one.id), await ledger.create_api_key(two.id)
    claim = IdempotencyClaim("shared", "a" * 64)
    a = await ledger.authorize(api_key_finder(key_one), image_price, "t", 60, claim)
    b = await ledger.authorize(api_key_finder(key_two), image_price, "t", 60, claim)
    assert a.reservation is not None and b.reservation is not None and a.reservation.id != b.reservation.id


async def test_concurrent_requests_with_one_key_hold_once(database: Database, clock: FakeClock) -> None:
    ledger = Ledger(database, clock=clock)
    account = await funded(ledger)
    _, key = await ledger.create_api_key(account.id)
    claim = IdempotencyClaim("storm", "c" * 64)
    outcomes = await asyncio.gather(
        *(ledger.authorize(api_key_finder(key), image_price, "t", 60, claim) for _ in range(10)),
        return_exceptions=True,
    )
    won = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(won) == 1
    assert all(isinstance(o, Conflict) for o in outcomes if isinstance(o, BaseException))
    assert (await ledger.get_account(account.id)).held == 78
    await assert_books_balance(ledger, account.id)


async def test_a_streamed_answer_is_never_replayed(ledger: Ledger) -> None:
    account = await funded(ledger)
    _, key = await ledger.create_api_key(account.id)
    claim = IdempotencyClaim("stream", "d" * 64, streamed=True)
    first = await ledger.authorize(api_key_finder(key), image_price, "t", 60, claim)
    assert first.reservation is not None
    await ledger.commit(first.reservation.id, 78)
    assert await ledger.save_response(first.reservation.id, StoredAnswer(200, ())) is False
    with pytest.raises(Conflict, match="streamed answers are not replayed"):
        await ledger.authorize(api_key_finder(key), image_price, "t", 60, claim)
    assert (await ledger.get_account(account.id)).balance == 1000 - 78


async def test_keys_expire_after_a_day_and_a_key_of_an_expired_hold_is_free(
    ledger: Ledger, clock: FakeClock
) -> None:
    account = await funded(ledger)
    _, key = await ledger.create_api_key(account.id)
    claim = IdempotencyClaim("day", "e" * 64)
    first = await ledger.authorize(api_key_finder(key), image_price, "t", 60, claim)
    assert first.reservation is not None
    await ledger.commit(first.reservation.id, 78)
    await ledger.save_response(first.reservation.id, StoredAnswer(200, ()))
    clock.advance(24 * 3600)
    assert await ledger.expire_holds() == 0
    rows = await ledger.db.run(lambda tx: tx.all("SELECT idem_key FROM idempotency_keys"), write=False)
    assert rows == []  # swept
    again = await ledger.authorize(api_key_finder(key), image_price, "t", 60, claim)
    assert again.reservation is not None  # a new request under the old key
    hold = await ledger.authorize(
        api_key_finder(key), image_price, "t", 10, IdempotencyClaim("short", "f" * 64)
    )
    clock.advance(11)
    assert await ledger.expire_holds() == 1  # the unpaid hold expires and frees its key
    retry = await ledger.authorize(
        api_key_finder(key), image_price, "t", 10, IdempotencyClaim("short", "f" * 64)
    )
    assert hold.reservation is not None and retry.reservation is not None
    assert retry.reservation.id != hold.reservation.id


async def test_bad_idempotency_keys_are_invalid_requests(ledger: Ledger) -> None:
    account = await funded(ledger)
    _, key = await ledger.create_api_key(account.id)
    for bad in ("", "x" * 256, "tab\there", "caf\u00e9"):
        with pytest.raises(InvalidRequest, match="Idempotency-Key"):
            await ledger.authorize(api_key_finder(key), image_price, "t", 60, IdempotencyClaim(bad, "a" * 64))
    assert (await ledger.get_account(account.id)).held == 0
