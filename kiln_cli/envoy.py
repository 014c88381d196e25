"""An Envoy configuration for a running mesh: ``kiln envoy-config``.

Two listeners:

* **public** (``--public-port``, 8080): a front proxy for the HTTP edge,
  request ids generated or kept.
* **services** (``--services-port``, 8081, bound to ``--services-host``,
  127.0.0.1 by default): the capability services for an operator's own
  backends, as gRPC (routed by service name) and as JSON over HTTP through
  Envoy's ``grpc_json_transcoder``, using the ``google.api.http`` rules in the
  protos (``POST /v1/images:generate``, ``GET /v1/voices``, ...; server
  streams come back as a JSON array, gRPC errors as HTTP statuses). Billing
  is not exposed unless ``--expose-billing``: its RPCs move money and take no
  caller credential of their own.

Upstream addresses come from the settings (``KILN_*_ADDRESS``,
``KILN_HTTP_PORT``), so the config matches the mesh it is generated for.
Every gRPC cluster is health-checked with the standard gRPC health service.

Rate limits (``KILN_RATE_LIMIT_ENVOY=true``, for several edges behind one Envoy): the
public listener gets Envoy's global rate-limit filter, asking billing's limiter
(``envoy.service.ratelimit.v3.RateLimitService``, :mod:`services.billing.rate_limits`) for
every paid route with the descriptors ``credential`` and ``capability``; the edges, told
by the same setting, do not ask again.
The transcoder needs the protos as a descriptor set: :func:`build_descriptor_set`
compiles it (imports included) with grpcio-tools.

Slow clients and timeouts (:func:`_timeouts`): both listeners give a request
``KILN_HTTP_HEADER_TIMEOUT_SECONDS`` to send its headers
(``request_headers_timeout``), close a connection idle for that long
(``idle_timeout``) and a stream silent for ``stream_idle_timeout``. Each public
route's timeout is sized for what it runs: a paid POST gets the capability
call's deadline (``KILN_SERVICE_TIMEOUT_SECONDS``) plus the hold's margin, and
may be silent for the whole call (a JSON answer comes at the end); media
downloads have no total (large files, Range) but must keep moving; the rest
(listings, health, the account) get a minute. Envoy's route timeout starts
once the request is received, so an upload's own time is the edge's
``BodyClock``'s to police (Envoy streams bodies through). The services'
routes get the call deadline too (billing: its own).

The config is JSON, which Envoy reads like YAML (``envoy -c kiln-envoy.json``);
``envoy --mode validate -c ...`` checks it without starting.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.catalog import CATALOG, capability
from services.common.settings import Settings

#: Time a request may take past the capability call's deadline (upload hand-off, billing,
#: storing the result); the edge's credit holds use the same margin.
CALL_MARGIN_SECONDS = 120
#: Total and silence of the routes that run no capability (listings, health, the account).
QUICK_ROUTE_SECONDS = 60
#: Longest silence of a media download (no total: files may be large, Range requests).
MEDIA_IDLE_SECONDS = 60

PROTO_ROOT = Path(__file__).resolve().parent.parent / "protos"


def build_descriptor_set(out: Path) -> Path:
    """Compiles every Kiln proto (with its imports) into a ``FileDescriptorSet`` at ``out``."""
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "kiln").rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{PROTO_ROOT / 'third_party'}",
        f"-I{include}",
        "--include_imports",
        f"--descriptor_set_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc could not build the descriptor set")
    return out


def _endpoint(address: str) -> dict[str, Any]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return {"endpoint": {"address": {"socket_address": {"address": host, "port_value": int(port)}}}}


def _cluster(
    name: str, address: str | Sequence[str], *, grpc: bool, idle_seconds: float = 0
) -> dict[str, Any]:
    addresses = [address] if isinstance(address, str) else list(address)
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STRICT_DNS",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [_endpoint(each) for each in addresses]}],
        },
    }
    if not grpc:
        # Edges leave the rotation when /healthz stops answering (two misses: a busy edge may
        # answer one check late), checked every half second even without traffic.
        cluster["health_checks"] = [
            {
                "timeout": "2s",
                "interval": "0.5s",
                "no_traffic_interval": "0.5s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "http_health_check": {"path": "/healthz"},
            }
        ]
        # Envoy drops its pooled connections to the edge before the edge closes them itself
        # (KILN_HTTP_HEADER_TIMEOUT_SECONDS of idling): no request is sent on a connection
        # that is closing.
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "common_http_protocol_options": {"idle_timeout": _seconds(idle_seconds / 2)},
                "explicit_http_config": {"http_protocol_options": {}},
            }
        }
    if grpc:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
        cluster["health_checks"] = [
            {
                "timeout": "1s",
                "interval": "5s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {},
            }
        ]
    return cluster


def _seconds(value: float) -> str:
    """A protobuf Duration in JSON (``"1.5s"``)."""
    return f"{value:g}s"


def _timeouts(settings: Settings) -> dict[str, Any]:
    """The connection manager's slow-client limits (see the module docstring)."""
    header = _seconds(settings.http_header_timeout_seconds)
    return {
        "request_headers_timeout": header,
        "common_http_protocol_options": {"idle_timeout": header},
        "stream_idle_timeout": _seconds(QUICK_ROUTE_SECONDS),
    }


def _route_timeouts(total: float, idle: float) -> dict[str, Any]:
    """A route's ``timeout`` (0: none) and ``idle_timeout``, and the retry of a request that
    never reached an edge (refused, or reset before it was sent: it never ran, so even a
    paid POST is safe to send to another edge)."""
    return {"timeout": _seconds(total), "idle_timeout": _seconds(idle), "retry_policy": _RETRY_UNSENT}


_RETRY_UNSENT: dict[str, Any] = {
    "retry_on": "connect-failure,reset-before-request",
    "num_retries": 2,
    "retry_host_predicate": [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
            },
        }
    ],
    "host_selection_retry_max_attempts": 3,
}


def _public_routes(settings: Settings) -> list[dict[str, Any]]:
    """The front proxy's routes, each with timeouts sized for what it runs (and, with
    ``KILN_RATE_LIMIT_ENVOY``, the paid ones with their rate limit descriptors)."""
    from edge.routes import ROUTES

    call = settings.service_timeout_seconds
    paid = sorted({route.path for route in ROUTES if route.method == "POST"})
    return [
        *(
            {
                "match": {"path": path},
                "route": {
                    "cluster": "edge",
                    **_route_timeouts(call + CALL_MARGIN_SECONDS, call),
                    **_rate_limits(settings, path),
                },
            }
            for path in paid
        ),
        {
            "match": {"prefix": "/v1/media/"},
            "route": {"cluster": "edge", **_route_timeouts(0, MEDIA_IDLE_SECONDS)},
        },
        {
            "match": {"prefix": "/"},
            "route": {"cluster": "edge", **_route_timeouts(QUICK_ROUTE_SECONDS, QUICK_ROUTE_SECONDS)},
        },
    ]


def _rate_limits(settings: Settings, path: str) -> dict[str, Any]:
    """A paid route's descriptors for the global rate-limit filter: ``credential`` (the
    ``X-API-Key`` value, or else the ``Authorization`` one: a request-headers action yields
    no descriptor when its header is absent) and ``capability`` (``edge.ratelimit``'s table)."""
    from edge.ratelimit import ROUTE_CAPABILITIES

    capability = ROUTE_CAPABILITIES.get(path)
    if not settings.rate_limit_envoy or capability is None:
        return {}
    return {
        "rate_limits": [
            {
                "actions": [
                    {"request_headers": {"header_name": header, "descriptor_key": "credential"}},
                    {"generic_key": {"descriptor_key": "capability", "descriptor_value": capability}},
                ]
            }
            for header in ("x-api-key", "authorization")
        ]
    }


def _rate_limit_filter(settings: Settings) -> dict[str, Any]:
    """Envoy's global rate-limit filter, asking billing's limiter (``services.billing.rate_limits``)
    with the mesh credential of the identity ``envoy``. The limiter's answer carries the
    x-ratelimit-* headers and, over the limit, the 429's body and Retry-After headers; a
    limiter that does not answer lets requests through (the edge's Authorize still runs)."""
    from edge.ratelimit import DOMAIN
    from services.common.mesh_auth import METADATA_KEY, mesh_secret, mesh_token

    token = mesh_token(mesh_secret(settings), "envoy")
    return {
        "name": "envoy.filters.http.ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
            "domain": DOMAIN,
            "failure_mode_deny": False,
            "timeout": _seconds(settings.billing_timeout_seconds),
            "rate_limit_service": {
                "transport_api_version": "V3",
                "grpc_service": {
                    "envoy_grpc": {"cluster_name": "billing"},
                    "initial_metadata": [{"key": METADATA_KEY, "value": f"Bearer {token}"}],
                },
            },
        },
    }


def _service_timeouts(settings: Settings, name: str) -> dict[str, str]:
    """A gRPC service route's deadline: billing's calls are short, a capability's as long as
    the edge waits for it (server streams may be silent between messages for all of it)."""
    if capability(name).billing:
        seconds = settings.billing_timeout_seconds * 3
        return _route_timeouts(seconds, seconds)
    call = settings.service_timeout_seconds
    return _route_timeouts(call + CALL_MARGIN_SECONDS, call)


def _manager(
    name: str, routes: list[dict[str, Any]], filters: list[dict[str, Any]], settings: Settings
) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
            ".HttpConnectionManager",
            "stat_prefix": name,
            "generate_request_id": True,
            "preserve_external_request_id": True,
            **_timeouts(settings),
            "route_config": {
                "name": name,
                "virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}],
            },
            "http_filters": [
                *filters,
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                    },
                },
            ],
        },
    }


def _listener(name: str, host: str, port: int, manager: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "address": {"socket_address": {"address": host, "port_value": port}},
        "filter_chains": [{"filters": [manager]}],
    }


def render_envoy_config(
    settings: Settings,
    *,
    descriptor: Path,
    public_host: str = "0.0.0.0",
    public_port: int = 8080,
    services_host: str = "127.0.0.1",
    services_port: int = 8081,
    admin_port: int = 0,
    expose_billing: bool = False,
    edges: Sequence[str] = (),
) -> dict[str, Any]:
    """The Envoy bootstrap for the mesh that ``settings`` describe (see the module docstring).
    ``edges``: the edges' addresses (default: the one of ``settings``); Envoy balances over
    them and takes a dead one out of the rotation."""
    exposed = [(c.name, c.service) for c in CATALOG if expose_billing or not c.billing]
    edge_address = list(edges) or [f"{settings.http_host}:{settings.http_port}"]
    limited = settings.rate_limit_envoy
    public = _manager(
        "public", _public_routes(settings), [_rate_limit_filter(settings)] if limited else [], settings
    )
    transcoder = {
        "name": "envoy.filters.http.grpc_json_transcoder",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            "proto_descriptor": str(descriptor),
            "services": [service for _, service in exposed],
            "convert_grpc_status": True,
            "print_options": {
                "add_whitespace": False,
                "always_print_primitive_fields": True,
                "preserve_proto_field_names": True,
            },
            "request_validation_options": {
                "reject_unknown_method": True,
                "reject_unknown_query_parameters": True,
            },
        },
    }
    services = _manager(
        "services",
        [
            {
                "match": {"prefix": f"/{service}/"},
                "route": {"cluster": name, **_service_timeouts(settings, name)},
            }
            for name, service in exposed
        ],
        [transcoder],
        settings,
    )
    clusters = [_cluster("edge", edge_address, grpc=False, idle_seconds=settings.http_header_timeout_seconds)]
    clusters += [_cluster(name, settings.address(name), grpc=True) for name, _ in exposed]
    if limited and not any(name == "billing" for name, _ in exposed):  # the rate limit service
        clusters.append(_cluster("billing", settings.address("billing"), grpc=True))
    config: dict[str, Any] = {
        "static_resources": {
            "listeners": [
                _listener("public", public_host, public_port, public),
                _listener("services", services_host, services_port, services),
            ],
            "clusters": clusters,
        }
    }
    if admin_port:
        config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}}
    return config
