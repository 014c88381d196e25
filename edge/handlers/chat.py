"""``POST /v1/chat/completions``: OpenAI's chat API, premium only, streamed as SSE.

Flow: check the body -> Authorize (billing refuses non-premium accounts with
the contract's premium_required message; premium use is reserved and
committed, at the price billing decides, 0 for premium, so every use is
recorded) -> fetch ``image_url`` images (data: or public https:// only; at
most ``max_chat_images``, counted with the body before Authorize; all fetched
together under one deadline, every redirect hop checked: :mod:`edge.fetch`;
a failure is a 400 and the hold is released) -> stream the llm service's deltas. With ``stream: true`` each delta is written
as a ``chat.completion.chunk`` the moment it arrives, and the charge is
committed when the model ends, before the finish chunk and ``[DONE]``; an
error after the headers went out is sent as an error event (and nothing is
charged); a client that goes away cancels the gRPC call, which frees the slot.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Any

from aiohttp import web

from edge.fetch import ImageFetcher
from edge.flow import Charge, Done, Hold, billed, billed_stream, credential_from
from edge.forms import read_body
from edge.keys import REGISTRY, REQUEST_ID, SETTINGS, UPSTREAMS
from edge.responses import SSE_HEADERS, json_response, sse_event
from edge.schemas import ChatCompletionRequest, ImagePart, parse_body
from kiln.billing.v1 import billing_service_pb2 as billing_pb
from kiln.llm.v1 import llm_service_pb2 as llm_pb
from services.common.errors import InvalidRequest, KilnError, ProcessingError, envelope
from services.common.money import format_credits
from services.common.registry import CHAT, DEFAULT_CHAT_MODEL

log = logging.getLogger("kiln.edge")
FINISH = {llm_pb.FINISH_REASON_STOP: "stop", llm_pb.FINISH_REASON_LENGTH: "length"}


def _image_urls(body: ChatCompletionRequest) -> list[tuple[str, str]]:
    """Each image part's ``(name, url)``, in order."""
    return [
        (f"messages[{m_index}].content[{p_index}]", part.image_url.url)
        for m_index, message in enumerate(body.messages)
        if not isinstance(message.content, str)
        for p_index, part in enumerate(message.content)
        if isinstance(part, ImagePart)
    ]


def _check_image_count(body: ChatCompletionRequest, most: int) -> None:
    """At most ``most`` images per request (``max_chat_images``): counted before anything is fetched."""
    count = len(_image_urls(body))
    if count > most:
        raise InvalidRequest(f"Too many images: {count}; a chat request may carry at most {most}")


async def _to_proto(request: web.Request, body: ChatCompletionRequest, model: str) -> llm_pb.ChatRequest:
    settings = request.app[SETTINGS]
    # Every image first (counted by create_chat_completion before Authorize; data: decoded,
    # https:// fetched concurrently under one deadline).
    async with ImageFetcher(
        deadline_seconds=settings.chat_image_fetch_seconds,
        max_bytes=settings.max_input_image_bytes,
        max_total_bytes=settings.max_body_bytes,  # no more than the body could have carried
        allow=settings.fetch_allow_networks,
    ) as fetcher:
        images = iter(await fetcher.fetch_all(_image_urls(body)))
    messages: list[llm_pb.ChatMessage] = []
    for message in body.messages:
        role = "system" if message.role == "developer" else message.role
        parts: list[llm_pb.ContentPart] = []
        if isinstance(message.content, str):
            parts.append(llm_pb.ContentPart(text=message.content))
        else:
            for part in message.content:
                if isinstance(part, ImagePart):
                    parts.append(llm_pb.ContentPart(image=llm_pb.ImageInput(data=next(images))))
                else:
                    parts.append(llm_pb.ContentPart(text=part.text))
        messages.append(llm_pb.ChatMessage(role=role, content=parts))
    proto = llm_pb.ChatRequest(
        model=model, messages=messages, stop=body.stops(), request_id=request[REQUEST_ID]
    )
    for field in ("temperature", "top_p", "seed"):
        if getattr(body, field) is not None:
            setattr(proto, field, getattr(body, field))
    limit = body.answer_limit()
    if limit is not None:
        proto.max_tokens = limit
    return proto


def _usage(end: llm_pb.ChatEnd) -> dict[str, int]:
    return {
        "prompt_tokens": end.usage.prompt_tokens,
        "completion_tokens": end.usage.completion_tokens,
        "total_tokens": end.usage.total_tokens,
    }


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    credential_from(request)
    body = parse_body(ChatCompletionRequest, await read_body(request))
    if body.n not in (None, 1):
        raise InvalidRequest("Only n=1 is supported")
    if not body.messages:
        raise InvalidRequest("'messages' must hold at least one message")
    body.stops()
    _check_image_count(body, request.app[SETTINGS].max_chat_images)
    spec = request.app[REGISTRY].resolve(body.model, CHAT, DEFAULT_CHAT_MODEL)
    usage = [billing_pb.Usage(chat=billing_pb.ChatUsage(model=spec.id))]
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    if body.stream:

        async def stream(hold: Hold) -> web.StreamResponse:
            proto = await _to_proto(request, body, spec.id)
            async with contextlib.aclosing(request.app[UPSTREAMS].llm.chat(proto)) as events:
                return await _stream(request, body, events, completion_id, created, hold, usage)

        return await billed_stream(request, usage, stream, dry_run=body.dry_run)

    async def work(auth: billing_pb.AuthorizeResponse) -> Done[dict[str, Any]]:
        proto = await _to_proto(request, body, spec.id)
        return Done(await _collect(request.app[UPSTREAMS].llm.chat(proto), completion_id, created), usage)

    async def answer(completion: dict[str, Any], charge: Charge) -> web.StreamResponse:
        return json_response(completion, headers={"X-Credits-Charged": format_credits(charge.charged)})

    return await billed(request, usage, work, answer, dry_run=body.dry_run)


async def _collect(events: Any, completion_id: str, created: int) -> dict[str, Any]:
    model, text, end = "", [], None
    async with contextlib.aclosing(events):
        async for event in events:
            kind = event.WhichOneof("event")
            if kind == "start":
                model = event.start.model
            elif kind == "delta":
                text.append(event.delta.text)
            elif kind == "end":
                end = event.end
    if end is None:
        raise ProcessingError("The model ended without an answer")
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                # OpenAI's required refusal and logprobs: always null here.
                "message": {"role": "assistant", "content": "".join(text), "refusal": None},
                "logprobs": None,
                "finish_reason": FINISH.get(end.finish_reason, "stop"),
            }
        ],
        "usage": _usage(end),
    }


async def _stream(
    request: web.Request,
    body: ChatCompletionRequest,
    events: Any,
    completion_id: str,
    created: int,
    hold: Hold,
    usage: list[billing_pb.Usage],
) -> web.StreamResponse:
    """Writes each event as it arrives and charges when the model ends, before the last
    bytes. A client that left ends the iteration; the caller closes the iterator, which
    cancels the gRPC call (the model stops at its next token)."""
    # The first event (the model, or an error such as a too-long prompt) comes before the headers.
    first = await anext(events)
    model = first.start.model if first.HasField("start") else ""
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    await response.write(sse_event(chunk({"role": "assistant", "content": ""})))
    try:
        async for event in events:
            kind = event.WhichOneof("event")
            if kind == "delta" and event.delta.text:
                await response.write(sse_event(chunk({"content": event.delta.text})))
            elif kind == "end":
                # Every token is out: charge now, before the last bytes (finish, usage, [DONE]).
                await hold.settle(usage)
                await response.write(sse_event(chunk({}, FINISH.get(event.end.finish_reason, "stop"))))
                if body.stream_options and body.stream_options.include_usage:
                    final = chunk({}) | {"choices": [], "usage": _usage(event.end)}
                    await response.write(sse_event(final))
    except KilnError as err:  # after the headers: an error event, then the end of the stream
        await response.write(sse_event(envelope(err.message, err.error_type)))
        await response.write_eof()
        return response  # never settled: billed_stream releases the hold
    except ConnectionResetError:
        log.info("chat client %s went away; generation cancelled", request[REQUEST_ID])
        return response
    if hold.charged is None:  # the stream ended without its end event: a fault of ours, not charged
        fault = ProcessingError("The model ended without an answer")
        await response.write(sse_event(envelope(fault.message, fault.error_type)))
        await response.write_eof()
        return response
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response
