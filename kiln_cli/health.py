"""``kiln health [TARGET] [--service NAME]``: is a Kiln process serving? Exit 0 if so, 1 if not.

A container's health check (``HEALTHCHECK CMD ["kiln", "health"]``,
``containers/Containerfile``), a Compose ``healthcheck`` or a shell loop. TARGET is

* ``host:port``: a gRPC service, asked through the standard health protocol
  (``grpc.health.v1.Health/Check``; open in the mesh auth, so no token);
* ``http://...`` or ``https://...``: a URL that must answer 2xx (the edge's ``/healthz``);
* a catalog name (``image_gen``) or ``edge``: that service on this machine, at the port
  its settings give it (``KILN_<NAME>_ADDRESS``, ``KILN_HTTP_PORT``) on loopback when it
  binds every interface;
* nothing: the service named by ``KILN_SERVICE`` (what each image sets).

A gRPC service is healthy when it answers SERVING, which a capability does once
its default model is loaded; ``--service`` asks about one gRPC service name
(``kiln.image.v1.ImageService``) instead of the whole server.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.catalog import capability
from services.common.settings import Settings

#: The variable an image names its service with (``kiln serve`` and ``kiln health`` default to it).
SERVICE_VARIABLE = "KILN_SERVICE"


def _loopback(host: str) -> str:
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(host, host)
    return f"[{host.strip('[]')}]" if ":" in host else host


def local_target(name: str, settings: Settings) -> str:
    """Where the service ``name`` of this machine answers health checks."""
    if name == "edge":
        return f"http://{_loopback(settings.http_host)}:{settings.http_port}/healthz"
    capability(name)  # a KeyError naming the catalog when there is no such service
    host, _, port = settings.bind_address(settings.address(name)).rpartition(":")
    return f"{_loopback(host)}:{port}"


def check_grpc(address: str, service: str = "", timeout: float = 5.0) -> tuple[bool, str]:
    """(serving, what it said) of the gRPC server at ``address``."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code: Any = exc.code()  # type: ignore[attr-defined]
            return False, f"{code.name if code else 'ERROR'}: {exc.details()}"  # type: ignore[attr-defined]
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, status


def check_http(url: str, timeout: float = 5.0) -> tuple[bool, str]:
    """(2xx, the status) of a GET of ``url``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300, f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except OSError as exc:
        return False, str(getattr(exc, "reason", exc))


def check(target: str, *, service: str = "", timeout: float = 5.0) -> tuple[bool, str]:
    """Checks an address or URL (see the module's docstring)."""
    if target.startswith(("http://", "https://")):
        return check_http(target, timeout)
    return check_grpc(target, service, timeout)


def add_command(commands: Any) -> None:
    """Adds ``kiln health`` to the ``kiln`` command's subparsers."""
    health = commands.add_parser(
        "health", help="exit 0 when a service answers SERVING (gRPC health) or a URL 2xx, else 1"
    )
    health.add_argument(
        "target",
        nargs="?",
        help="host:port (gRPC), an http(s) URL, or a service of this machine by name "
        f"(default: ${SERVICE_VARIABLE})",
    )
    health.add_argument("--service", default="", help="a gRPC service name (default: the whole server)")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    health.add_argument("--quiet", "-q", action="store_true", help="print nothing")
    health.set_defaults(func=cmd_health)


def cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    target = args.target or os.environ.get(SERVICE_VARIABLE, "")
    if not target:
        print(
            f"kiln health: give host:port, a URL or a service name (or set {SERVICE_VARIABLE})",
            file=sys.stderr,
        )
        return 2
    if ":" not in target:  # a name: this machine's instance of it
        try:
            target = local_target(target, settings)
        except KeyError as exc:
            print(f"kiln health: {exc.args[0]}", file=sys.stderr)
            return 2
    serving, said = check(target, service=args.service, timeout=args.timeout)
    if not args.quiet:
        print(f"{target}: {said}", file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1
