"""``kiln admin webhook-secret ACCOUNT [--rotate] [--grace-hours N]``: an account's webhook
signing secret (``services.billing.webhooks``), registered by :mod:`services.billing.admin`."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from typing import Any

from services.billing.ledger import Ledger
from services.billing.webhooks import DEFAULT_GRACE_MS, MAX_GRACE_MS, rotate_webhook_secret, webhook_secrets


def _grace_hours(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of hours: {text!r}") from None
    if not 0 <= value * 3_600_000 <= MAX_GRACE_MS:
        raise argparse.ArgumentTypeError(f"the grace period is 0 to {MAX_GRACE_MS // 3_600_000} hours")
    return value


async def webhook_secret(ledger: Ledger, args: argparse.Namespace) -> int:
    """Prints the account's current secret (made on first use); ``--rotate`` makes a new one."""
    account = await ledger.get_account(args.account_id)
    now = int(time.time() * 1000)
    if args.rotate:
        grace = round(args.grace_hours * 3_600_000)
        found = await ledger.db.run(
            lambda tx: rotate_webhook_secret(tx, account.id, grace_ms=grace, now_ms=now)
        )
    else:
        found = await ledger.db.run(lambda tx: webhook_secrets(tx, account.id, now_ms=now))
    print(found.secret)
    signing = found.signing_secrets(now)
    if len(signing) > 1 and found.previous_expires_at_ms is not None:
        until = datetime.fromtimestamp(found.previous_expires_at_ms / 1000, tz=UTC).strftime(
            "%Y-%m-%d %H:%M:%S"
        )
        print(
            f"(the previous secret {signing[1]} also signs every message until {until} UTC)",
            file=sys.stderr,
        )
    elif args.rotate:
        print("(the previous secret no longer signs anything)", file=sys.stderr)
    return 0


def add_webhook_secret_command(subparsers: Any) -> None:
    """Registers ``webhook-secret`` on the admin command's sub-parsers."""
    command = subparsers.add_parser(
        "webhook-secret", help="print an account's webhook signing secret, or rotate it with --rotate"
    )
    command.add_argument("account_id")
    command.add_argument(
        "--rotate",
        action="store_true",
        help="make a new secret; the old one keeps signing for the grace period",
    )
    command.add_argument(
        "--grace-hours",
        type=_grace_hours,
        default=DEFAULT_GRACE_MS / 3_600_000,
        help="how long the old secret keeps signing after --rotate (default 24; 0: stops at once)",
    )
    command.set_defaults(admin_handler=webhook_secret)
