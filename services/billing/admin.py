"""The operator's commands (``kiln admin ...``): accounts, keys, credits, ledger, maintenance.

They work on the billing database directly (the same :class:`Database` and
:class:`Ledger` as the service), so they work with the service stopped; a
running service sees changes at once (maintenance within a second).

Wiring into a CLI::

    admin = subparsers.add_parser("admin", help="manage accounts, keys and credits")
    add_admin_commands(admin.add_subparsers(dest="admin_command", required=True))
    ...
    return asyncio.run(run_admin(args, settings))

Commands::

    account create --name N [--premium] [--subject SUB] [--credits C]
    account show ID
    account premium ID on|off
    account disable ID / account enable ID
    key create ID [--name NAME]
    key list ID
    key revoke KEY_ID
    credits add ID CREDITS [--grant]
    ledger ID [--limit N]
    maintenance on|off|status
    webhook-secret ID [--rotate] [--grace-hours N]
    limits ID [--rpm N] [--rpm CAPABILITY=N ...] [--concurrent N] [--reset]
    user create ID --name N [--password-stdin] / user list ID / user password NAME
    user disable NAME / user enable NAME
    session list --user NAME / session revoke --user NAME
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from services.billing.ledger import AccountRecord, Ledger
from services.billing.limits_admin import add_limits_command
from services.billing.store import Database
from services.billing.user_admin import add_user_commands
from services.billing.webhook_admin import add_webhook_secret_command
from services.common.errors import InvalidRequest, KilnError
from services.common.money import UNITS_PER_CREDIT, format_credits
from services.common.settings import Settings

Handler = Callable[[Ledger, argparse.Namespace], Awaitable[int]]

DEMO_ACCOUNT_NAME = "demo"
#: Units per dollar: 1 credit = $0.01 = 100 units.
UNITS_PER_DOLLAR = UNITS_PER_CREDIT * 100


def _credits(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a number of credits: {text!r}") from None
    if not value.is_finite() or value <= 0:
        raise argparse.ArgumentTypeError(f"credits must be positive: {text!r}")
    return value


def _dollars(units: int) -> str:
    return f"${Decimal(units) / UNITS_PER_DOLLAR:,.2f}"


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _print_account(account: AccountRecord) -> None:
    print(f"id:       {account.id}")
    print(f"name:     {account.name}")
    print(f"premium:  {'yes' if account.premium else 'no'}")
    print(f"balance:  {format_credits(account.balance)} credits")
    print(f"held:     {format_credits(account.held)} credits")
    if account.external_id:
        print(f"subject:  {account.external_id}")
    if account.disabled_at_ms is not None:
        print(f"disabled: {_when(account.disabled_at_ms)} UTC")


# --- handlers ---


async def _account_create(ledger: Ledger, args: argparse.Namespace) -> int:
    account = await ledger.create_account(args.name, premium=args.premium, external_id=args.subject)
    if args.credits is not None:
        await ledger.add_credits(account.id, args.credits, kind="grant")
    print(account.id)
    return 0


async def _account_show(ledger: Ledger, args: argparse.Namespace) -> int:
    _print_account(await ledger.get_account(args.account_id))
    return 0


async def _account_premium(ledger: Ledger, args: argparse.Namespace) -> int:
    account = await ledger.set_premium(args.account_id, args.state == "on")
    print(f"{account.id}: premium {'on' if account.premium else 'off'}")
    return 0


async def _account_disable(ledger: Ledger, args: argparse.Namespace) -> int:
    account = await ledger.set_disabled(args.account_id, True)
    print(f"{account.id}: disabled since {_when(account.disabled_at_ms)} UTC")
    print(
        "(every API key and JWT of the account is refused from now on; holds already placed settle)",
        file=sys.stderr,
    )
    return 0


async def _account_enable(ledger: Ledger, args: argparse.Namespace) -> int:
    account = await ledger.set_disabled(args.account_id, False)
    print(f"{account.id}: enabled")
    return 0


async def _key_create(ledger: Ledger, args: argparse.Namespace) -> int:
    key_id, key = await ledger.create_api_key(args.account_id, name=args.name)
    print(key)
    print(f"(key id {key_id}; the key is shown only now: it is not stored, only its hash)", file=sys.stderr)
    return 0


async def _key_list(ledger: Ledger, args: argparse.Namespace) -> int:
    await ledger.get_account(args.account_id)
    keys = await ledger.list_api_keys(args.account_id)
    if not keys:
        print("no keys")
    for key in keys:
        state = f"revoked {_when(key.revoked_at_ms)}" if key.revoked_at_ms is not None else "active"
        print(f"{key.id}  {key.prefix}...  {state:<28}  created {_when(key.created_at_ms)}  {key.name}")
    return 0


async def _key_revoke(ledger: Ledger, args: argparse.Namespace) -> int:
    key = await ledger.revoke_api_key(args.key_id)
    print(f"{key.id}: revoked")
    return 0


async def _credits_add(ledger: Ledger, args: argparse.Namespace) -> int:
    purchase = await ledger.add_credits(
        args.account_id, args.credits, kind="grant" if args.grant else "purchase"
    )
    account = await ledger.get_account(args.account_id)
    what = "granted" if args.grant else "added"
    print(
        f"{what} {format_credits(purchase.credits_units)} credits to {account.id}: "
        f"discount {purchase.discount_percent}%, paid {_dollars(purchase.paid_units)}"
    )
    print(f"balance: {format_credits(account.balance)} credits")
    return 0


async def _ledger(ledger: Ledger, args: argparse.Namespace) -> int:
    account = await ledger.get_account(args.account_id)
    entries = await ledger.ledger_entries(account.id, limit=args.limit)
    print(f"{account.id}: balance {format_credits(account.balance)}, held {format_credits(account.held)}")
    for entry in entries:
        amount = ("+" if entry.amount > 0 else "") + format_credits(entry.amount)
        print(
            f"{entry.id:>8}  {_when(entry.created_at_ms)}  {entry.kind:<8}  {amount:>12}  "
            f"{entry.reservation_id or '-':<36}  {entry.note}".rstrip()
        )
    return 0


async def _maintenance(ledger: Ledger, args: argparse.Namespace) -> int:
    if args.state != "status":
        await ledger.set_maintenance(args.state == "on")
    print(f"maintenance: {'on' if await ledger.maintenance() else 'off'}")
    return 0


def add_admin_commands(subparsers: Any) -> None:
    """Registers the admin commands on an argparse sub-parsers object (``kiln admin <command>``)."""
    account = subparsers.add_parser("account", help="create, show and change accounts")
    account_sub = account.add_subparsers(dest="account_command", required=True)
    create = account_sub.add_parser("create", help="create an account and print its id")
    create.add_argument("--name", required=True, help="display name")
    create.add_argument("--premium", action="store_true", help="premium accounts pay 0")
    create.add_argument("--subject", help="the JWT subject (sub) that maps to this account")
    create.add_argument("--credits", type=_credits, help="credits to grant at once")
    create.set_defaults(admin_handler=_account_create)
    show = account_sub.add_parser("show", help="balance, held credits and premium flag")
    show.add_argument("account_id")
    show.set_defaults(admin_handler=_account_show)
    premium = account_sub.add_parser("premium", help="turn premium on or off")
    premium.add_argument("account_id")
    premium.add_argument("state", choices=["on", "off"])
    premium.set_defaults(admin_handler=_account_premium)
    disable = account_sub.add_parser(
        "disable", help="refuse every API key and JWT of the account (401) until it is enabled again"
    )
    disable.add_argument("account_id")
    disable.set_defaults(admin_handler=_account_disable)
    enable = account_sub.add_parser("enable", help="accept the credentials of a disabled account again")
    enable.add_argument("account_id")
    enable.set_defaults(admin_handler=_account_enable)

    key = subparsers.add_parser("key", help="create, list and revoke API keys")
    key_sub = key.add_subparsers(dest="key_command", required=True)
    key_create = key_sub.add_parser("create", help="create a key and print it (once)")
    key_create.add_argument("account_id")
    key_create.add_argument("--name", default="", help="a label for the key")
    key_create.set_defaults(admin_handler=_key_create)
    key_list = key_sub.add_parser("list", help="list an account's keys")
    key_list.add_argument("account_id")
    key_list.set_defaults(admin_handler=_key_list)
    key_revoke = key_sub.add_parser("revoke", help="revoke a key by its id")
    key_revoke.add_argument("key_id")
    key_revoke.set_defaults(admin_handler=_key_revoke)

    credits = subparsers.add_parser("credits", help="add credits")
    credits_sub = credits.add_subparsers(dest="credits_command", required=True)
    add = credits_sub.add_parser(
        "add", help="buy credits (1,000+ 10%% off, 10,000+ 20%% off) or grant them with --grant"
    )
    add.add_argument("account_id")
    add.add_argument("credits", type=_credits)
    add.add_argument("--grant", action="store_true", help="free credits: nothing is paid")
    add.set_defaults(admin_handler=_credits_add)

    ledger = subparsers.add_parser("ledger", help="an account's ledger, newest first")
    ledger.add_argument("account_id")
    ledger.add_argument("--limit", type=int, default=50)
    ledger.set_defaults(admin_handler=_ledger)

    maintenance = subparsers.add_parser("maintenance", help="maintenance mode (503 for every request)")
    maintenance.add_argument("state", choices=["on", "off", "status"])
    maintenance.set_defaults(admin_handler=_maintenance)

    add_webhook_secret_command(subparsers)
    add_limits_command(subparsers)
    add_user_commands(subparsers)


async def open_ledger(settings: Settings) -> Ledger:
    """Opens (and migrates) the configured billing database."""
    url = settings.resolved_database_url
    if url.startswith("sqlite:"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return Ledger(await Database.open(url))


async def run_admin(args: argparse.Namespace, settings: Settings) -> int:
    """Runs the admin command ``args`` names; returns the exit status (errors go to stderr)."""
    handler: Handler | None = getattr(args, "admin_handler", None)
    if handler is None:
        print("kiln admin: no command given", file=sys.stderr)
        return 2
    ledger = await open_ledger(settings)
    try:
        return await handler(ledger, args)
    except KilnError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        await ledger.db.close()


async def ensure_demo_account(
    ledger: Ledger, *, api_key: str | None, credits: Decimal, premium: bool
) -> tuple[AccountRecord, str]:
    """The demo account ("demo") with at least ``credits`` and an API key for it.

    Creates the account if needed, tops it up to ``credits`` with a grant,
    sets ``premium``, and registers ``api_key`` (kept if already registered
    for it; an error if it belongs to another account or was revoked), or
    creates a fresh key when ``api_key`` is None.
    """
    found = await ledger.find_accounts_by_name(DEMO_ACCOUNT_NAME)
    account = found[0] if found else await ledger.create_account(DEMO_ACCOUNT_NAME, premium=premium)
    if account.premium != premium:
        account = await ledger.set_premium(account.id, premium)
    target = int(Decimal(credits) * UNITS_PER_CREDIT)
    if account.balance < target:
        await ledger.add_credits(account.id, format_credits(target - account.balance), kind="grant")
    if api_key is None:
        _, key = await ledger.create_api_key(account.id, name="demo")
    else:
        key = api_key
        existing = await ledger.find_api_key(api_key)
        if existing is None:
            await ledger.create_api_key(account.id, name="demo", key=api_key)
        elif existing.account_id != account.id:
            raise InvalidRequest(
                f"The demo API key is already registered for another account ({existing.account_id})."
            )
        elif existing.revoked_at_ms is not None:
            raise InvalidRequest(f"The demo API key was revoked (key id {existing.id}); choose another one.")
    return await ledger.get_account(account.id), key
