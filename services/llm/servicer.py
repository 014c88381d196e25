"""``kiln.llm.v1.LlmService``: protobuf in, checks, chat engine, protobuf out.

``Chat`` resolves the model (the contract's "Invalid model ID" error), checks
the request (roles ``system``/``user``/``assistant``; every message has
content and no part is empty; ``temperature`` 0 to 2; ``top_p`` 0 to 1;
``max_tokens`` from 1 to the model's context; at most :data:`MAX_STOP`
non-empty stop sequences of at most :data:`MAX_STOP_CHARS` characters; a
``seed`` of at least 0), decodes images in decode worker processes
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

import math
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from kiln.llm.v1 import llm_service_pb2 as pb
from kiln.llm.v1 import llm_service_pb2_grpc as pb_grpc
from services.common.decoding import DecodePool
from services.common.engine import EnginePool
from services.common.errors import InvalidRequest, quoted
from services.common.media.image import decode_image
from services.common.registry import CHAT, DEFAULT_CHAT_MODEL, MAX_SEED, Registry
from services.llm.batching import LENGTH, Delta, Finished, Sampling, Started
from services.llm.engines import ROLES, ChatEngine, ChatRequest, ImagePart, Message, TextPart

#: Full name of the service, for health and reflection.
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["LlmService"].full_name
#: Most stop sequences, and the longest one (OpenAI's limits).
MAX_STOP = 4
MAX_STOP_CHARS = 256
#: Most messages in one conversation.
MAX_MESSAGES = 1024
#: Most an image's longer side may be times its shorter side (Qwen-VL's image processor
#: refuses more: a 100000x1 image was a 500 instead of a 400).
MAX_IMAGE_ASPECT_RATIO = 200

FINISH_REASONS = {LENGTH: pb.FINISH_REASON_LENGTH}


class LlmServicer(pb_grpc.LlmServiceServicer):
    """Chat over gRPC, streaming tokens as they are produced."""

    def __init__(
        self,
        *,
        registry: Registry,
        pool: EnginePool[ChatEngine],
        max_input_image_pixels: int = 4096 * 4096,
        max_input_image_bytes: int = 20 * 1024 * 1024,
        decoder: DecodePool | None = None,
    ) -> None:
        self.registry = registry
        self.pool = pool
        self.decoder = decoder or DecodePool()
        self.max_input_image_pixels = max_input_image_pixels
        self.max_input_image_bytes = max_input_image_bytes

    async def Chat(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ChatResponse]:
        spec = self.registry.resolve(request.model or None, CHAT, DEFAULT_CHAT_MODEL)
        engine = self.pool.get(spec.id)
        sampling = self._sampling(request)
        max_tokens = request.max_tokens if request.HasField("max_tokens") else None
        if max_tokens is not None and not 1 <= max_tokens <= engine.context:
            raise InvalidRequest(f"'max_tokens' must be between 1 and {engine.context} for model '{spec.id}'")
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
        if not (math.isfinite(temperature) and 0.0 <= temperature <= 2.0):
            raise InvalidRequest("'temperature' must be between 0 and 2")
        top_p = request.top_p if request.HasField("top_p") else 1.0
        if not (math.isfinite(top_p) and 0.0 <= top_p <= 1.0):
            raise InvalidRequest("'top_p' must be between 0 and 1")
        seed = request.seed if request.HasField("seed") else None
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise InvalidRequest(f"'seed' must be between 0 and {MAX_SEED}")
        stops = tuple(request.stop)
        if len(stops) > MAX_STOP:
            raise InvalidRequest(f"'stop' takes at most {MAX_STOP} sequences, not {len(stops)}")
        for stop in stops:
            if not stop:
                raise InvalidRequest("A 'stop' sequence must not be empty")
            if len(stop) > MAX_STOP_CHARS:
                raise InvalidRequest(f"A 'stop' sequence is longer than {MAX_STOP_CHARS} characters")
        return Sampling(temperature=temperature, top_p=top_p, seed=seed, stop=stops)

    @staticmethod
    def _shape(request: pb.ChatRequest) -> list[tuple[str, list[str | bytes]]]:
        """(role, parts) per message, parts as text or undecoded image bytes; checks roles and emptiness."""
        if not request.messages:
            raise InvalidRequest("'messages' is required and must not be empty")
        if len(request.messages) > MAX_MESSAGES:
            raise InvalidRequest(f"Too many messages: {len(request.messages)}; the maximum is {MAX_MESSAGES}")
        shape: list[tuple[str, list[str | bytes]]] = []
        for number, message in enumerate(request.messages, 1):
            if message.role not in ROLES:
                raise InvalidRequest(
                    f"Invalid role '{quoted(message.role)}' in message {number}. Supported roles: {', '.join(ROLES)}"
                )
            parts: list[str | bytes] = []
            for part in message.content:
                kind = part.WhichOneof("part")
                if kind == "text":
                    parts.append(part.text)
                elif kind == "image":
                    if not part.image.data:
                        raise InvalidRequest(f"Message {number} has an empty image")
                    if message.role != "user":
                        raise InvalidRequest(f"Images are only accepted in user messages (message {number})")
                    parts.append(part.image.data)
                else:
                    raise InvalidRequest(f"Message {number} has an empty content part")
            if not any(isinstance(p, bytes) or p.strip() for p in parts) and message.role != "assistant":
                raise InvalidRequest(f"Message {number} ({message.role}) has no content")
            shape.append((message.role, parts))
        if all(role == "system" for role, _ in shape):
            raise InvalidRequest("'messages' needs at least one user or assistant message")
        return shape

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
                    image = await self.decoder.run(
                        "The image",
                        decode_image,
                        part,
                        max_pixels=self.max_input_image_pixels,
                        max_bytes=self.max_input_image_bytes,
                    )
                    if max(image.size) > MAX_IMAGE_ASPECT_RATIO * min(image.size):
                        raise InvalidRequest(
                            f"The image is {image.width}x{image.height} pixels; its longer side may be at "
                            f"most {MAX_IMAGE_ASPECT_RATIO} times its shorter side"
                        )
                    content.append(ImagePart(image))
                else:
                    content.append(TextPart(part))
            messages.append(Message(role, tuple(content)))
        return tuple(messages)
