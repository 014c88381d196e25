"""``kiln.llm.v1.LlmService``: protobuf in, checks, chat engine, protobuf out.

``Chat`` resolves the model (the contract's "Invalid model ID" error), checks
the request with :mod:`services.llm.rules` (roles, content, sampling ranges,
stop sequences, ``max_tokens`` within the model's context), decodes images in decode worker processes
(:class:`~services.common.decoding.DecodePool`) through
:func:`services.common.media.image.decode_image` (the configured byte and pixel
limits), and streams the engine's events: one ``start`` (the model that
answers and the prompt's token count), a ``delta`` for each piece of text as
soon as the engine produces it, and one ``end`` (finish reason and usage).
Images sent to a model without vision fail before anything is decoded, with
the contract's message. When the call is cancelled, gRPC cancels this
coroutine; closing the engine's iterator takes the request out of the batch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from kiln.llm.v1 import llm_service_pb2 as pb
from kiln.llm.v1 import llm_service_pb2_grpc as pb_grpc
from services.common.registry import CHAT, DEFAULT_CHAT_MODEL
from services.common.servicer import EngineServicer
from services.llm import rules
from services.llm.batching import LENGTH, Delta, Finished, Sampling, Started
from services.llm.engines import ChatEngine, ChatRequest, ImagePart, Message, TextPart

#: Full name of the service, for health and reflection.
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["LlmService"].full_name

FINISH_REASONS = {LENGTH: pb.FINISH_REASON_LENGTH}


class LlmServicer(EngineServicer[ChatEngine], pb_grpc.LlmServiceServicer):
    """Chat over gRPC, streaming tokens as they are produced."""

    async def Chat(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ChatResponse]:
        spec = self.registry.resolve(request.model or None, CHAT, DEFAULT_CHAT_MODEL)
        engine = self.pool.get(spec.id)
        sampling = self._sampling(request)
        max_tokens = request.max_tokens if request.HasField("max_tokens") else None
        rules.check_max_tokens(max_tokens, context=engine.context, model=spec.id)
        shape = self._shape(request)
        # Vision first: nothing is decoded for a request that cannot run.
        images = sum(isinstance(p, bytes) for _, parts in shape for p in parts)
        engine.check_images(images)
        messages = await self._decode(shape) if images else self._texts(shape)
        chat = ChatRequest(messages, sampling, max_tokens)
        async with aclosing(engine.run(chat, request_id=request.request_id)) as events:
            async for event in events:
                if isinstance(event, Started):
                    yield pb.ChatResponse(
                        start=pb.ChatStart(model=spec.id, prompt_tokens=event.prompt_tokens)
                    )
                elif isinstance(event, Delta):
                    yield pb.ChatResponse(delta=pb.ChatDelta(text=event.text))
                elif isinstance(event, Finished):
                    usage = pb.Usage(
                        prompt_tokens=event.prompt_tokens,
                        completion_tokens=event.completion_tokens,
                        total_tokens=event.prompt_tokens + event.completion_tokens,
                    )
                    reason = FINISH_REASONS.get(event.finish_reason, pb.FINISH_REASON_STOP)
                    yield pb.ChatResponse(end=pb.ChatEnd(finish_reason=reason, usage=usage))

    # --- checks and conversions ---

    @staticmethod
    def _sampling(request: pb.ChatRequest) -> Sampling:
        temperature = request.temperature if request.HasField("temperature") else 1.0
        top_p = request.top_p if request.HasField("top_p") else 1.0
        seed = request.seed if request.HasField("seed") else None
        stops = tuple(request.stop)
        rules.check_sampling(temperature=temperature, top_p=top_p, seed=seed, stops=stops)
        return Sampling(temperature=temperature, top_p=top_p, seed=seed, stop=stops)

    @staticmethod
    def _shape(request: pb.ChatRequest) -> list[tuple[str, list[str | bytes]]]:
        """(role, parts) per message, parts as text or undecoded image bytes, checked by
        :func:`services.llm.rules.check_messages`."""
        rules.check_message_count(len(request.messages))  # before converting a long list
        shape = [(message.role, [_part(part) for part in message.content]) for message in request.messages]
        rules.check_messages(shape)
        return [(role, [p for p in parts if p is not None]) for role, parts in shape]

    @staticmethod
    def _texts(shape: list[tuple[str, list[str | bytes]]]) -> tuple[Message, ...]:
        return tuple(Message(role, tuple(TextPart(str(p)) for p in parts)) for role, parts in shape)

    async def _decode(self, shape: list[tuple[str, list[str | bytes]]]) -> tuple[Message, ...]:
        """Decodes the untrusted images (in decode worker processes), within the configured limits."""
        messages = []
        for role, parts in shape:
            content: list[TextPart | ImagePart] = []
            for part in parts:
                if isinstance(part, bytes):
                    image = await self.decode_image(part)
                    rules.check_image_aspect(image.width, image.height)
                    content.append(ImagePart(image))
                else:
                    content.append(TextPart(part))
            messages.append(Message(role, tuple(content)))
        return tuple(messages)


def _part(part: pb.ContentPart) -> str | bytes | None:
    """A content part as :mod:`services.llm.rules` sees it: text, image bytes, or None when empty."""
    kind = part.WhichOneof("part")
    if kind == "text":
        return str(part.text)
    if kind == "image":
        return bytes(part.image.data)
    return None
