"""The gRPC face of billing's tasks (``kiln.billing.v1.TaskService``); the rules are in
:mod:`services.billing.tasks`."""

from __future__ import annotations

import json

import grpc

from kiln.billing.v1 import task_service_pb2 as pb
from kiln.billing.v1 import task_service_pb2_grpc as pb_grpc
from services.billing.ledger import IdempotencyClaim
from services.billing.servicer import (
    BillingServicer,
    account_pb,
    media_record,
    stored_response_pb,
    usage_items,
)
from services.billing.tasks import NewTask, TaskRecord, TaskStore
from services.common.errors import InvalidRequest

_STATUS = {
    "pending": pb.TASK_STATUS_PENDING,
    "processing": pb.TASK_STATUS_PROCESSING,
    "completed": pb.TASK_STATUS_COMPLETED,
    "failed": pb.TASK_STATUS_FAILED,
    "cancelled": pb.TASK_STATUS_CANCELLED,
}
_STATUS_NAME = {value: name for name, value in _STATUS.items()}
#: Longest lease a worker may ask for.
MAX_LEASE_SECONDS = 600


def task_pb(task: TaskRecord) -> pb.Task:
    return pb.Task(
        id=task.id,
        account_id=task.account_id,
        reservation_id=task.reservation_id,
        model=task.model,
        route=task.route,
        input_media_id=task.input_media_id,
        content_type=task.content_type,
        callback_url=task.callback_url,
        origin=task.origin,
        status=_STATUS[task.status],
        progress_step=task.progress_step,
        progress_total=task.progress_total,
        output_json=task.output_json or b"",
        error_json=task.error_json or b"",
        charged_hundredths=task.charged,
        held_hundredths=task.held,
        attempts=task.attempts,
        cancel_requested=task.cancel_requested,
        created_at_ms=task.created_at_ms,
        started_at_ms=task.started_at_ms or 0,
        completed_at_ms=task.completed_at_ms or 0,
    )


def task_record(task: pb.Task) -> TaskRecord:
    """The record of a task message (the edge renders tasks with ``task_document``)."""
    return TaskRecord(
        id=task.id,
        account_id=task.account_id,
        reservation_id=task.reservation_id,
        model=task.model,
        route=task.route,
        input_media_id=task.input_media_id,
        content_type=task.content_type,
        callback_url=task.callback_url,
        origin=task.origin,
        status=_STATUS_NAME[task.status],  # type: ignore[arg-type]
        cancel_requested=task.cancel_requested,
        attempts=task.attempts,
        progress_step=task.progress_step,
        progress_total=task.progress_total,
        output_json=task.output_json or None,
        error_json=task.error_json or None,
        created_at_ms=task.created_at_ms,
        started_at_ms=task.started_at_ms or None,
        completed_at_ms=task.completed_at_ms or None,
        held=task.held_hundredths,
        charged=task.charged_hundredths,
    )


def _lease(seconds: int) -> int:
    if not 1 <= seconds <= MAX_LEASE_SECONDS:
        raise InvalidRequest(f"'lease_seconds' must be between 1 and {MAX_LEASE_SECONDS}.")
    return seconds


class TaskServicer(pb_grpc.TaskServiceServicer):
    """Implements ``kiln.billing.v1.TaskService`` on the billing servicer's ledger."""

    def __init__(self, billing: BillingServicer, tasks: TaskStore) -> None:
        self.billing = billing
        self.tasks = tasks

    async def CreateTask(
        self, request: pb.CreateTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateTaskResponse:
        items = usage_items(request.usage)
        for name in ("model", "route", "input_media_id", "content_type"):
            if not getattr(request, name):
                raise InvalidRequest(f"'{name}' is required.")
        claim = None
        if request.HasField("idempotency"):
            claim = IdempotencyClaim(request.idempotency.key, request.idempotency.fingerprint)
        new = NewTask(
            model=request.model,
            route=request.route,
            input_media_id=request.input_media_id,
            content_type=request.content_type,
            callback_url=request.callback_url,
            origin=request.origin,
        )
        outcome = await self.billing.authorize(
            request.credential,
            items,
            request.request_id,
            self.billing._ttl(request.ttl_seconds),
            claim,
            then=self.tasks.creator(new),
        )
        response = pb.CreateTaskResponse(account=account_pb(outcome.account))
        if outcome.replay is not None:
            response.replay.CopyFrom(stored_response_pb(outcome.replay))
        else:
            response.task.CopyFrom(task_pb(await self.tasks.for_hold(outcome)))
        return response

    async def GetTask(
        self, request: pb.GetTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetTaskResponse:
        task = await self.tasks.get(request.account_id, request.task_id)
        webhook = await self.tasks.webhook(request.account_id, request.task_id)
        return pb.GetTaskResponse(
            task=task_pb(task), webhook_json=json.dumps(webhook).encode() if webhook else b""
        )

    async def ListTasks(
        self, request: pb.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTasksResponse:
        status = _STATUS_NAME.get(request.status) if request.status else None
        tasks, token = await self.tasks.list(
            request.account_id, status=status, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListTasksResponse(tasks=[task_pb(task) for task in tasks], next_page_token=token)

    async def CancelTask(
        self, request: pb.CancelTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelTaskResponse:
        return pb.CancelTaskResponse(
            task=task_pb(await self.tasks.cancel(request.account_id, request.task_id))
        )

    async def ClaimTask(
        self, request: pb.ClaimTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClaimTaskResponse:
        if not request.worker_id:
            raise InvalidRequest("'worker_id' is required.")
        claim = await self.tasks.claim(request.worker_id, _lease(request.lease_seconds))
        if claim is None:
            return pb.ClaimTaskResponse()
        return pb.ClaimTaskResponse(task=task_pb(claim.task), run_token=claim.run_token)

    async def RenewTask(
        self, request: pb.RenewTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.RenewTaskResponse:
        cancel, lost = await self.tasks.renew(
            request.task_id,
            request.run_token,
            _lease(request.lease_seconds),
            step=max(0, request.progress_step),
            total=max(0, request.progress_total),
        )
        return pb.RenewTaskResponse(cancel_requested=cancel, lost=lost)

    async def FinishTask(
        self, request: pb.FinishTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.FinishTaskResponse:
        status = _STATUS_NAME.get(request.status, "")
        task = await self.tasks.finish(
            request.task_id,
            request.run_token,
            status,
            output=request.output_json,
            error=request.error_json,
            media=[media_record(record) for record in request.media],
            progress=(max(0, request.progress_step), max(0, request.progress_total)),
        )
        return pb.FinishTaskResponse(task=task_pb(task))

    async def AdoptTask(
        self, request: pb.AdoptTaskRequest, context: grpc.aio.ServicerContext
    ) -> pb.AdoptTaskResponse:
        for name in ("reservation_id", "model", "route", "worker_id"):
            if not getattr(request, name):
                raise InvalidRequest(f"'{name}' is required.")
        new = NewTask(request.model, request.route, "", "", request.callback_url, request.origin)
        claim = await self.tasks.adopt(
            request.reservation_id, new, request.worker_id, _lease(request.lease_seconds)
        )
        return pb.AdoptTaskResponse(task=task_pb(claim.task), run_token=claim.run_token)
