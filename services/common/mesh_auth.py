"""Who may call a Kiln gRPC service: the mesh credential.

Every service checks a bearer token in the ``authorization`` metadata of every
call, except the standard health service (probes from kubelet and load
balancers cannot send metadata; health says only SERVING or not). A token names
an *identity* and proves it with an HMAC of the mesh secret::

    kiln1.<identity>.<base64url(HMAC-SHA256(secret, "kiln-mesh-token:" + identity))>

The edge calls as ``edge``; an operator's backend or ``grpcurl`` as any other
identity (``kiln token operator`` prints one). Billing accepts its mutating
RPCs (Authorize, Reserve, Commit, Release, SaveResponse) only from ``edge``:
a token handed to a backend can generate images directly, never move money.

The secret is ``KILN_MESH_SECRET`` (at least 32 bytes), or else the file
``mesh-secret`` in the data folder, which the first process to need it creates
(mode 0600): on one machine, every process of ``kiln up`` or ``kiln up --split``
reads the same file, with nothing to configure. Several machines share one
``KILN_MESH_SECRET``. Rotating the secret revokes every token.

A call without a valid token fails with UNAUTHENTICATED, a valid token on an
edge-only RPC with PERMISSION_DENIED; neither carries a Kiln ErrorInfo, so the
edge reports a mesh misconfiguration as a 500, never as the client's 401.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc

from services.common.settings import Settings

#: The edge's identity: the only caller of billing's mutating RPCs.
EDGE = "edge"
#: The metadata key the token travels in (``authorization: Bearer <token>``).
METADATA_KEY = "authorization"
#: The file in the data folder holding the generated secret.
SECRET_FILE = "mesh-secret"
MIN_SECRET_BYTES = 32
#: Methods anyone may call: the standard health service.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})

#: How many distinct valid tokens a server remembers having verified.
MAX_VERIFIED_TOKENS = 1024

_TOKEN_PREFIX = "kiln1"
_IDENTITY = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_CONTEXT = b"kiln-mesh-token:"


class MeshSecretError(ValueError):
    """The configured mesh secret cannot be used."""


def mesh_secret(settings: Settings) -> bytes:
    """The mesh secret: ``KILN_MESH_SECRET``, else the data folder's file (created when absent)."""
    if settings.mesh_secret is not None:
        secret = settings.mesh_secret.get_secret_value().encode()
        if len(secret) < MIN_SECRET_BYTES:
            raise MeshSecretError(
                f"KILN_MESH_SECRET must be at least {MIN_SECRET_BYTES} bytes; "
                "make one with: python -c 'import secrets; print(secrets.token_hex(32))'"
            )
        return secret
    path = settings.data_dir / SECRET_FILE
    if not path.is_file():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: when two processes start together, one writes and both read it
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32) + "\n")
    for _ in range(50):  # the creator may not have written it yet
        secret = path.read_bytes().strip()
        if secret:
            break
        import time

        time.sleep(0.01)
    if len(secret) < MIN_SECRET_BYTES:
        raise MeshSecretError(
            f"{path} holds fewer than {MIN_SECRET_BYTES} bytes; delete it to make a new one"
        )
    return secret


def _signature(secret: bytes, identity: str) -> str:
    digest = hmac.new(secret, _CONTEXT + identity.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def mesh_token(secret: bytes, identity: str) -> str:
    """The token of ``identity`` (1-32 of a-z, 0-9 and '-', starting with a letter or digit)."""
    if not _IDENTITY.fullmatch(identity):
        raise ValueError(f"an identity is 1-32 of a-z, 0-9 and '-': {identity[:40]!r}")
    return f"{_TOKEN_PREFIX}.{identity}.{_signature(secret, identity)}"


def verify_token(secret: bytes, value: str) -> str | None:
    """The identity a ``Bearer`` metadata value proves, or None."""
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or len(token) > 128:
        return None
    prefix, _, rest = token.partition(".")
    identity, _, signature = rest.partition(".")
    if prefix != _TOKEN_PREFIX or not _IDENTITY.fullmatch(identity):
        return None
    if not hmac.compare_digest(signature.encode(), _signature(secret, identity).encode()):
        return None
    return identity


def _refusal(code: grpc.StatusCode, message: str, kind: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``kind`` that ends the call with ``code``."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - abort raises

    if kind.unary_unary is not None:
        return kind._replace(unary_unary=unary)
    if kind.unary_stream is not None:
        return kind._replace(unary_stream=stream)
    if kind.stream_unary is not None:
        return kind._replace(stream_unary=unary)
    return kind._replace(stream_stream=stream)


class MeshAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without a valid mesh token (health excepted).

    ``restricted`` maps full method names (``/kiln.billing.v1.BillingService/Commit``)
    to the identities allowed to call them; other methods take any valid identity.
    """

    def __init__(self, secret: bytes, restricted: Mapping[str, Iterable[str]] | None = None) -> None:
        self._secret = secret
        self._restricted = {method: frozenset(ids) for method, ids in (restricted or {}).items()}
        #: Metadata values already verified, and their identity: a mesh has a handful of
        #: callers, so most calls cost a dict lookup instead of an HMAC (only valid tokens
        #: are kept, so random ones cannot fill it).
        self._verified: dict[str, str] = {}

    def _identity(self, value: str) -> str | None:
        identity = self._verified.get(value)
        if identity is None:
            identity = verify_token(self._secret, value)
            if identity is not None and len(self._verified) < MAX_VERIFIED_TOKENS:
                self._verified[value] = identity
        return identity

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method in OPEN_METHODS:
            return handler
        identity = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == METADATA_KEY and isinstance(value, str):
                identity = self._identity(value)
                break
        if identity is None:
            return _refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                "This Kiln service needs the mesh credential: send 'authorization: Bearer <token>' "
                "(`kiln token <identity>` prints one).",
                handler,
            )
        allowed = self._restricted.get(method)
        if allowed is not None and identity not in allowed:
            return _refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} accepts calls only from: {', '.join(sorted(allowed))}.",
                handler,
            )
        return handler


class _AddToken:
    """Adds the token to the metadata of every call made through a channel."""

    def __init__(self, token: str) -> None:
        self._header = (METADATA_KEY, f"Bearer {token}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(*self._header)
        return grpc.aio.ClientCallDetails(
            method=details.method,
            timeout=details.timeout,
            metadata=metadata,
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )


class _UnaryUnary(_AddToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _UnaryStream(_AddToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _StreamUnary(_AddToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _StreamStream(_AddToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that send ``token`` with every call of a channel."""
    return [_UnaryUnary(token), _UnaryStream(token), _StreamUnary(token), _StreamStream(token)]
