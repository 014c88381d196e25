"""Fetching images that chat requests name by URL, safely.

Only ``https://`` URLs; every address a host resolves to must be a public one
(no loopback, private, link-local — which includes the cloud metadata address
169.254.169.254 —, shared, reserved or multicast addresses). The check is done
in the connector's resolver, so the connection goes to the very addresses that
were checked (no DNS rebinding) and every redirect is checked again. Bodies are
read up to a size limit, within a timeout; each failure is a 400 that says why.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from edge.schemas import decode_base64_file
from services.common.errors import InvalidRequest

MAX_REDIRECTS = 3


class UnsafeAddress(Exception):
    """The host resolves to an address we never connect to."""


def check_public(host: str, address: str) -> None:
    """Raises UnsafeAddress unless ``address`` is a public unicast address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local:
        kind = (
            "loopback"
            if ip.is_loopback
            else "link-local (cloud metadata)"
            if ip.is_link_local
            else "private"
            if ip.is_private
            else "non-public"
        )
        raise UnsafeAddress(
            f"'{host}' resolves to a {kind} address ({ip}); only public addresses are fetched"
        )


class PublicOnlyResolver(AbstractResolver):
    """Resolves like the default resolver, and refuses any non-public address."""

    def __init__(self) -> None:
        self._resolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        for result in results:
            check_public(host, result["host"])
        return results

    async def close(self) -> None:
        await self._resolver.close()


def image_session(*, timeout_seconds: float) -> aiohttp.ClientSession:
    """A client session for fetching images (public addresses only)."""
    connector = aiohttp.TCPConnector(resolver=PublicOnlyResolver(), use_dns_cache=False, limit=16)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_seconds), trust_env=False
    )


async def fetch_image(session: aiohttp.ClientSession, url: str, *, max_bytes: int, name: str) -> bytes:
    """The bytes of a ``data:`` URL or a public ``https://`` URL, or a clear InvalidRequest."""
    if url.startswith("data:"):
        return decode_base64_file(url, name)
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise InvalidRequest(f"{name}: only data: URLs and https:// URLs are accepted")
    try:  # a literal address is checked here; names are checked by the resolver
        check_public(parts.hostname, parts.hostname)
    except ValueError:
        pass
    except UnsafeAddress as exc:
        raise InvalidRequest(f"{name}: {exc}") from None
    try:
        async with session.get(url, max_redirects=MAX_REDIRECTS) as response:
            if response.status != 200:
                raise InvalidRequest(f"{name}: fetching the image answered HTTP {response.status}")
            data = await _read_limited(response, max_bytes, name)
    except InvalidRequest:
        raise
    except UnsafeAddress as exc:
        raise InvalidRequest(f"{name}: {exc}") from None
    except aiohttp.ClientConnectorError as exc:
        cause: Any = exc.os_error
        if isinstance(cause, UnsafeAddress):
            raise InvalidRequest(f"{name}: {cause}") from None
        raise InvalidRequest(f"{name}: the image could not be fetched ({exc.os_error})") from None
    except TimeoutError:
        raise InvalidRequest(f"{name}: fetching the image timed out") from None
    except (aiohttp.ClientError, asyncio.CancelledError) as exc:
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise InvalidRequest(f"{name}: the image could not be fetched ({type(exc).__name__})") from None
    return data


async def _read_limited(response: aiohttp.ClientResponse, max_bytes: int, name: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > max_bytes:
            raise InvalidRequest(f"{name}: the image is larger than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
