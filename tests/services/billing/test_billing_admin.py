"""The operator's commands, run through argparse and run_admin on a real database file."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from services.billing.admin import add_admin_commands, ensure_demo_account, open_ledger, run_admin
from services.billing.ledger import Ledger
from services.common.errors import InvalidRequest
from services.common.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "state")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kiln admin")
    add_admin_commands(parser.add_subparsers(dest="admin_command", required=True))
    return parser.parse_args(argv)


async def admin(settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = await run_admin(parse(*argv), settings)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
async def ledger(settings: Settings) -> AsyncIterator[Ledger]:
    ledger = await open_ledger(settings)
    try:
        yield ledger
    finally:
        await ledger.db.close()


async def test_account_create_prints_the_id_and_grants_the_credits(
    settings: Settings, capsys: pytest.CaptureFixture[str], ledger: Ledger
) -> None:
    status, out, _ = await admin(
        settings,
        capsys,
        "account",
        "create",
        "--name",
        "Ada",
        "--premium",
        "--subject",
        "ada",
        "--credits",
        "12.5",
    )
    assert status == 0
    account = await ledger.get_account(out.strip())
    assert (account.name, account.premium, account.balance, account.external_id) == ("Ada", True, 1250, "ada")
    assert (settings.data_dir / "kiln.db").exists()


async def test_account_show_and_premium(
    settings: Settings, capsys: pytest.CaptureFixture[str], ledger: Ledger
) -> None:
    account = await ledger.create_account("Bob")
    await ledger.add_credits(account.id, Decimal("3.25"), kind="grant")
    status, out, _ = await admin(settings, capsys, "account", "premium", account.id, "on")
    assert status == 0 and "premium on" in out
    status, out, _ = await admin(settings, capsys, "account", "show", account.id)
    assert status == 0
    assert "balance:  3.25 credits" in out and "held:     0 credits" in out and "premium:  yes" in out


async def test_key_create_prints_the_key_once_and_it_works_until_revoked(
    settings: Settings, capsys: pytest.CaptureFixture[str], ledger: Ledger
) -> None:
    account = await ledger.create_account("Cy")
    status, out, err = await admin(settings, capsys, "key", "create", account.id, "--name", "ci")
    key = out.strip()
    assert status == 0 and key.startswith("sk-kiln-")
    assert "not stored" in err
    assert (await ledger.account_for_api_key(key)).id == account.id
    [record] = await ledger.list_api_keys(account.id)
    status, out, _ = await admin(settings, capsys, "key", "list", account.id)
    assert record.id in out and "active" in out and key not in out
    status, out, _ = await admin(settings, capsys, "key", "revoke", record.id)
    assert status == 0 and "revoked" in out
    status, out, _ = await admin(settings, capsys, "key", "list", account.id)
    assert "revoked" in out


@pytest.mark.parametrize(
    ("credits", "flag", "expected"),
    [
        ("999", None, "added 999 credits to {id}: discount 0%, paid $9.99"),
        ("1000", None, "added 1000 credits to {id}: discount 10%, paid $9.00"),
        ("10000", None, "added 10000 credits to {id}: discount 20%, paid $80.00"),
        ("500", "--grant", "granted 500 credits to {id}: discount 0%, paid $0.00"),
    ],
)
async def test_credits_add_prints_discount_and_what_was_paid(
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
    ledger: Ledger,
    credits: str,
    flag: str | None,
    expected: str,
) -> None:
    account = await ledger.create_account("Dee")
    status, out, _ = await admin(
        settings, capsys, "credits", "add", account.id, credits, *([flag] if flag else [])
    )
    assert status == 0
    assert expected.format(id=account.id) in out
    assert (await ledger.get_account(account.id)).balance == int(Decimal(credits) * 100)


async def test_ledger_lists_the_newest_rows_first(
    settings: Settings, capsys: pytest.CaptureFixture[str], ledger: Ledger
) -> None:
    account = await ledger.create_account("Eve")
    await ledger.add_credits(account.id, Decimal(10), kind="grant")
    res = await ledger.reserve(account.id, 78, "r1", 60)
    await ledger.commit(res.id, 78)
    status, out, _ = await admin(settings, capsys, "ledger", account.id, "--limit", "2")
    lines = out.splitlines()
    assert status == 0
    assert "balance 9.22" in lines[0]
    assert len(lines) == 3 and "charge" in lines[1] and "-0.78" in lines[1] and "release" in lines[2]


async def test_maintenance_on_off_and_status(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert (await admin(settings, capsys, "maintenance", "status"))[1] == "maintenance: off\n"
    assert (await admin(settings, capsys, "maintenance", "on"))[1] == "maintenance: on\n"
    assert (await admin(settings, capsys, "maintenance", "status"))[1] == "maintenance: on\n"
    assert (await admin(settings, capsys, "maintenance", "off"))[1] == "maintenance: off\n"


async def test_errors_go_to_stderr_with_a_non_zero_status(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = await admin(settings, capsys, "account", "show", "acct_missing")
    assert status == 1 and out == ""
    assert "Account 'acct_missing' not found." in err


def test_credit_amounts_are_checked_by_the_parser() -> None:
    with pytest.raises(SystemExit):
        parse("credits", "add", "acct_x", "-5")


# --- the demo account of `kiln up` ---


async def test_demo_account_is_created_topped_up_and_keyed(ledger: Ledger) -> None:
    account, key = await ensure_demo_account(ledger, api_key=None, credits=Decimal(1000), premium=False)
    assert (account.name, account.balance, account.premium) == ("demo", 100_000, False)
    assert (await ledger.account_for_api_key(key)).id == account.id
    spent = await ledger.reserve(account.id, 5000, "r", 60)
    await ledger.commit(spent.id, 5000)
    again, other_key = await ensure_demo_account(ledger, api_key=None, credits=Decimal(1000), premium=True)
    assert again.id == account.id and other_key != key
    assert (again.balance, again.premium) == (100_000, True)
    kinds = [e.kind for e in await ledger.ledger_entries(account.id)]
    assert kinds.count("grant") == 2


async def test_demo_account_registers_a_fixed_key_once(ledger: Ledger) -> None:
    fixed = "sk-kiln-demo-0123456789"
    account, key = await ensure_demo_account(ledger, api_key=fixed, credits=Decimal(50), premium=False)
    again, key_again = await ensure_demo_account(ledger, api_key=fixed, credits=Decimal(50), premium=False)
    assert key == key_again == fixed and again.id == account.id
    assert len(await ledger.list_api_keys(account.id)) == 1
    assert (await ledger.account_for_api_key(fixed)).id == account.id


async def test_demo_key_owned_by_another_account_is_refused(ledger: Ledger) -> None:
    stranger = await ledger.create_account("stranger")
    await ledger.create_api_key(stranger.id, key="sk-kiln-taken-0123456789")
    with pytest.raises(InvalidRequest, match="another account"):
        await ensure_demo_account(
            ledger, api_key="sk-kiln-taken-0123456789", credits=Decimal(1), premium=False
        )
