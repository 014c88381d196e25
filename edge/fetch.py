"""Fetching images that chat requests name by URL, safely.

Only ``https://`` URLs, and only public addresses: no loopback, private,
link-local (which includes the cloud metadata address 169.254.169.254),
shared, reserved, multicast or documentation addresses, and none of the
IPv6 transition ranges that lead back into IPv4 networks (6to4 ``2002::/16``,
NAT64 ``64:ff9b::/96`` and ``64:ff9b:1::/48``, Teredo ``2001::/32``,
IPv4-compatible ``::/96``); an IPv4-mapped address (``::ffff:a.b.c.d``) is
judged by the IPv4 address it carries, and the message of a refused
transition address names the IPv4 address it embeds.

Every hop is checked the same way: redirects are followed by hand (at most
:data:`MAX_REDIRECTS`), each ``Location`` must stay ``https://`` (a redirect
to ``http://`` is refused, never downgraded), and its host is checked again.
A host written as an IP literal is checked here, at every hop, because aiohttp
connects to literals without asking the resolver (and takes anything made of
digits and dots, such as ``2130706433`` or ``127.1``, for a literal: those are
refused unless they are a plain address). A host name is checked in the
connector's resolver, so the connection goes to the very addresses that were
checked (no DNS rebinding).

One :class:`ImageFetcher` serves one request: its fetches run concurrently (at
most :data:`FETCH_CONCURRENCY` at once) under one shared deadline, and each
body is read up to a size limit. Every failure is an :class:`InvalidRequest`
(a 400) that says why. ``allow`` lists networks that are fetched although they
are not public (tests point it at their loopback server; never list a network
clients must not reach).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Self

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from edge.schemas import decode_base64_file
from services.common.errors import InvalidRequest, quoted

#: Redirects followed per image URL (each hop checked again).
MAX_REDIRECTS = 3
#: Image URLs of one request fetched at the same time.
FETCH_CONCURRENCY = 4
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: IPv6 ranges that carry an IPv4 address into some IPv4 network: never fetched, whatever
#: the IPv4 address inside (a relay or translator decides where the packets end up).
_TRANSITION: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (ipaddress.IPv6Network("2002::/16"), "6to4"),
    (ipaddress.IPv6Network("64:ff9b::/96"), "NAT64"),
    (ipaddress.IPv6Network("64:ff9b:1::/48"), "NAT64 (local-use)"),
    (ipaddress.IPv6Network("2001::/32"), "Teredo"),
    (ipaddress.IPv6Network("::/96"), "IPv4-compatible"),
)
#: Non-public ranges named explicitly, whatever this Python's ``ipaddress`` thinks of them.
_NON_PUBLIC: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(net)
    for net in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",  # the 6to4 relay anycast
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "100::/64",
        "2001::/23",
        "2001:db8::/32",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    )
)


class UnsafeAddress(Exception):
    """An address we never connect to; the message says which and why."""


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # the client's address (the server's is the first)
    return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)  # NAT64 and IPv4-compatible: the last 32 bits


def _kind(ip: IPAddress) -> str | None:
    """What kind of non-public address ``ip`` is; None for a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address) and not (ip.is_unspecified or ip.is_loopback):
        for network, name in _TRANSITION:
            if ip in network:
                return f"{name} address (embedding {_embedded_ipv4(ip)})"
    if ip.is_loopback:
        return "loopback address"
    if ip.is_link_local:
        return "link-local (cloud metadata) address"
    if ip.is_multicast:
        return "multicast address"
    if ip.is_private or any(ip in net for net in _NON_PUBLIC if net.version == ip.version):
        return "private address"
    if not ip.is_global or ip.is_reserved or ip.is_unspecified:
        return "non-public address"
    return None


def check_public(host: str, address: str, allow: Sequence[IPNetwork] = ()) -> None:
    """Raises UnsafeAddress unless ``address`` is a public unicast address (or in ``allow``);
    ValueError when it is no IP address."""
    ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in allow if net.version == ip.version):
        return
    kind = _kind(ip)
    if kind is not None:
        if host == address:  # a literal
            raise UnsafeAddress(f"'{quoted(host)}' is a {kind}; only public addresses are fetched")
        raise UnsafeAddress(
            f"'{quoted(host)}' resolves to a {kind} ({address}); only public addresses are fetched"
        )


def _looks_like_ip(host: str) -> bool:
    """aiohttp's test for an IP literal (it connects to these without the resolver)."""
    return ":" in host or host.replace(".", "").isdigit()


def check_host(host: str, allow: Sequence[IPNetwork] = ()) -> None:
    """Raises UnsafeAddress when ``host`` is an IP literal that is not public (nor in
    ``allow``), or looks like one without being a plain address. A host name passes: the
    connector's resolver checks the addresses it resolves to."""
    try:
        check_public(host, host, allow)
    except ValueError:  # not a plain IP literal: a name, checked by the resolver
        if _looks_like_ip(host):
            raise UnsafeAddress(f"'{quoted(host)}' is neither a host name nor a plain IP address") from None


def host_allowed(host: str, port: int | None, allowed_hosts: Iterable[str]) -> bool:
    """Whether ``host`` (at ``port``) is listed in ``allowed_hosts`` as ``host`` or ``host:port``
    (case-insensitive; an IPv6 address written bare or in brackets)."""
    host = host.lower().strip("[]")
    for entry in allowed_hosts:
        entry = entry.strip().lower()
        if entry.strip("[]") == host:
            return True
        name, _, entry_port = entry.rpartition(":")
        if name and entry_port.isdigit() and name.strip("[]") == host and int(entry_port) == port:
            return True
    return False


def check_url(url: URL, name: str, allow: Sequence[IPNetwork] = ()) -> None:
    """Checks one hop's URL: https, a host, and a public address when the host is a literal."""
    if url.scheme != "https":
        raise InvalidRequest(f"{name}: only data: URLs and https:// URLs are accepted")
    host = url.raw_host
    if not host:
        raise InvalidRequest(f"{name}: the URL has no host")
    try:
        check_host(host, allow)
    except UnsafeAddress as exc:
        raise InvalidRequest(f"{name}: {exc}") from None


class PublicOnlyResolver(AbstractResolver):
    """Resolves like the default resolver, and refuses any non-public address (except in
    ``allow``, or for a host listed in ``allow_hosts``: see :func:`host_allowed`)."""

    def __init__(self, allow: Sequence[IPNetwork] = (), allow_hosts: Iterable[str] = ()) -> None:
        self._resolver = DefaultResolver()
        self._allow = tuple(allow)
        self._allow_hosts = tuple(allow_hosts)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        if self._allow_hosts and host_allowed(host, port, self._allow_hosts):
            return results
        for result in results:
            check_public(host, result["host"], self._allow)
        return results

    async def close(self) -> None:
        await self._resolver.close()


def image_session(
    *,
    timeout_seconds: float,
    allow: Iterable[IPNetwork | str] = (),
    allow_hosts: Iterable[str] = (),
    ssl_context: ssl.SSLContext | None = None,
) -> aiohttp.ClientSession:
    """A client session for fetching images (and sending webhooks, ``edge.webhooks``): names
    resolve to public addresses only (or ``allow``, or any address for a host in
    ``allow_hosts``), no proxy from the environment. Redirects are the caller's to refuse or
    follow (``allow_redirects=False``)."""
    networks = tuple(ipaddress.ip_network(net) if isinstance(net, str) else net for net in allow)
    connector = aiohttp.TCPConnector(
        resolver=PublicOnlyResolver(networks, allow_hosts),
        use_dns_cache=False,
        limit=16,
        ssl=ssl_context if ssl_context is not None else True,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout_seconds),
        trust_env=False,
    )


class ImageFetcher:
    """The image fetches of one request: one session, one deadline, bounded concurrency.

    ``async with ImageFetcher(...) as fetcher: images = await fetcher.fetch_all(named_urls)``
    """

    def __init__(
        self,
        *,
        deadline_seconds: float,
        max_bytes: int,
        max_total_bytes: int | None = None,
        allow: Iterable[IPNetwork | str] = (),
        ssl_context: ssl.SSLContext | None = None,
        concurrency: int = FETCH_CONCURRENCY,
    ) -> None:
        self.deadline_seconds = deadline_seconds
        self.max_bytes = max_bytes
        #: Most bytes of all the images together (None: no bound beyond ``max_bytes`` each).
        self.max_total_bytes = max_total_bytes
        self.total_bytes = 0
        self.allow = tuple(ipaddress.ip_network(net) if isinstance(net, str) else net for net in allow)
        self._ssl_context = ssl_context
        self._concurrency = concurrency
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = image_session(
            timeout_seconds=self.deadline_seconds, allow=self.allow, ssl_context=self._ssl_context
        )
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch_all(self, named_urls: Sequence[tuple[str, str]]) -> list[bytes]:
        """The bytes of each ``(name, url)``, in order; the first failure (or the shared
        deadline) cancels the rest and is raised as InvalidRequest."""
        gate = asyncio.Semaphore(self._concurrency)

        async def one(name: str, url: str) -> bytes:
            async with gate:
                return await self.fetch(url, name)

        try:
            async with asyncio.timeout(self.deadline_seconds):
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(one(name, url)) for name, url in named_urls]
        except TimeoutError:
            raise InvalidRequest(
                f"Fetching the request's images took longer than {self.deadline_seconds:g} seconds"
            ) from None
        except BaseExceptionGroup as errors:  # the first fetch that failed, if it is the caller's fault
            first = errors.exceptions[0]
            if isinstance(first, InvalidRequest):
                raise first from None
            raise
        return [task.result() for task in tasks]

    async def fetch(self, url: str, name: str) -> bytes:
        """The bytes of a ``data:`` URL or a public ``https://`` URL, or a clear InvalidRequest."""
        if url.startswith("data:"):
            data = decode_base64_file(url, name)
            self._count(len(data), name)
            return data
        if self._session is None:
            raise RuntimeError("ImageFetcher is used outside its 'async with'")
        try:
            target = URL(url)
        except (ValueError, TypeError):
            raise InvalidRequest(f"{name}: the image URL is not a valid URL") from None
        for _hop in range(MAX_REDIRECTS + 1):
            check_url(target, name, self.allow)
            try:
                async with self._session.get(target, allow_redirects=False) as response:
                    if response.status in REDIRECT_STATUSES:
                        target = _redirect_target(response, name)
                        continue
                    if response.status != 200:
                        raise InvalidRequest(f"{name}: fetching the image answered HTTP {response.status}")
                    if response.content_length is not None and response.content_length > self.max_bytes:
                        raise InvalidRequest(f"{name}: the image is larger than {self.max_bytes} bytes")
                    return await self._read_limited(response, name)
            except InvalidRequest:
                raise
            except UnsafeAddress as exc:
                raise InvalidRequest(f"{name}: {exc}") from None
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, UnsafeAddress):
                    raise InvalidRequest(f"{name}: {exc.os_error}") from None
                raise InvalidRequest(f"{name}: the image could not be fetched ({exc.os_error})") from None
            except TimeoutError:
                raise InvalidRequest(f"{name}: fetching the image timed out") from None
            except (aiohttp.ClientError, ValueError) as exc:  # ValueError: a host IDNA cannot encode
                raise InvalidRequest(
                    f"{name}: the image could not be fetched ({type(exc).__name__})"
                ) from None
        raise InvalidRequest(f"{name}: fetching the image was redirected more than {MAX_REDIRECTS} times")

    def _count(self, size: int, name: str) -> None:
        self.total_bytes += size
        if self.max_total_bytes is not None and self.total_bytes > self.max_total_bytes:
            raise InvalidRequest(
                f"{name}: the request's images are larger than {self.max_total_bytes} bytes together"
            )

    async def _read_limited(self, response: aiohttp.ClientResponse, name: str) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > self.max_bytes:
                raise InvalidRequest(f"{name}: the image is larger than {self.max_bytes} bytes")
            self._count(len(chunk), name)
            chunks.append(chunk)
        return b"".join(chunks)


def _redirect_target(response: aiohttp.ClientResponse, name: str) -> URL:
    location = response.headers.get("Location")
    if not location:
        raise InvalidRequest(f"{name}: fetching the image answered a redirect without a Location")
    try:
        target = response.url.join(URL(location))
    except (ValueError, TypeError):
        raise InvalidRequest(f"{name}: fetching the image redirected to an invalid URL") from None
    if target.scheme != "https":
        raise InvalidRequest(
            f"{name}: fetching the image redirected to '{quoted(str(target))}'; only https:// URLs are followed"
        )
    return target
