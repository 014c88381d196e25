"""Chat ``image_url`` fetches against a local server playing the attacker.

The attacker serves https (a self-signed certificate the fetcher is told to
trust) on 127.0.0.2, which the fetcher's allow-list opens; every other
non-public address stays blocked, so a redirect from the attacker to a victim
on 127.0.0.1 (or to a 6to4/NAT64/Teredo literal, or to http) is refused at
that hop, and the victim counts zero requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from yarl import URL

from edge.fetch import FETCH_CONCURRENCY, MAX_REDIRECTS, ImageFetcher, UnsafeAddress, check_public
from services.common.errors import InvalidRequest
from tests.conftest import Mesh, new_customer
from tests.edge.images_util import png_bytes
from tests.stack import edge_app, settled_books

ATTACKER_HOST = "127.0.0.2"
ALLOW = [ipaddress.ip_network(f"{ATTACKER_HOST}/32")]
CHAT = "/v1/chat/completions"
QWEN = "Qwen/Qwen3.5-4B"
PNG = png_bytes(8, 8)


@dataclass
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def tls() -> Tls:
    """A self-signed certificate for 127.0.0.1, 127.0.0.2 and localhost, and a client that trusts it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kiln test attacker")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address(ATTACKER_HOST)),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.NamedTemporaryFile() as cert_file, tempfile.NamedTemporaryFile() as key_file:
        cert_file.write(cert_pem)
        key_file.write(key_pem)
        cert_file.flush()
        key_file.flush()
        server.load_cert_chain(cert_file.name, key_file.name)
    client = ssl.create_default_context(cadata=cert_pem.decode())
    return Tls(server, client)


@dataclass
class Server:
    """A local HTTP(S) server that counts the requests it gets."""

    base: str
    hits: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def serve(host: str, ssl_context: ssl.SSLContext | None) -> AsyncIterator[Server]:
    """The attacker (or a victim): /img is a PNG, /to?url=U redirects to U, /loop redirects to
    itself, /chain/N redirects N times before the PNG, /big/N sends N bytes (chunked)."""
    server = Server("")

    async def handle(request: web.Request) -> web.StreamResponse:
        server.hits.append(request.path_qs)
        path = request.path
        if path in ("/img", "/chain/0"):
            return web.Response(body=PNG, content_type="image/png")
        if path == "/to":
            raise web.HTTPFound(request.query["url"])
        if path == "/loop":
            raise web.HTTPFound("/loop")
        if path.startswith("/big/"):  # n bytes, chunked: no Content-Length to judge by
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            left = int(path.rsplit("/", 1)[1])
            while left > 0:
                await response.write(b"\0" * min(left, 16 * 1024))
                left -= 16 * 1024
            await response.write_eof()
            return response
        if path.startswith("/chain/"):
            left = int(path.rsplit("/", 1)[1])
            raise web.HTTPFound(f"/chain/{left - 1}")
        raise web.HTTPNotFound()

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0, ssl_context=ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    scheme = "https" if ssl_context else "http"
    server.base = f"{scheme}://{host}:{port}" if ":" not in host else f"{scheme}://[{host}]:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()


@dataclass
class Staller:
    """A TCP server that accepts connections and never says a word (not even TLS)."""

    port: int
    connections: int = 0


@contextlib.asynccontextmanager
async def stall(host: str = ATTACKER_HOST) -> AsyncIterator[Staller]:
    staller = Staller(0)
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        staller.connections += 1
        held.append(writer)

    server = await asyncio.start_server(accept, host, 0)
    staller.port = server.sockets[0].getsockname()[1]
    try:
        yield staller
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.fixture
async def attacker(tls: Tls) -> AsyncIterator[Server]:
    async with serve(ATTACKER_HOST, tls.server) as server:
        yield server


@pytest.fixture
async def victim(tls: Tls) -> AsyncIterator[Server]:
    """An https server on 127.0.0.1, which the allow-list does not open."""
    async with serve("127.0.0.1", tls.server) as server:
        yield server


async def fetch(tls: Tls, url: str, *, deadline: float = 10.0) -> bytes:
    async with ImageFetcher(
        deadline_seconds=deadline, max_bytes=1024 * 1024, allow=ALLOW, ssl_context=tls.client
    ) as fetcher:
        return await fetcher.fetch(url, "messages[0].content[0]")


def redirect(attacker: Server, target: str) -> str:
    """The attacker's URL that redirects to ``target``."""
    return str(URL(f"{attacker.base}/to").with_query(url=target))


async def refused(tls: Tls, url: str) -> str:
    with pytest.raises(InvalidRequest) as caught:
        await fetch(tls, url)
    assert caught.value.error_type == "invalid_request_error"
    return caught.value.message


# --- the allow-list opens the attacker, and only it ---


async def test_the_allowed_test_server_is_fetched_through_redirects_up_to_the_limit(
    tls: Tls, attacker: Server
) -> None:
    assert await fetch(tls, f"{attacker.base}/img") == PNG
    assert await fetch(tls, f"{attacker.base}/chain/{MAX_REDIRECTS}") == PNG


async def test_without_the_allow_list_the_test_server_is_loopback_and_refused(
    tls: Tls, attacker: Server
) -> None:
    async with ImageFetcher(deadline_seconds=5, max_bytes=1024, ssl_context=tls.client) as fetcher:
        with pytest.raises(InvalidRequest, match="loopback address"):
            await fetcher.fetch(f"{attacker.base}/img", "image")
    assert attacker.hits == []


# --- every hop is checked again ---


def victim_urls(port: int) -> list[str]:
    """The same loopback victim, written every way that reaches it."""
    return [
        f"https://127.0.0.1:{port}/img",
        f"https://[::ffff:127.0.0.1]:{port}/img",  # IPv4-mapped
        f"https://2130706433:{port}/img",  # 127.0.0.1 as one number (no resolver for aiohttp)
        f"https://127.1:{port}/img",  # short form
        f"https://localhost:{port}/img",  # a name: the resolver's check
    ]


@pytest.mark.parametrize("form", range(5), ids=["literal", "mapped", "integer", "short", "name"])
async def test_a_redirect_to_a_blocked_address_is_refused_at_that_hop(
    tls: Tls, attacker: Server, victim: Server, form: int
) -> None:
    target = victim_urls(int(victim.base.rsplit(":", 1)[1]))[form]
    message = await refused(tls, redirect(attacker, target))
    assert message.startswith("messages[0].content[0]: ")
    assert "loopback address" in message or "neither a host name nor a plain IP address" in message
    assert len(attacker.hits) == 1
    assert victim.hits == []  # never reached


@pytest.mark.parametrize(
    ("literal", "kind"),
    [
        ("[2002:7f00:1::1]", "6to4 address (embedding 127.0.0.1)"),
        ("[2002:a9fe:a9fe::]", "6to4 address (embedding 169.254.169.254)"),
        ("[64:ff9b::7f00:1]", "NAT64 address (embedding 127.0.0.1)"),
        ("[64:ff9b::808:808]", "NAT64 address (embedding 8.8.8.8)"),
        ("[64:ff9b:1::a00:1]", "NAT64 (local-use) address"),
        ("[2001:0:4136:e378:8000:63bf:80ff:fffe]", "Teredo address (embedding 127.0.0.1)"),
        ("[::7f00:1]", "IPv4-compatible address (embedding 127.0.0.1)"),
        ("[::ffff:a9fe:a9fe]", "link-local (cloud metadata) address"),
        ("[fd00::1]", "private address"),
        ("[fe80::1%25eth0]", "link-local (cloud metadata) address"),
        ("100.64.0.1", "private address"),
        ("0.0.0.0", "private address"),
    ],
)
async def test_transition_and_private_literals_are_refused_directly_and_after_a_redirect(
    tls: Tls, attacker: Server, literal: str, kind: str
) -> None:
    assert kind in await refused(tls, f"https://{literal}/img")
    assert kind in await refused(tls, redirect(attacker, f"https://{literal}/img"))
    assert len(attacker.hits) == 1


def test_the_allow_list_never_opens_a_transition_range_that_embeds_an_allowed_address() -> None:
    loopback = [ipaddress.ip_network("127.0.0.0/8")]
    check_public("127.0.0.1", "127.0.0.1", loopback)
    check_public("::ffff:127.0.0.1", "::ffff:127.0.0.1", loopback)  # the same address, mapped
    for tunnelled in ("2002:7f00:1::", "64:ff9b::7f00:1", "2001:0:4136:e378:8000:63bf:80ff:fffe"):
        with pytest.raises(UnsafeAddress):
            check_public(tunnelled, tunnelled, loopback)
    for public in ("8.8.8.8", "::ffff:8.8.8.8", "2606:4700:4700::1111"):
        check_public(public, public)


async def test_a_redirect_from_https_to_http_is_refused(tls: Tls, attacker: Server) -> None:
    async with serve(ATTACKER_HOST, None) as plain:  # an allowed address, but not https
        message = await refused(tls, redirect(attacker, f"{plain.base}/img"))
        assert f"redirected to '{plain.base}/img'; only https:// URLs are followed" in message
        assert plain.hits == []
        assert "only data: URLs and https:// URLs" in await refused(tls, f"{plain.base}/img")
        assert plain.hits == []


async def test_too_many_redirects_are_refused(tls: Tls, attacker: Server) -> None:
    message = await refused(tls, f"{attacker.base}/loop")
    assert f"redirected more than {MAX_REDIRECTS} times" in message
    assert len(attacker.hits) == MAX_REDIRECTS + 1
    assert f"more than {MAX_REDIRECTS}" in await refused(tls, f"{attacker.base}/chain/{MAX_REDIRECTS + 1}")


async def test_a_redirect_with_a_long_location_is_quoted_short(tls: Tls, attacker: Server) -> None:
    target = "http://example.com/" + "a" * 5000
    message = await refused(tls, redirect(attacker, target))
    assert len(message) < 300


# --- one request: sizes, one deadline for all, the image count before any fetch ---


async def test_bodies_are_bounded_per_image_and_per_request(tls: Tls, attacker: Server) -> None:
    async with ImageFetcher(
        deadline_seconds=10, max_bytes=100_000, max_total_bytes=150_000, allow=ALLOW, ssl_context=tls.client
    ) as fetcher:
        with pytest.raises(InvalidRequest, match="the image is larger than 100000 bytes"):
            await fetcher.fetch(f"{attacker.base}/big/10000000", "image")
    async with ImageFetcher(
        deadline_seconds=10, max_bytes=100_000, max_total_bytes=150_000, allow=ALLOW, ssl_context=tls.client
    ) as fetcher:
        urls = [(f"messages[0].content[{i}]", f"{attacker.base}/big/60000") for i in range(3)]
        with pytest.raises(InvalidRequest, match="images are larger than 150000 bytes together"):
            await fetcher.fetch_all(urls)


async def test_the_fetches_of_one_request_share_one_deadline(tls: Tls) -> None:
    deadline = 0.5
    async with (
        stall() as attacker,
        ImageFetcher(
            deadline_seconds=deadline, max_bytes=1024, allow=ALLOW, ssl_context=tls.client
        ) as fetcher,
    ):
        urls = [(f"image {i}", f"https://{ATTACKER_HOST}:{attacker.port}/{i}.png") for i in range(16)]
        started = time.monotonic()
        with pytest.raises(InvalidRequest, match=r"took longer than 0.5 seconds"):
            await fetcher.fetch_all(urls)
        elapsed = time.monotonic() - started
    # Per-URL deadlines would have let all 16 connect (16 / 4 x 0.5 s); one shared deadline
    # stops the first 4 and never starts the rest.
    assert attacker.connections == FETCH_CONCURRENCY
    assert elapsed < deadline + 1.5


async def test_the_first_refused_url_stops_the_others(tls: Tls, attacker: Server) -> None:
    async with (
        stall() as slow,
        ImageFetcher(deadline_seconds=30, max_bytes=1024, allow=ALLOW, ssl_context=tls.client) as fetcher,
    ):
        urls = [
            ("messages[0].content[0]", f"https://{ATTACKER_HOST}:{slow.port}/a.png"),
            ("messages[0].content[1]", redirect(attacker, "https://169.254.169.254/latest/meta-data")),
        ]
        started = time.monotonic()
        with pytest.raises(InvalidRequest, match=r"content\[1\]: .* link-local \(cloud metadata\)"):
            await fetcher.fetch_all(urls)
        assert time.monotonic() - started < 10  # not the 30 s deadline of the stalled one


def chat(urls: list[str]) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": "What is in these images?"}]
    content += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"model": QWEN, "messages": [{"role": "user", "content": content}], "max_tokens": 4}


async def test_too_many_image_urls_are_refused_before_any_fetch(mesh: Mesh) -> None:
    customer = await new_customer(mesh, "5", premium=True)
    settings = mesh.settings.model_copy(update={"fetch_allow_networks": ALLOW, "max_chat_images": 3})
    async with stall() as attacker, edge_app(settings) as edge, aiohttp.ClientSession() as http:
        urls = [f"https://{ATTACKER_HOST}:{attacker.port}/{i}.png" for i in range(4)]
        for stream in (False, True):
            async with http.post(
                edge.url + CHAT, json=chat(urls) | {"stream": stream}, headers=customer.headers
            ) as r:
                payload = await r.json()
                assert r.status == 400, payload
            assert payload["error"]["type"] == "invalid_request_error"
            assert payload["error"]["message"] == "Too many images: 4; a chat request may carry at most 3"
        assert attacker.connections == 0
    state = await settled_books(mesh.ledger, customer.account_id)
    assert (state.balance, state.held, state.open_holds) == (500, 0, 0)


async def test_a_slow_server_across_many_urls_hits_one_shared_deadline(mesh: Mesh) -> None:
    customer = await new_customer(mesh, "5", premium=True)
    deadline = 0.5
    settings = mesh.settings.model_copy(
        update={"fetch_allow_networks": ALLOW, "chat_image_fetch_seconds": deadline, "max_chat_images": 16}
    )
    async with stall() as attacker, edge_app(settings) as edge, aiohttp.ClientSession() as http:
        urls = [f"https://{ATTACKER_HOST}:{attacker.port}/{i}.png" for i in range(16)]
        started = time.monotonic()
        async with http.post(edge.url + CHAT, json=chat(urls), headers=customer.headers) as response:
            payload = await response.json()
            assert response.status == 400, payload
        elapsed = time.monotonic() - started
        assert payload["error"]["type"] == "invalid_request_error"
        assert payload["error"]["message"] == (
            f"Fetching the request's images took longer than {deadline:g} seconds"
        )
        # One deadline for all: the fetches that started when it passed were the last
        # (per-URL deadlines would have let all 16 start, taking 16 / 4 x 0.5 s).
        assert attacker.connections <= FETCH_CONCURRENCY
        print(f"16 stalled image URLs, {deadline} s shared deadline: 400 after {elapsed:.2f} s")
        assert elapsed < deadline + 1.5
    state = await settled_books(mesh.ledger, customer.account_id)
    assert (state.balance, state.held, state.open_holds) == (500, 0, 0)
