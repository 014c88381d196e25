"""``kiln admin user ...`` and ``kiln admin session ...``: the users who sign in to an account
and their sessions (:mod:`services.billing.sessions`), registered by :mod:`services.billing.admin`.

Commands::

    user create ACCOUNT --name N [--password-stdin]   (else the password is asked twice)
    user list ACCOUNT
    user password NAME [--password-stdin]             (revokes the user's sessions)
    user disable NAME / user enable NAME              (disabling revokes its sessions)
    session list --user NAME
    session revoke --user NAME

A password is never an argument (it would land in the shell's history and the process
list): it is read from the terminal without echo, or from the first line of stdin.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from datetime import UTC, datetime
from typing import Any

from services.billing.ledger import Ledger
from services.billing.sessions import Sessions
from services.common.errors import InvalidRequest


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def read_password(args: argparse.Namespace) -> str:
    """The new password: stdin's first line with ``--password-stdin``, else asked twice."""
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Password again: ") != first:
        raise InvalidRequest("The passwords differ.")
    return first


async def _user_create(ledger: Ledger, args: argparse.Namespace) -> int:
    password = read_password(args)
    user = await Sessions(ledger).create_user(args.account_id, args.name, password)
    print(user.id)
    print(f"(user '{user.name}' signs in to account {user.account_id})", file=sys.stderr)
    return 0


async def _user_list(ledger: Ledger, args: argparse.Namespace) -> int:
    await ledger.get_account(args.account_id)
    users = await Sessions(ledger).list_users(args.account_id)
    if not users:
        print("no users")
    for user in users:
        state = f"disabled {_when(user.disabled_at_ms)}" if user.disabled_at_ms is not None else "active"
        print(f"{user.id}  {user.name:<32}  {state:<28}  created {_when(user.created_at_ms)}")
    return 0


async def _user_password(ledger: Ledger, args: argparse.Namespace) -> int:
    sessions = Sessions(ledger)
    await sessions.get_user(args.name)
    revoked = await sessions.set_password(args.name, read_password(args))
    print(f"{args.name.strip().lower()}: password changed, {revoked} session(s) revoked")
    return 0


async def _user_disable(ledger: Ledger, args: argparse.Namespace) -> int:
    user = await Sessions(ledger).set_user_disabled(args.name, True)
    print(f"{user.name}: disabled since {_when(user.disabled_at_ms)} UTC (its sessions are revoked)")
    return 0


async def _user_enable(ledger: Ledger, args: argparse.Namespace) -> int:
    user = await Sessions(ledger).set_user_disabled(args.name, False)
    print(f"{user.name}: enabled")
    return 0


async def _session_list(ledger: Ledger, args: argparse.Namespace) -> int:
    now = ledger.now_ms()
    found = await Sessions(ledger).list_sessions(args.user)
    if not found:
        print("no sessions")
    for session in found:
        if session.revoked_at_ms is not None:
            state = f"revoked {_when(session.revoked_at_ms)}"
        elif session.expires_at_ms <= now:
            state = "expired"
        else:
            state = f"live until {_when(session.expires_at_ms)}"
        print(f"{session.id}  created {_when(session.created_at_ms)}  {state}")
    return 0


async def _session_revoke(ledger: Ledger, args: argparse.Namespace) -> int:
    revoked = await Sessions(ledger).revoke_user_sessions(args.user)
    print(f"{args.user.strip().lower()}: {revoked} session(s) revoked")
    return 0


def add_user_commands(subparsers: Any) -> None:
    """Registers ``user`` and ``session`` on ``kiln admin``'s sub-parsers."""
    user = subparsers.add_parser("user", help="the users who sign in to an account (name and password)")
    user_sub = user.add_subparsers(dest="user_command", required=True)
    create = user_sub.add_parser("create", help="create a user of an account and print its id")
    create.add_argument("account_id")
    create.add_argument("--name", required=True, help="the sign-in name (case-insensitive)")
    create.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin's first line"
    )
    create.set_defaults(admin_handler=_user_create)
    listing = user_sub.add_parser("list", help="list an account's users")
    listing.add_argument("account_id")
    listing.set_defaults(admin_handler=_user_list)
    password = user_sub.add_parser("password", help="set a user's password (revokes its sessions)")
    password.add_argument("name")
    password.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin's first line"
    )
    password.set_defaults(admin_handler=_user_password)
    disable = user_sub.add_parser("disable", help="refuse the user's sign-ins and revoke its sessions")
    disable.add_argument("name")
    disable.set_defaults(admin_handler=_user_disable)
    enable = user_sub.add_parser("enable", help="let a disabled user sign in again")
    enable.add_argument("name")
    enable.set_defaults(admin_handler=_user_enable)

    session = subparsers.add_parser("session", help="sign-in sessions")
    session_sub = session.add_subparsers(dest="session_command", required=True)
    session_list = session_sub.add_parser("list", help="a user's sessions, newest first")
    session_list.add_argument("--user", required=True, help="the user's name")
    session_list.set_defaults(admin_handler=_session_list)
    revoke = session_sub.add_parser("revoke", help="revoke every live session of a user")
    revoke.add_argument("--user", required=True, help="the user's name")
    revoke.set_defaults(admin_handler=_session_revoke)
