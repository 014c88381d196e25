"""Sign-in: ``POST /v1/session``, ``GET /v1/session``, ``DELETE /v1/session``, and the session
cookie as the third credential (:func:`session_credential`, used by ``edge.flow.credential_from``).

* ``POST /v1/session`` with ``{"name", "password"}`` as JSON (only JSON: a form on another
  site cannot send it without CORS, which the edge does not allow, so no page can sign a
  visitor in to another account) signs in through billing (:mod:`services.billing.sessions`)
  and sets the ``kiln_session`` cookie: ``HttpOnly; SameSite=Lax; Path=/``, ``Secure`` when
  the request came over https or ``KILN_SESSION_COOKIE_SECURE`` says TLS ends in front, and
  ``Max-Age`` the session's lifetime. The answer holds the account, the user, the CSRF token
  and the expiry: never an API key. A session cookie the request already had is signed out.
* ``GET /v1/session``: the signed-in user and account, and the CSRF token again (a page that
  reloads reads it here: no other origin can read this answer).
* ``DELETE /v1/session`` signs out: the session is revoked in billing and the cookie cleared.

Every request the cookie authenticates with a method other than GET, HEAD or OPTIONS must
send the session's CSRF token in ``X-CSRF-Token``; without it (or with another) it is refused
with a 403 ``authentication_error`` (:class:`~services.common.errors.CsrfRejected`) before its
body is read. ``X-API-Key`` and ``Authorization`` come before the cookie, and need no CSRF
token: a page on another origin cannot set them.
"""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from edge.forms import read_body
from edge.keys import REQUEST_ID, SETTINGS, UPSTREAMS
from edge.response_models import Account
from edge.responses import json_response
from edge.schemas import parse_body
from kiln.billing.v1 import billing_service_pb2 as billing_pb
from services.billing.sessions import MAX_PASSWORD_CHARS, csrf_token_for, csrf_token_matches
from services.common.errors import AuthenticationFailed, CsrfRejected, InvalidRequest
from services.common.money import format_credits

SESSION_COOKIE = "kiln_session"
CSRF_HEADER = "X-CSRF-Token"
#: Methods that change nothing: the cookie alone authenticates them.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: The answers carry the CSRF token: never kept by a cache.
_NO_STORE = {"Cache-Control": "no-store"}


class SignInRequest(BaseModel):
    """``POST /v1/session``'s body."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=256, description="The user name (case-insensitive).")
    password: str = Field(min_length=1, max_length=MAX_PASSWORD_CHARS)


class SessionInfo(BaseModel):
    """A signed-in session: its user and account, its CSRF token and when it ends."""

    object: Literal["session"] = "session"
    user: str = Field(description="The signed-in user's name.")
    account: Account
    csrf_token: str = Field(
        description="Send it in X-CSRF-Token with every POST, PUT, PATCH or DELETE the cookie authenticates."
    )
    created_at: int = Field(description="When the session began (Unix seconds).")
    expires_at: int = Field(description="When the session ends (Unix seconds).")


class SignedOut(BaseModel):
    object: Literal["session"] = "session"
    signed_out: bool = Field(description="Whether a live session was revoked.")


def session_token(request: web.Request) -> str:
    """The ``kiln_session`` cookie's value ('' when there is none)."""
    return request.cookies.get(SESSION_COOKIE, "").strip()


def session_credential(request: web.Request) -> billing_pb.Credential | None:
    """The session cookie as a credential (None without one); CsrfRejected (403) for a
    state-changing request without the session's CSRF token."""
    token = session_token(request)
    if not token:
        return None
    if request.method not in SAFE_METHODS and not csrf_token_matches(
        token, request.headers.get(CSRF_HEADER, "")
    ):
        raise CsrfRejected()
    return billing_pb.Credential(session_token=token)


def client_address(request: web.Request) -> str:
    """The client's address for the per-address sign-in limit: the last entry of the trusted
    proxy's header (``KILN_SIGN_IN_CLIENT_ADDRESS_HEADER``), else the connection's peer."""
    header = request.app[SETTINGS].sign_in_client_address_header
    if header:
        last = request.headers.get(header, "").split(",")[-1].strip()
        if last:
            return last
    return request.remote or ""


def _info(account: billing_pb.Account, session: billing_pb.Session, token: str) -> dict[str, Any]:
    return {
        "object": "session",
        "user": session.user_name,
        "account": {
            "id": account.id,
            "name": account.name,
            "premium": account.premium,
            "balance": format_credits(account.balance_hundredths),
            "held": format_credits(account.held_hundredths),
        },
        "csrf_token": csrf_token_for(token),
        "created_at": session.created_at_ms // 1000,
        "expires_at": session.expires_at_ms // 1000,
    }


def _secure(request: web.Request) -> bool:
    return request.secure or request.app[SETTINGS].session_cookie_secure


async def sign_in(request: web.Request) -> web.Response:
    """Signs in with a user name and password; sets the session cookie."""
    if request.content_type != "application/json":
        raise InvalidRequest("Send the user name and password as JSON (Content-Type: application/json).")
    body = parse_body(SignInRequest, await read_body(request))
    billing = request.app[UPSTREAMS].billing
    answer = await billing.sign_in(body.name, body.password, client_address(request), request[REQUEST_ID])
    previous = session_token(request)
    if previous and previous != answer.session_token:
        await billing.sign_out(previous, request[REQUEST_ID])  # one browser, one session
    response = json_response(_info(answer.account, answer.session, answer.session_token), headers=_NO_STORE)
    response.set_cookie(
        SESSION_COOKIE,
        answer.session_token,
        path="/",
        max_age=max(0, (answer.session.expires_at_ms - answer.session.created_at_ms) // 1000),
        secure=_secure(request),
        httponly=True,
        samesite="Lax",
    )
    return response


async def get_session(request: web.Request) -> web.Response:
    """The signed-in user and account, and the session's CSRF token."""
    token = session_token(request)
    if not token:
        raise AuthenticationFailed()
    answer = await request.app[UPSTREAMS].billing.authenticate_session(token, request[REQUEST_ID])
    return json_response(_info(answer.account, answer.session, token), headers=_NO_STORE)


async def sign_out(request: web.Request) -> web.Response:
    """Signs out: revokes the session and clears the cookie (the CSRF token is required)."""
    credential = session_credential(request)
    if credential is None:
        raise AuthenticationFailed()
    revoked = await request.app[UPSTREAMS].billing.sign_out(credential.session_token, request[REQUEST_ID])
    response = json_response({"object": "session", "signed_out": revoked}, headers=_NO_STORE)
    response.del_cookie(SESSION_COOKIE, path="/", secure=_secure(request), httponly=True, samesite="Lax")
    return response
