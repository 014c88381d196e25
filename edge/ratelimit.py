"""Rate limits at the edge: ask billing's limiter before a paid request, answer its headers.

Before billing's Authorize (:func:`edge.flow._authorize`; never for a dry run), the edge asks
the limiter that billing serves (Envoy's ``RateLimitService/ShouldRateLimit``,
:mod:`services.billing.rate_limits`) with the descriptor ``[("credential", <X-API-Key or
Authorization value as sent, or ``Session <token>`` for the session cookie>), ("capability",
<the route's capability>)]``. Over the limit,
the request is a 429 ``rate_limit_error`` with seed 003's message, ``Retry-After`` and
``retry-after-ms`` (:func:`services.common.rate_limit_headers.rate_limited`), and nothing is
held or charged. Every answer to a counted request (the 429, a success, any error after the
count) carries OpenAI's ``x-ratelimit-limit-requests``, ``x-ratelimit-remaining-requests``
and ``x-ratelimit-reset-requests``: an ``on_response_prepare`` hook adds them just before
the headers go out, streams included. A request nothing limits gets none.

With ``KILN_RATE_LIMIT_ENVOY=true``, Envoy's global rate-limit filter in front asked the
limiter already (``kiln envoy-config``; Envoy adds the headers from the limiter's answer):
the edge does not ask again. When the limiter says nothing limits a credential's capability,
the edge does not ask again for :data:`UNLIMITED_MEMORY_SECONDS` (an unlimited deployment pays
no extra call per request; a limit set meanwhile applies within that time). The limiter unreachable lets the request through (as Envoy's
filter does with ``failure_mode_deny: false``); Authorize decides next.

:data:`ROUTE_CAPABILITIES` names each paid route's capability, for the edge and for Envoy's
descriptors alike; the names are the usage kinds billing prices (``chat``,
``image_generation``, ...), which ``KILN_RATE_LIMIT_CAPABILITY_RPM`` and ``kiln admin limits
--rpm NAME=N`` use. ``POST /v1/tasks`` is counted on the route it queues (it sends that
route's request to this edge), except behind Envoy, which sees only ``tasks``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

import grpc
from aiohttp import web

from edge.handlers.session import session_token
from edge.keys import REQUEST_ID, SETTINGS, UPSTREAMS
from kiln.vendor.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from services.common.errors import AuthenticationFailed, UpstreamUnavailable
from services.common.grpc_client import error_from_rpc
from services.common.mesh_auth import EDGE, METADATA_KEY, mesh_secret, mesh_token
from services.common.rate_limit_headers import HEADER_NAMES, limit_headers, rate_limited
from services.common.settings import Settings

log = logging.getLogger("kiln.edge")

#: The descriptor domain the edge and Envoy's filter send.
DOMAIN = "kiln"
#: Each paid route's capability (the usage kind billing prices it as); ``tasks`` for Envoy.
ROUTE_CAPABILITIES: dict[str, str] = {
    "/v1/images/generations": "image_generation",
    "/v1/images/generations/batch": "image_generation",
    "/v1/images/edits": "image_edit",
    "/v1/images/segmentations": "segmentation",
    "/v1/images/remove-background": "segmentation",
    "/v1/videos/remove-background": "segmentation",
    "/v1/images/upscale": "upscale",
    "/v1/chat/completions": "chat",
    "/v1/audio/speech": "speech",
    "/v1/audio/clone": "speech",
    "/v1/music/generate": "music",
    "/v1/music/cover": "music",
    "/v1/music/repaint": "music",
    "/v1/images/img2video": "video",
    "/v1/tasks": "tasks",
}
#: 402 answers say so to OpenAI's clients, which otherwise may retry them.
SHOULD_RETRY_HEADER = "x-should-retry"
#: Headers ``POST /v1/tasks`` passes on from the answer of the route it queued on.
FORWARDED_HEADERS = (*HEADER_NAMES, SHOULD_RETRY_HEADER)
#: The request's x-ratelimit-* headers, once the limiter counted it.
LIMIT_HEADERS = web.RequestKey("rate_limit_headers", dict[str, str])


def capability_of(request: web.Request) -> str:
    """The capability a request is counted in: its route's, else the route path itself."""
    resource = request.match_info.route.resource
    path = resource.canonical if resource is not None else request.path
    return ROUTE_CAPABILITIES.get(path, path)


def credential_value(request: web.Request) -> str:
    """The credential as sent: ``X-API-Key``'s value, else ``Authorization``'s, else
    ``Session <token>`` for the session cookie."""
    value = request.headers.get("X-API-Key", "").strip() or request.headers.get("Authorization", "").strip()
    if not value and session_token(request):
        return f"Session {session_token(request)}"
    if not value:
        raise AuthenticationFailed()
    return value


class RateLimitClient:
    """``ShouldRateLimit`` on billing's channel, as the edge."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float, token: str) -> None:
        self._stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        self._timeout = timeout
        self._auth = (METADATA_KEY, f"Bearer {token}")

    async def should_rate_limit(
        self, credential: str, capability: str, request_id: str
    ) -> rls_pb2.RateLimitResponse:
        entries = [
            rls_pb2.RateLimitDescriptor.Entry(key="credential", value=credential),
            rls_pb2.RateLimitDescriptor.Entry(key="capability", value=capability),
        ]
        request = rls_pb2.RateLimitRequest(
            domain=DOMAIN, descriptors=[rls_pb2.RateLimitDescriptor(entries=entries)], hits_addend=1
        )
        try:
            return await self._stub.ShouldRateLimit(
                request, timeout=self._timeout, metadata=(("x-request-id", request_id), self._auth)
            )
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None


#: How long the edge remembers that nothing limits a (credential, capability): the limiter is
#: not asked again meanwhile, so an unlimited deployment pays no extra call per request. A limit
#: set for such an account applies within this time.
UNLIMITED_MEMORY_SECONDS = 10.0
#: Most (credential, capability) pairs remembered (then the memory starts afresh).
UNLIMITED_MEMORY_ENTRIES = 10_000


@dataclass
class Limiter:
    """The app's limiter client, made on first use from billing's channel, and the memory of
    what nothing limits."""

    settings: Settings
    _client: RateLimitClient | None = field(default=None, repr=False)
    _unlimited: dict[tuple[str, str], float] = field(default_factory=dict, repr=False)

    def unlimited(self, credential: str, capability: str) -> bool:
        """Whether the limiter said lately that nothing limits this credential's capability."""
        until = self._unlimited.get((_digest(credential), capability))
        return until is not None and until > time.monotonic()

    def remember_unlimited(self, credential: str, capability: str) -> None:
        if len(self._unlimited) >= UNLIMITED_MEMORY_ENTRIES:
            self._unlimited.clear()
        self._unlimited[(_digest(credential), capability)] = time.monotonic() + UNLIMITED_MEMORY_SECONDS

    def client(self, app: web.Application) -> RateLimitClient:
        if self._client is None:
            self._client = RateLimitClient(
                app[UPSTREAMS].channels["billing"],
                timeout=self.settings.billing_timeout_seconds,
                token=mesh_token(mesh_secret(self.settings), EDGE),
            )
        return self._client


LIMITER = web.AppKey("rate_limiter", Limiter)


def _digest(credential: str) -> str:
    return hashlib.sha256(credential.encode()).hexdigest()


async def check_rate_limit(request: web.Request) -> None:
    """Counts a paid request (see the module docstring); RateLimited (429) when it is over."""
    if request.app[SETTINGS].rate_limit_envoy:
        return
    limiter = request.app[LIMITER]
    credential, capability = credential_value(request), capability_of(request)
    if limiter.unlimited(credential, capability):
        return
    try:
        answer = await limiter.client(request.app).should_rate_limit(
            credential, capability, request[REQUEST_ID]
        )
    except UpstreamUnavailable:
        log.warning("request %s: the rate limiter did not answer; not limited", request[REQUEST_ID])
        return
    counted = [status for status in answer.statuses if status.current_limit.requests_per_unit]
    if not counted:
        limiter.remember_unlimited(credential, capability)
        return
    status = min(counted, key=lambda s: (s.code != rls_pb2.RateLimitResponse.OVER_LIMIT, s.limit_remaining))
    reset = status.duration_until_reset.ToNanoseconds() / 1e9
    request[LIMIT_HEADERS] = limit_headers(
        status.current_limit.requests_per_unit, status.limit_remaining, reset
    )
    if answer.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT:
        raise rate_limited(reset)


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the counted request's x-ratelimit-* headers, and
    ``x-should-retry: false`` on every 402."""
    headers = request.get(LIMIT_HEADERS)
    if headers:
        for name, value in headers.items():
            response.headers.setdefault(name, value)
    if response.status == 402:
        response.headers[SHOULD_RETRY_HEADER] = "false"


def setup_rate_limits(app: web.Application, settings: Settings) -> None:
    """Wires the limiter client and the headers hook into the app (``edge.app.create_app``)."""
    app[LIMITER] = Limiter(settings)
    app.on_response_prepare.append(_add_headers)
