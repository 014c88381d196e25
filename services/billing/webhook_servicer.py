"""The gRPC face of the webhook outbox (``kiln.billing.v1.WebhookService``), served by billing.

It converts protobuf to :mod:`services.billing.webhooks` types and back; the rules live
there. The edge's delivery worker (``edge.webhooks``) is its only writer: every RPC but
the read-only ``ListTaskDeliveries`` is edge-only in the mesh-auth sense
(:data:`EDGE_ONLY_METHODS`, like billing's money-moving RPCs).
"""

from __future__ import annotations

from kiln.billing.v1 import webhook_service_pb2 as pb
from kiln.billing.v1 import webhook_service_pb2_grpc as pb_grpc
from services.billing.webhooks import (
    MAX_CLAIM,
    MAX_GRACE_MS,
    Delivery,
    WebhookAttempt,
    WebhookMessage,
    Webhooks,
    WebhookSecrets,
)
from services.common.errors import InvalidRequest
from services.common.mesh_auth import EDGE

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["WebhookService"].full_name
#: RPCs that lease, change or reveal secrets: only the edge may call them.
EDGE_ONLY_METHODS = ("ClaimDeliveries", "RecordAttempt", "GetWebhookSecret", "RotateWebhookSecret")
#: RPCs any caller with the mesh credential may use: they only read.
READ_ONLY_METHODS = ("ListTaskDeliveries",)
DEFAULT_CLAIM = 10
DEFAULT_LEASE_SECONDS = 60

_STATES = {
    "pending": pb.WEBHOOK_STATE_PENDING,
    "delivered": pb.WEBHOOK_STATE_DELIVERED,
    "dead": pb.WEBHOOK_STATE_DEAD,
    "disabled": pb.WEBHOOK_STATE_DISABLED,
}


def restricted_methods() -> dict[str, tuple[str, ...]]:
    """The mesh-auth restrictions of this service (full method name -> identities)."""
    return {f"/{SERVICE_NAME}/{method}": (EDGE,) for method in EDGE_ONLY_METHODS}


def message_pb(message: WebhookMessage) -> pb.WebhookMessage:
    out = pb.WebhookMessage(
        id=message.id,
        account_id=message.account_id,
        task_id=message.task_id,
        url=message.url,
        event_type=message.event_type,
        state=_STATES[message.state],
        attempts=message.attempts,
        next_attempt_at_ms=message.next_attempt_at_ms,
        created_at_ms=message.created_at_ms,
    )
    if message.last_status is not None:
        out.last_status = message.last_status
    if message.last_error is not None:
        out.last_error = message.last_error
    if message.delivered_at_ms is not None:
        out.delivered_at_ms = message.delivered_at_ms
    return out


def attempt_pb(attempt: WebhookAttempt) -> pb.WebhookAttempt:
    return pb.WebhookAttempt(
        attempt=attempt.attempt,
        at_ms=attempt.at_ms,
        status=attempt.status,
        error=attempt.error,
        duration_ms=attempt.duration_ms,
    )


def delivery_pb(delivery: Delivery) -> pb.WebhookDelivery:
    return pb.WebhookDelivery(
        message=message_pb(delivery.message),
        payload=delivery.payload,
        attempt=delivery.attempt,
        lease_token=delivery.lease_token,
        lease_expires_at_ms=delivery.lease_expires_at_ms,
        signing_secrets=list(delivery.secrets),
    )


def secret_pb(secrets: WebhookSecrets, now_ms: int) -> pb.WebhookSecret:
    out = pb.WebhookSecret(account_id=secrets.account_id, secret=secrets.secret)
    signing = secrets.signing_secrets(now_ms)
    if len(signing) > 1 and secrets.previous_expires_at_ms is not None:
        out.previous_secret = signing[1]
        out.previous_expires_at_ms = secrets.previous_expires_at_ms
    return out


def _required(value: str, name: str) -> str:
    if not value:
        raise InvalidRequest(f"'{name}' is required.")
    return value


class WebhookServicer(pb_grpc.WebhookServiceServicer):
    """Implements every RPC of ``kiln.billing.v1.WebhookService``."""

    def __init__(self, webhooks: Webhooks) -> None:
        self._webhooks = webhooks

    async def ClaimDeliveries(
        self, request: pb.ClaimDeliveriesRequest, context: object
    ) -> pb.ClaimDeliveriesResponse:
        if not 0 <= request.max_messages <= MAX_CLAIM:
            raise InvalidRequest(f"'max_messages' is 0 to {MAX_CLAIM}.")
        if request.lease_seconds < 0:
            raise InvalidRequest("'lease_seconds' is 0 or more.")
        deliveries = await self._webhooks.claim(
            limit=request.max_messages or DEFAULT_CLAIM,
            lease_ms=(request.lease_seconds or DEFAULT_LEASE_SECONDS) * 1000,
        )
        return pb.ClaimDeliveriesResponse(deliveries=[delivery_pb(d) for d in deliveries])

    async def RecordAttempt(
        self, request: pb.RecordAttemptRequest, context: object
    ) -> pb.RecordAttemptResponse:
        outcome = await self._webhooks.record(
            message_id=_required(request.message_id, "message_id"),
            lease_token=_required(request.lease_token, "lease_token"),
            status=request.status,
            error=request.error,
            duration_ms=request.duration_ms,
            retry_after_seconds=(
                request.retry_after_seconds if request.HasField("retry_after_seconds") else None
            ),
        )
        message = await self._webhooks.message(outcome.message_id)
        return pb.RecordAttemptResponse(message=message_pb(message), applied=outcome.applied)

    async def ListTaskDeliveries(
        self, request: pb.ListTaskDeliveriesRequest, context: object
    ) -> pb.ListTaskDeliveriesResponse:
        found = await self._webhooks.task_deliveries(
            _required(request.task_id, "task_id"), account_id=request.account_id or None
        )
        return pb.ListTaskDeliveriesResponse(
            deliveries=[
                pb.TaskDelivery(message=message_pb(m), attempts=[attempt_pb(a) for a in attempts])
                for m, attempts in found
            ]
        )

    async def GetWebhookSecret(
        self, request: pb.GetWebhookSecretRequest, context: object
    ) -> pb.GetWebhookSecretResponse:
        secrets = await self._webhooks.secrets(_required(request.account_id, "account_id"))
        return pb.GetWebhookSecretResponse(secret=secret_pb(secrets, self._webhooks.now_ms()))

    async def RotateWebhookSecret(
        self, request: pb.RotateWebhookSecretRequest, context: object
    ) -> pb.RotateWebhookSecretResponse:
        if not 0 <= request.grace_seconds * 1000 <= MAX_GRACE_MS:
            raise InvalidRequest(f"'grace_seconds' is 0 to {MAX_GRACE_MS // 1000}.")
        secrets = await self._webhooks.rotate_secret(
            _required(request.account_id, "account_id"), grace_ms=request.grace_seconds * 1000
        )
        return pb.RotateWebhookSecretResponse(secret=secret_pb(secrets, self._webhooks.now_ms()))
