"""``kiln admin limits ACCOUNT [--rpm N] [--rpm CAPABILITY=N ...] [--concurrent N] [--reset]``:
an account's own rate limits (:mod:`services.billing.rate_limits`), registered by
:mod:`services.billing.admin`.

``--rpm N`` sets the account's requests per minute for every capability, ``--rpm chat=30``
for one capability (``chat=default`` drops that one again), ``--concurrent N`` its
synchronous jobs in flight; 0 means no limit. ``default`` for ``--rpm`` or ``--concurrent``
goes back to the tier's setting (``KILN_RATE_LIMIT_*``), ``--reset`` drops every override.
Without options it prints the account's own limits. A running billing service sees a
change at its next request.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from services.billing.ledger import Ledger
from services.billing.rate_limits import AccountLimits, get_limits, reset_limits, set_limits

DEFAULT = "default"
_NOT_GIVEN = object()
_CAPABILITY = re.compile(r"[a-z][a-z0-9_]{0,63}")


def _amount(text: str) -> int | None:
    if text == DEFAULT:
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a limit is a whole number of 0 or more, or 'default': {text!r}")
    return int(text)


def _rpm(text: str) -> tuple[str, int | None]:
    """``N`` (every capability: the name is empty) or ``CAPABILITY=N``."""
    name, sep, value = text.partition("=")
    if not sep:
        return "", _amount(text)
    if not _CAPABILITY.fullmatch(name):
        raise argparse.ArgumentTypeError(f"not a capability name (e.g. chat, image_generation): {name!r}")
    return name, _amount(value)


def _shown(value: int | None) -> str:
    if value is None:
        return "tier default"
    return "no limit" if value == 0 else str(value)


def _print(account_id: str, own: AccountLimits | None) -> None:
    own = own or AccountLimits()
    print(f"{account_id}:")
    print(f"  requests per minute: {_shown(own.rpm)}")
    for name, value in sorted(own.capability_rpm.items()):
        print(f"    {name}: {_shown(value)}")
    print(f"  jobs in flight:      {_shown(own.max_concurrent)}")


async def limits(ledger: Ledger, args: argparse.Namespace) -> int:
    account = await ledger.get_account(args.account_id)
    if args.reset:
        await reset_limits(ledger, account.id)
    changes: dict[str, Any] = {}
    per_capability: dict[str, int | None] = {}
    for name, value in args.rpm or ():
        if name:
            per_capability[name] = value
        else:
            changes["rpm"] = value
    if args.concurrent is not _NOT_GIVEN:
        changes["max_concurrent"] = args.concurrent
    if changes or per_capability:
        await set_limits(ledger, account.id, capability_rpm=per_capability, **changes)
    _print(account.id, await get_limits(ledger, account.id))
    return 0


def add_limits_command(subparsers: Any) -> None:
    """Registers ``limits`` on ``kiln admin``'s sub-parsers."""
    command = subparsers.add_parser(
        "limits", help="an account's own rate limits (requests per minute, jobs in flight)"
    )
    command.add_argument("account_id")
    command.add_argument(
        "--rpm",
        type=_rpm,
        action="append",
        metavar="[CAPABILITY=]N",
        help="requests per minute: for every capability (N) or one (chat=30); 0: no limit; "
        "'default': the tier's setting",
    )
    command.add_argument(
        "--concurrent",
        type=_amount,
        default=_NOT_GIVEN,
        metavar="N",
        help="synchronous jobs in flight; 0: no limit; 'default': the tier's",
    )
    command.add_argument("--reset", action="store_true", help="drop every override of the account first")
    command.set_defaults(admin_handler=limits)
