"""The billing ledger: reserve+commit pairs per second on SQLite and on PostgreSQL.

Not a test. Run with `make bench` (or `.venv/bin/python bench/ledger.py`).
A pair is what billing does for every billed request: ``Ledger.authorize``
(find the API key's account, price the work with the real pricing, hold the
total: one transaction) then ``Ledger.commit`` (price the work done, charge it,
release the rest: one transaction), through the real
:class:`~services.billing.ledger.Ledger` over the real
:class:`~services.billing.store.Database`, as ``services/billing/servicer.py``
calls them for one z-image-turbo image of 1024x1024 at 8 steps (78 units).

Databases: a temporary SQLite file, and a fresh PostgreSQL database
``kiln_bench_<hex>`` created on the admin URL (``--postgres-url``, default
``KILN_BENCH_POSTGRES_URL`` or ``postgresql://postgres@127.0.0.1:5432/postgres``)
and dropped afterwards; PostgreSQL is skipped, saying so, when it is unreachable.

Scenarios, on each database: one account, and ``--accounts`` accounts (64) with
the pairs spread round-robin over them. ``--workers`` asyncio workers (32) run
``--warmup`` pairs, then ``--pairs`` timed ones (2,000). Printed: pairs/s, mean,
p50 and p99 latency of a pair, the ratio to the goal (2,000 pairs/s on SQLite,
1,000 on PostgreSQL), and a check that money is conserved: the balances add up to
the grants minus the charges, nothing stays held, and every account's ledger
rows sum to its balance. The exit status is 1 when money is not conserved.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from services.billing.ledger import AccountRecord, Ledger, api_key_finder  # noqa: E402
from services.billing.pricing import ImageGenerationItem, quote  # noqa: E402
from services.billing.store import Database  # noqa: E402
from services.common.registry import Registry, load_registry  # noqa: E402
from services.common.settings import DEFAULT_REGISTRY  # noqa: E402

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
#: Pairs per second each engine should sustain.
GOALS = {"sqlite": 2000.0, "postgresql": 1000.0}
ITEM = ImageGenerationItem(model="z-image-turbo", width=1024, height=1024, steps=8)
TTL_SECONDS = 300.0
#: Credits granted per pair an account will run: far above the 0.78 a pair costs.
CREDITS_PER_PAIR = 2


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass(frozen=True)
class Prices:
    """The price functions of the hold and of the commit, as the billing servicer builds them."""

    registry: Registry

    def hold(self, account: AccountRecord) -> list[int]:
        return quote([ITEM], self.registry, premium=account.premium)

    def commit(self, account: AccountRecord) -> int:
        return sum(quote([ITEM], self.registry, premium=account.premium))


@dataclass
class Scenario:
    """The accounts of one scenario and the money that went in and out of them."""

    accounts: list[AccountRecord]
    keys: list[str]
    granted: int = 0
    charged: int = 0


async def _setup(ledger: Ledger, n_accounts: int, pairs: int) -> Scenario:
    scenario = Scenario([], [])
    per_account = math.ceil(pairs / n_accounts)
    for i in range(n_accounts):
        account = await ledger.create_account(f"bench-{i}")
        purchase = await ledger.add_credits(account.id, Decimal(per_account * CREDITS_PER_PAIR), kind="grant")
        _, key = await ledger.create_api_key(account.id, name="bench")
        scenario.accounts.append(account)
        scenario.keys.append(key)
        scenario.granted += purchase.credits_units
    return scenario


async def _run_pairs(
    ledger: Ledger,
    scenario: Scenario,
    prices: Prices,
    *,
    start: int,
    count: int,
    workers: int,
) -> tuple[float, list[float]]:
    """Runs pairs ``start .. start + count - 1`` (pair i bills account i mod n) with
    ``workers`` concurrent workers; returns (wall seconds, latency of each pair in ms)."""
    finders = [api_key_finder(key) for key in scenario.keys]
    run_id = secrets.token_hex(4)
    latencies: list[float] = []
    next_pair = start
    end = start + count

    async def worker() -> None:
        nonlocal next_pair
        while next_pair < end:
            i = next_pair
            next_pair += 1
            began = time.perf_counter()
            auth = await ledger.authorize(
                finders[i % len(finders)], prices.hold, f"bench-{run_id}-{i}", TTL_SECONDS
            )
            assert auth.reservation is not None
            done = await ledger.commit(auth.reservation.id, prices.commit)
            latencies.append((time.perf_counter() - began) * 1000)
            scenario.charged += done.charged

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return time.perf_counter() - began, latencies


async def _conserved(ledger: Ledger, scenario: Scenario) -> tuple[bool, str]:
    """Whether the scenario's money adds up, and the sentence that says so."""
    balances = held = 0
    mismatched: list[str] = []
    for account in scenario.accounts:
        now = await ledger.get_account(account.id)
        balances += now.balance
        held += now.held
        rows = await ledger.ledger_sum(account.id)
        if rows != now.balance:
            mismatched.append(f"{account.id}: ledger {rows} != balance {now.balance}")
    expected = scenario.granted - scenario.charged
    ok = balances == expected and held == 0 and not mismatched
    text = (
        f"balances {balances} {'=' if balances == expected else '!='} grants {scenario.granted}"
        f" - charges {scenario.charged} ({expected}), held {held},"
        f" ledger sum = balance for {len(scenario.accounts) - len(mismatched)}/{len(scenario.accounts)} accounts"
    )
    if mismatched:
        text += "; " + "; ".join(mismatched[:5])
    return ok, ("money conserved: " if ok else "MONEY NOT CONSERVED: ") + text


async def bench_database(
    url: str, dialect: str, prices: Prices, *, accounts: list[int], pairs: int, warmup: int, workers: int
) -> bool:
    """Runs every scenario on one database; returns whether money was conserved in all."""
    db = await Database.open(url)
    ledger = Ledger(db)
    goal = GOALS[dialect]
    ok = True
    try:
        for n in accounts:
            scenario = await _setup(ledger, n, warmup + pairs)
            await _run_pairs(ledger, scenario, prices, start=0, count=warmup, workers=workers)
            wall, latencies = await _run_pairs(
                ledger, scenario, prices, start=warmup, count=pairs, workers=workers
            )
            rate = pairs / wall
            ratio = rate / goal
            label = f"{n} account" + ("s" if n != 1 else "")
            print(
                f"{dialect:<10} {label:<12} {workers} workers  {pairs} pairs: {rate:8.0f} pairs/s"
                f"   mean {statistics.fmean(latencies):7.2f} ms   p50 {percentile(latencies, 50):7.2f} ms"
                f"   p99 {percentile(latencies, 99):7.2f} ms"
                f"   ratio to goal ({goal:,.0f} pairs/s) {ratio:.2f}x: goal {'met' if ratio >= 1 else 'missed'}",
                flush=True,
            )
            conserved, text = await _conserved(ledger, scenario)
            print(f"{'':<10} {text}", flush=True)
            ok = ok and conserved
    finally:
        await db.close()
    return ok


def create_postgres_database(admin_url: str) -> str:
    """Creates ``kiln_bench_<hex>`` on the admin URL's server; returns its name.

    Raises psycopg.OperationalError when the server is unreachable.
    """
    name = f"kiln_bench_{secrets.token_hex(6)}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name


def drop_postgres_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=2000, help="timed reserve+commit pairs per scenario")
    parser.add_argument("--warmup", type=int, default=200, help="pairs run before the timed ones")
    parser.add_argument("--workers", type=int, default=32, help="concurrent asyncio workers")
    parser.add_argument("--accounts", default="1,64", help="accounts of each scenario, comma-separated")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("KILN_BENCH_POSTGRES_URL", DEFAULT_ADMIN_URL),
        help="admin URL of the PostgreSQL server (a database is created and dropped on it)",
    )
    parser.add_argument("--only", choices=sorted(GOALS), help="run one database only")
    args = parser.parse_args()
    accounts = [int(n) for n in args.accounts.split(",") if n]
    prices = Prices(load_registry(DEFAULT_REGISTRY))

    async def run(url: str, dialect: str) -> bool:
        return await bench_database(
            url,
            dialect,
            prices,
            accounts=accounts,
            pairs=args.pairs,
            warmup=args.warmup,
            workers=args.workers,
        )

    ok = True
    if args.only in (None, "sqlite"):
        with tempfile.TemporaryDirectory(prefix="kiln-bench-ledger-") as tmp:
            url = "sqlite:///" + os.path.join(tmp, "billing.db")  # an absolute path: sqlite:////tmp/...
            ok = await run(url, "sqlite") and ok
    if args.only in (None, "postgresql"):
        try:
            name = create_postgres_database(args.postgres_url)
        except psycopg.OperationalError as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            print(f"postgresql: skipped: cannot reach {args.postgres_url} ({reason})", flush=True)
        else:
            try:
                url = urlunsplit(urlsplit(args.postgres_url)._replace(path="/" + name))
                ok = await run(url, "postgresql") and ok
            finally:
                drop_postgres_database(args.postgres_url, name)
    return 0 if ok else 1


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    sys.exit(asyncio.run(main()))
