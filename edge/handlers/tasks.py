"""``/v1/tasks``: seed 003's unified tasks API over every paid route.

``POST /v1/tasks`` takes ``{model, input, callback_url?, dry_run?, operation?}``,
picks the synchronous route that serves the model (``operation`` chooses among
a model's routes, e.g. a segmentation model's ``remove-background``), builds
that route's request from ``input`` (a JSON body as it is; for an upload route,
a multipart form whose file fields are given as base64 or ``data:`` URLs) and
sends it to this edge as ``Prefer: respond-async`` (or ``?dry_run=true``): the
route checks it exactly as a synchronous call, and the billed flow queues it
(``edge.tasks.defer``). Answers and errors use seed 003's envelope
(``{"code", "success", "data"}``) on these routes only (``edge.middlewares``).
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from edge.flow import IDEMPOTENCY_HEADER, credential_from
from edge.forms import read_body
from edge.keys import MEDIA, REGISTRY, REQUEST_ID, SETTINGS, UPSTREAMS
from edge.ratelimit import FORWARDED_HEADERS, LIMIT_HEADERS
from edge.responses import json_response
from edge.schemas import TaskCreateRequest, parse_body
from edge.tasks import (
    CALLBACK_HEADER,
    INPUT_MIME,
    SELF_URL,
    SESSION,
    TASK_INPUT_HEADER,
    decoded_file,
    sign_input,
)
from edge.webhooks import check_webhook_url
from kiln.billing.v1 import task_service_pb2 as task_pb
from services.billing.task_servicer import task_record
from services.billing.tasks import STATUSES, task_document
from services.common import registry as reg
from services.common.errors import InvalidRequest, NotFound, ProcessingError, quoted

#: Each capability's routes by operation; the first is the default.
OPERATIONS: dict[str, dict[str, str]] = {
    reg.TEXT_TO_IMAGE: {"generate": "/v1/images/generations", "edit": "/v1/images/edits"},
    reg.IMAGE_EDIT: {"edit": "/v1/images/edits"},
    reg.SEGMENTATION: {
        "segment": "/v1/images/segmentations",
        "remove-background": "/v1/images/remove-background",
        "remove-video-background": "/v1/videos/remove-background",
    },
    reg.UPSCALE: {"upscale": "/v1/images/upscale"},
    reg.CHAT: {"chat": "/v1/chat/completions"},
    reg.SPEECH: {"speech": "/v1/audio/speech"},
    reg.VOICE_CLONE: {"clone": "/v1/audio/clone"},
    reg.MUSIC: {"generate": "/v1/music/generate", "cover": "/v1/music/cover", "repaint": "/v1/music/repaint"},
    reg.IMAGE_TO_VIDEO: {"img2video": "/v1/images/img2video"},
}
#: The field of a route's body that names the model (``model`` where not listed).
MODEL_FIELDS = {"/v1/images/upscale": "method", "/v1/audio/speech": "voice"}
#: Fields a task forces: a task's answer is never a stream.
FORCED = {"/v1/chat/completions": {"stream": False}, "/v1/audio/clone": {"stream": False}}
#: Fields a task fills when its input leaves them out (speech names its voice as the model).
DEFAULTS = {"/v1/audio/speech": {"model": "tts-1"}}
#: Input fields that make a text-to-image model's task an edit.
EDIT_FIELDS = ("image", "input_images", "mask")


def seed_answer(data: Any) -> web.Response:
    """Seed 003's success envelope."""
    return json_response({"code": 200, "success": True, "data": data})


def _route_path(capabilities: tuple[str, ...], operation: str | None, task_input: dict[str, Any]) -> str:
    options: dict[str, str] = {}
    for capability in capabilities:
        for name, path in OPERATIONS.get(capability, {}).items():
            options.setdefault(name, path)
    if not options:
        raise InvalidRequest("This model cannot run as a task.")
    chosen = operation
    if chosen is None:
        if "generate" in options and "edit" in options and any(f in task_input for f in EDIT_FIELDS):
            chosen = "edit"
        elif "remove-video-background" in options and "video" in task_input:
            chosen = "remove-video-background"
        else:
            chosen = next(iter(options))
    found = options.get(chosen)
    if found is None:
        raise InvalidRequest(
            f"Invalid operation '{quoted(chosen)}' for this model. Supported operations: {', '.join(options)}"
        )
    return found


def _route(path: str) -> Any:
    from edge.routes import ROUTES

    return next(route for route in ROUTES if route.method == "POST" and route.path == path)


async def _multipart(route: Any, fields: dict[str, Any]) -> tuple[bytes, str]:
    """A form-only route's multipart body: files from base64 or ``data:`` URLs, the rest as text."""
    writer = aiohttp.MultipartWriter("form-data")
    for name, value in fields.items():
        field = "file" if name == "video" and "file" in route.files else name
        if field in route.files:
            if not isinstance(value, str):
                raise InvalidRequest(f"'{quoted(name)}' must be a base64 string or a data: URL")
            data, mime = decoded_file(value, name)
            part = writer.append(data, CIMultiDict({"Content-Type": mime}))
            part.set_content_disposition("form-data", name=field, filename=field)
        else:
            text = value if isinstance(value, str) else orjson.dumps(value).decode()
            if isinstance(value, bool):
                text = "true" if value else "false"
            part = writer.append(text)
            part.set_content_disposition("form-data", name=field)

    chunks: list[bytes] = []

    class _Sink:
        async def write(self, data: bytes) -> None:
            chunks.append(bytes(data))

    await writer.write(_Sink())  # type: ignore[arg-type]
    return b"".join(chunks), f"multipart/form-data; boundary={writer.boundary}"


async def create_task(request: web.Request) -> web.StreamResponse:
    """``POST /v1/tasks``: the route's request, queued (or priced, with ``dry_run``)."""
    body = parse_body(TaskCreateRequest, await read_body(request))
    credential_from(request)  # a 401 before anything else
    spec = request.app[REGISTRY].get(body.model)
    if spec is None:
        raise NotFound(f"Model '{quoted(body.model)}' was not found. See GET /v1/models.")
    task_input = dict(body.input)
    path = _route_path(spec.capabilities, body.operation, task_input)
    route = _route(path)
    task_input[MODEL_FIELDS.get(path, "model")] = body.model
    task_input.update(FORCED.get(path, {}))
    task_input = DEFAULTS.get(path, {}) | task_input
    task_input.pop("dry_run", None)
    if route.body is not None:
        data, content_type = orjson.dumps(task_input), "application/json"
    else:
        data, content_type = await _multipart(route, task_input)
    headers = {"Content-Type": content_type, "X-Request-ID": request[REQUEST_ID]}
    for name in ("X-API-Key", "Authorization", IDEMPOTENCY_HEADER):
        if name in request.headers:
            headers[name] = request.headers[name]
    if body.callback_url:
        check_webhook_url(body.callback_url, request.app[SETTINGS].webhook_allowed_hosts)
        headers[CALLBACK_HEADER] = body.callback_url
    store = request.app[MEDIA]
    media_id = ""
    query = ""
    if body.dry_run:
        query = "?dry_run=true"
    else:
        media_id = await store.put_async(data, INPUT_MIME)
        headers[TASK_INPUT_HEADER] = sign_input(request.app[SETTINGS], media_id)
    base = await request.app[SELF_URL]
    try:
        async with request.app[SESSION].post(f"{base}{path}{query}", data=data, headers=headers) as response:
            answer = await response.read()
            status = response.status
            kind = response.content_type
            # the route's rate-limit answer (x-ratelimit-*, Retry-After) is this answer's
            request[LIMIT_HEADERS] = {
                name: response.headers[name] for name in FORWARDED_HEADERS if name in response.headers
            }
    except BaseException:
        if media_id:
            await store.delete_async(media_id)
        raise
    if status >= 400 or (not body.dry_run and status != 202):
        if media_id:
            await store.delete_async(media_id)  # nothing was queued
        if kind != "application/json":
            raise ProcessingError(f"The task could not be created (HTTP {status}).")
        return web.Response(body=answer, status=status, content_type="application/json")
    if body.dry_run:  # the preview's bytes as they are: its cost stays exact decimal text
        return web.Response(
            body=b'{"code":200,"success":true,"data":' + answer + b"}", content_type="application/json"
        )
    document = orjson.loads(answer)
    return seed_answer({"task_id": document["task_id"], "status": document["status"]})


async def get_task(request: web.Request) -> web.Response:
    account = await _account(request)
    response = await request.app[UPSTREAMS].tasks.call(
        "GetTask",
        task_pb.GetTaskRequest(account_id=account, task_id=request.match_info["task_id"]),
        request[REQUEST_ID],
    )
    webhook = orjson.loads(response.webhook_json) if response.webhook_json else None
    return seed_answer(task_document(task_record(response.task), webhook))


async def cancel_task(request: web.Request) -> web.Response:
    account = await _account(request)
    response = await request.app[UPSTREAMS].tasks.call(
        "CancelTask",
        task_pb.CancelTaskRequest(account_id=account, task_id=request.match_info["task_id"]),
        request[REQUEST_ID],
    )
    return seed_answer(task_document(task_record(response.task)))


async def list_tasks(request: web.Request) -> web.Response:
    account = await _account(request)
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"Invalid status '{quoted(status)}'. Supported statuses: {', '.join(STATUSES)}")
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        raise InvalidRequest("'limit' must be an integer") from None
    response = await request.app[UPSTREAMS].tasks.call(
        "ListTasks",
        task_pb.ListTasksRequest(
            account_id=account,
            status=task_pb.TaskStatus.Value(f"TASK_STATUS_{status.upper()}") if status else None,
            page_size=limit,
            page_token=request.query.get("page_token", ""),
        ),
        request[REQUEST_ID],
    )
    return seed_answer(
        {
            "tasks": [task_document(task_record(task)) for task in response.tasks],
            "next_page_token": response.next_page_token or None,
        }
    )


async def _account(request: web.Request) -> str:
    account = await request.app[UPSTREAMS].billing.authenticate(credential_from(request), request[REQUEST_ID])
    return str(account.id)
