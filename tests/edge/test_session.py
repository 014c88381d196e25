"""Sign-in at the edge (edge/handlers/session.py) on billing and the edge with no capability
service: the session cookie's flags, the cookie as a credential, the CSRF token that every
state-changing request with the cookie needs, sign-out, and wrong passwords rate limited."""

from __future__ import annotations

from collections.abc import AsyncIterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.billing.sessions import SIGN_IN_FAILED_MESSAGE, Sessions
from services.common.errors import CsrfRejected
from tests.stack import OfflineStack, books, offline_stack, settled_books

PASSWORD = "correct horse battery staple"
IMAGE = {"prompt": "a red fox", "model": "z-image-turbo", "size": "512x512"}
PAID = "/v1/images/generations"


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[OfflineStack]:
    async with offline_stack(
        tmp_path_factory.mktemp("session"), sign_in_failures_per_name=3, sign_in_failures_per_address=0
    ) as offline:
        yield offline


async def user(stack: OfflineStack, name: str, credits: str = "10") -> tuple[str, dict[str, str]]:
    """A fresh account with credits, an API key and a user ``name``: its id and key headers."""
    account_id, headers = await stack.customer(credits)
    await Sessions(stack.ledger).create_user(account_id, name, PASSWORD)
    return account_id, headers


def browser() -> aiohttp.ClientSession:
    # unsafe: keep cookies of an IP-address host (the edge listens on 127.0.0.1)
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def sign_in(stack: OfflineStack, http: aiohttp.ClientSession, name: str) -> dict[str, Any]:
    async with http.post(stack.url + "/v1/session", json={"name": name, "password": PASSWORD}) as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


def error_of(body: dict[str, Any]) -> tuple[str, str]:
    return body["error"]["type"], body["error"]["message"]


async def test_sign_in_sets_an_http_only_lax_cookie_and_answers_no_api_key(stack: OfflineStack) -> None:
    account_id, _ = await user(stack, "ada")
    async with (
        browser() as http,
        http.post(stack.url + "/v1/session", json={"name": "ADA", "password": PASSWORD}) as response,
    ):
        assert response.status == 200
        body = await response.json()
        assert response.headers["Cache-Control"] == "no-store"
        raw = response.headers.getall("Set-Cookie")
    assert len(raw) == 1
    cookie = SimpleCookie(raw[0])["kiln_session"]
    assert cookie.value.startswith("ks-")
    assert cookie["httponly"] is True and cookie["samesite"] == "Lax" and cookie["path"] == "/"
    assert not cookie["secure"]  # plain http, and KILN_SESSION_COOKIE_SECURE is off
    assert int(cookie["max-age"]) == 24 * 3600
    assert body["object"] == "session" and body["user"] == "ada"
    assert body["account"]["id"] == account_id and body["account"]["balance"] == "10"
    assert body["expires_at"] - body["created_at"] == 24 * 3600
    assert body["csrf_token"] and body["csrf_token"] != cookie.value
    assert cookie.value not in str(body) and "sk-kiln-" not in str(body)  # no token, no API key


async def test_the_cookie_is_secure_when_tls_ends_in_front(tmp_path: Path) -> None:
    async with offline_stack(tmp_path, session_cookie_secure=True) as secure:
        await user(secure, "tls")
        async with (
            browser() as http,
            http.post(secure.url + "/v1/session", json={"name": "tls", "password": PASSWORD}) as response,
        ):
            assert response.status == 200
            cookie = SimpleCookie(response.headers["Set-Cookie"])["kiln_session"]
    assert cookie["secure"] is True and cookie["httponly"] is True


async def test_the_cookie_authenticates_and_state_changing_calls_need_the_csrf_token(
    stack: OfflineStack,
) -> None:
    account_id, key_headers = await user(stack, "bea")
    async with browser() as http:
        signed_in = await sign_in(stack, http, "bea")
        csrf = {"X-CSRF-Token": signed_in["csrf_token"]}

        async with http.get(stack.url + "/v1/account") as response:  # a GET: the cookie alone
            assert response.status == 200 and (await response.json())["id"] == account_id
        async with http.get(stack.url + "/v1/session") as response:
            session = await response.json()
            assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
            assert (session["user"], session["csrf_token"]) == ("bea", signed_in["csrf_token"])

        # A paid POST with the cookie: 403 without the CSRF token (or with another), before anything.
        for headers in ({}, {"X-CSRF-Token": "forged"}):
            async with http.post(
                stack.url + PAID, params={"dry_run": "true"}, json=IMAGE, headers=headers
            ) as r:
                assert r.status == 403
                assert error_of(await r.json()) == ("authentication_error", CsrfRejected.default_message)
        async with http.post(stack.url + PAID, json=IMAGE) as response:
            assert response.status == 403
        # With it, the request proceeds (a dry run: nothing runs or is held).
        async with http.post(stack.url + PAID, params={"dry_run": "true"}, json=IMAGE, headers=csrf) as r:
            assert r.status == 200, await r.text()
            preview = await r.json()
            assert preview["object"] == "price_preview" and preview["balance_sufficient"] is True
        # An API key next to the cookie is the credential: no CSRF token needed (no page can set it).
        async with http.post(
            stack.url + PAID, params={"dry_run": "true"}, json=IMAGE, headers=key_headers
        ) as response:
            assert response.status == 200
        # The real call gets past the credential, the CSRF check and the rate limiter to Authorize
        # (the image service of this stack leads nowhere: the hold is released, nothing charged).
        async with http.post(stack.url + PAID, json=IMAGE, headers=csrf) as response:
            assert response.status not in (401, 403), await response.text()
        holds = await stack.ledger.db.run(
            lambda tx: tx.all("SELECT state FROM reservations WHERE account_id = ?", (account_id,))
        )
        assert len(holds) == 1
        assert (await settled_books(stack.ledger, account_id)).balance == 1000

        # Signing out is a state change too.
        async with http.delete(stack.url + "/v1/session") as response:
            assert response.status == 403
    assert (await books(stack.ledger, account_id)).held == 0


async def test_sign_out_revokes_the_session(stack: OfflineStack) -> None:
    await user(stack, "cyd")
    async with browser() as http:
        signed_in = await sign_in(stack, http, "cyd")
        token = next(c.value for c in http.cookie_jar if c.key == "kiln_session")
        async with http.delete(
            stack.url + "/v1/session", headers={"X-CSRF-Token": signed_in["csrf_token"]}
        ) as response:
            assert response.status == 200 and await response.json() == {
                "object": "session",
                "signed_out": True,
            }
            cleared = SimpleCookie(response.headers["Set-Cookie"])["kiln_session"]
            assert cleared.value == "" and cleared["max-age"] == "0"
        async with http.get(stack.url + "/v1/session") as response:
            assert response.status == 401  # the cookie is gone from the browser
    # ... and the old cookie, sent again, names a revoked session.
    async with aiohttp.ClientSession(headers={"Cookie": f"kiln_session={token}"}) as http:
        for path in ("/v1/account", "/v1/session"):
            async with http.get(stack.url + path) as response:
                assert response.status == 401
                assert (await response.json())["error"]["type"] == "authentication_error"


async def test_every_failed_sign_in_is_the_same_401_and_wrong_passwords_are_limited(
    stack: OfflineStack,
) -> None:
    await user(stack, "dee")
    async with aiohttp.ClientSession() as http:
        answers = []
        for name, password in (("dee", "wrong"), ("nobody", PASSWORD), ("dee", "wrong again")):
            async with http.post(stack.url + "/v1/session", json={"name": name, "password": password}) as r:
                assert r.status == 401 and "Set-Cookie" not in r.headers
                answers.append(error_of(await r.json()))
        assert set(answers) == {("authentication_error", SIGN_IN_FAILED_MESSAGE)}
        # dee had 2 wrong passwords; a third, and the right one is refused for a while.
        async with http.post(stack.url + "/v1/session", json={"name": "dee", "password": "x"}) as r:
            assert r.status == 401
        async with http.post(stack.url + "/v1/session", json={"name": "dee", "password": PASSWORD}) as r:
            assert r.status == 429
            assert error_of(await r.json())[0] == "rate_limit_error"
            assert 1 <= int(r.headers["Retry-After"]) <= 900

        # Only JSON: a cross-site form cannot sign anybody in.
        async with http.post(stack.url + "/v1/session", data={"name": "dee", "password": PASSWORD}) as r:
            assert r.status == 400
        async with http.post(stack.url + "/v1/session", json={"name": "dee"}) as r:
            assert r.status == 400
        async with http.delete(stack.url + "/v1/session") as r:
            assert r.status == 401  # no session to end
