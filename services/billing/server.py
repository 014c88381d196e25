"""Bootstrap of the billing gRPC service: database, registry, servicers, expiry sweep.

Besides ``kiln.billing.v1`` (billing, tasks, webhooks) it serves Envoy's rate limit
service (:mod:`services.billing.rate_limits`).

``create_service(settings)`` returns a bound, not yet started
:class:`BillingGrpcService` (a :class:`~services.common.grpc_server.GrpcService`
that also carries its ``ledger``); ``start()`` begins serving and the hold
expiry sweep, ``stop(grace)`` shuts down and closes the database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from kiln.billing.v1 import billing_service_pb2 as pb
from kiln.billing.v1 import billing_service_pb2_grpc as pb_grpc
from kiln.billing.v1 import task_service_pb2 as task_pb
from kiln.billing.v1 import task_service_pb2_grpc as task_pb_grpc
from kiln.billing.v1 import webhook_service_pb2_grpc as webhook_pb_grpc
from kiln.vendor.envoy.service.ratelimit.v3 import rls_pb2_grpc
from services.billing import CAPABILITY
from services.billing.auth import Authenticator
from services.billing.ledger import Ledger
from services.billing.metrics import CreditMetrics
from services.billing.rate_limits import SERVICE_NAME as RATE_LIMIT_SERVICE_NAME
from services.billing.rate_limits import RateLimiter, RateLimitPolicy, RateLimitServicer
from services.billing.servicer import BillingServicer
from services.billing.sessions import Sessions
from services.billing.store import Database
from services.billing.task_servicer import TaskServicer
from services.billing.tasks import TaskStore
from services.billing.webhook_servicer import SERVICE_NAME as WEBHOOK_SERVICE_NAME
from services.billing.webhook_servicer import WebhookServicer, restricted_methods
from services.billing.webhooks import Webhooks
from services.common.grpc_server import GrpcService, create_server
from services.common.mesh_auth import EDGE
from services.common.metrics import ServiceMetrics
from services.common.registry import load_registry
from services.common.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BillingService"].full_name
#: Asynchronous tasks (services.billing.tasks); every method is the edge's alone.
TASK_SERVICE_NAME = task_pb.DESCRIPTOR.services_by_name["TaskService"].full_name
TASK_METHODS = tuple(m.name for m in task_pb.DESCRIPTOR.services_by_name["TaskService"].methods)
#: The RPCs that move money or write an account's records: only the edge may call them.
#: SignIn and SignOut too: the edge vouches for the client address wrong passwords are counted by.
EDGE_ONLY_METHODS = (
    "Authorize",
    "Reserve",
    "Commit",
    "Release",
    "SaveResponse",
    "SweepMedia",
    "SignIn",
    "SignOut",
)
#: Envoy's rate limit service (services.billing.rate_limits) counts requests: the edge, and
#: Envoy's global rate-limit filter (``kiln envoy-config`` gives it this identity's token).
RATE_LIMIT_CALLERS = (EDGE, "envoy")
#: The RPCs any caller with the mesh credential may use: they only read.
READ_ONLY_METHODS = ("Authenticate", "Quote", "GetAccount", "GetReservation", "ListMedia")


@dataclass
class BillingGrpcService(GrpcService):
    """The billing server, with its ledger and database for in-process callers and tests."""

    ledger: Ledger | None = None
    database: Database | None = None
    #: The task webhook outbox (``kiln.billing.v1.WebhookService``).
    webhooks: Webhooks | None = None


async def expiry_sweep(ledger: Ledger, interval_seconds: float) -> None:
    """Releases expired holds every ``interval_seconds`` until cancelled."""
    while True:
        await asyncio.sleep(interval_seconds)
        try:
            expired = await ledger.expire_holds()
        except Exception:
            log.exception("billing: the expiry sweep failed; retrying next round")
            continue
        if expired:
            log.info("billing: released %d expired hold(s)", expired)


async def create_service(
    settings: Settings, *, address: str | None = None, clock: Callable[[], float] = time.time
) -> BillingGrpcService:
    """Opens the database (migrating it), builds the servicer and binds the server.

    Health is SERVING once the database is open. ``clock`` is for tests.
    """
    url = settings.resolved_database_url
    if url.startswith("sqlite:"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    registry = load_registry(settings.registry_path)
    db = await Database.open(url)
    try:
        ledger = Ledger(db, clock=clock)
        tasks = TaskStore(ledger)
        metrics = ServiceMetrics()  # the server's, with the servicer's credit counters in it
        webhooks = Webhooks(db, schedule=settings.webhook_retry_schedule, clock=clock)
        authenticator = Authenticator.from_settings(ledger, settings)
        servicer = BillingServicer(
            ledger,
            registry,
            authenticator,
            default_ttl_seconds=settings.reservation_ttl_seconds,
            tasks=tasks,
            credits=CreditMetrics(metrics.registry),
            limits=RateLimitPolicy.from_settings(settings),
            sessions=Sessions.from_settings(ledger, settings),
        )
        limiter = RateLimiter.from_settings(ledger, authenticator, settings)

        def register(server: grpc.aio.Server) -> None:
            pb_grpc.add_BillingServiceServicer_to_server(servicer, server)
            task_pb_grpc.add_TaskServiceServicer_to_server(TaskServicer(servicer, tasks), server)
            webhook_pb_grpc.add_WebhookServiceServicer_to_server(WebhookServicer(webhooks), server)
            rls_pb2_grpc.add_RateLimitServiceServicer_to_server(RateLimitServicer(limiter), server)

        base = await create_server(
            address=address or settings.bind_address(settings.address(CAPABILITY.name)),
            settings=settings,
            register=register,
            service_names=[SERVICE_NAME, TASK_SERVICE_NAME, WEBHOOK_SERVICE_NAME, RATE_LIMIT_SERVICE_NAME],
            restricted={
                **{f"/{SERVICE_NAME}/{method}": (EDGE,) for method in EDGE_ONLY_METHODS},
                **{f"/{TASK_SERVICE_NAME}/{method}": (EDGE,) for method in TASK_METHODS},
                **restricted_methods(),  # the webhook outbox's edge-only RPCs
                f"/{RATE_LIMIT_SERVICE_NAME}/ShouldRateLimit": RATE_LIMIT_CALLERS,
            },
            metrics=metrics,
        )
    except BaseException:
        await db.close()
        raise
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(GrpcService)}
    service = BillingGrpcService(**fields, ledger=ledger, database=db, webhooks=webhooks)

    async def sweep() -> None:
        await expiry_sweep(ledger, settings.expiry_sweep_seconds)

    service.background.append(sweep)
    service.cleanup.append(db.close)
    await service.set_serving(True)
    return service
