"""The request rules of chat (capability ``chat``), in one place and free of torch.

The servicer checks a request with these before anything is decoded or
tokenized, and the engine checks the same rules again for callers that reach
it directly. Rules that depend on the model take what they need as arguments:
its context window (``max_tokens``, the prompt's characters and tokens),
whether it has vision, how many images it takes. Every failure is an
:class:`~services.common.errors.InvalidRequest`.

A conversation is checked as ``(role, parts)`` pairs, a part being its text
(``str``), its undecoded image bytes (``bytes``) or ``None`` for a part that
holds neither.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from services.common.errors import InvalidRequest, quoted
from services.common.registry import MAX_SEED

#: The roles a message may have.
ROLES = ("system", "user", "assistant")
#: Sampling ranges (from 0; integers, so the edge's schema prints them as the messages here do).
MAX_TEMPERATURE = 2
MAX_TOP_P = 1
#: Most stop sequences, and the longest one (OpenAI's limits).
MAX_STOP = 4
MAX_STOP_CHARS = 256
#: Most messages in one conversation.
MAX_MESSAGES = 1024
#: Most an image's longer side may be times its shorter side (Qwen-VL's image processor
#: refuses more: a 100000x1 image was a 500 instead of a 400).
MAX_IMAGE_ASPECT_RATIO = 200
#: A prompt's characters are checked against ``context * MAX_CHARS_PER_TOKEN`` before tokenizing,
#: so a huge prompt is refused without spending time on it.
MAX_CHARS_PER_TOKEN = 16

#: One message as the rules see it: its role and its parts (text, image bytes, or None: empty).
MessageShape = tuple[str, Sequence[str | bytes | None]]


def check_sampling(*, temperature: float, top_p: float, seed: int | None, stops: Sequence[str]) -> None:
    """``temperature`` 0 to 2, ``top_p`` 0 to 1, ``seed`` 0 or more, at most :data:`MAX_STOP` non-empty
    stop sequences of at most :data:`MAX_STOP_CHARS` characters."""
    if not (math.isfinite(temperature) and 0.0 <= temperature <= MAX_TEMPERATURE):
        raise InvalidRequest(f"'temperature' must be between 0 and {MAX_TEMPERATURE}")
    if not (math.isfinite(top_p) and 0.0 <= top_p <= MAX_TOP_P):
        raise InvalidRequest(f"'top_p' must be between 0 and {MAX_TOP_P}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise InvalidRequest(f"'seed' must be between 0 and {MAX_SEED}")
    if len(stops) > MAX_STOP:
        raise InvalidRequest(f"'stop' takes at most {MAX_STOP} sequences, not {len(stops)}")
    for stop in stops:
        if not stop:
            raise InvalidRequest("A 'stop' sequence must not be empty")
        if len(stop) > MAX_STOP_CHARS:
            raise InvalidRequest(f"A 'stop' sequence is longer than {MAX_STOP_CHARS} characters")


def check_max_tokens(max_tokens: int | None, *, context: int, model: str) -> None:
    """``max_tokens``, when given, from 1 to the model's context."""
    if max_tokens is not None and not 1 <= max_tokens <= context:
        raise InvalidRequest(f"'max_tokens' must be between 1 and {context} for model '{model}'")


def check_message_count(count: int) -> None:
    """At least one message, at most :data:`MAX_MESSAGES`."""
    if not count:
        raise InvalidRequest("'messages' is required and must not be empty")
    if count > MAX_MESSAGES:
        raise InvalidRequest(f"Too many messages: {count}; the maximum is {MAX_MESSAGES}")


def check_role(role: str, number: int) -> None:
    """Message ``number`` (from 1) has one of :data:`ROLES`."""
    if role not in ROLES:
        raise InvalidRequest(
            f"Invalid role '{quoted(role)}' in message {number}. Supported roles: {', '.join(ROLES)}"
        )


def check_messages(messages: Sequence[MessageShape]) -> None:
    """The conversation: its length, every role, no empty part, images only from the user and
    not empty, content in every system and user message, and at least one user or
    assistant message."""
    check_message_count(len(messages))
    for number, (role, parts) in enumerate(messages, 1):
        check_role(role, number)
        for part in parts:
            if part is None:
                raise InvalidRequest(f"Message {number} has an empty content part")
            if isinstance(part, bytes):
                if not part:
                    raise InvalidRequest(f"Message {number} has an empty image")
                if role != "user":
                    raise InvalidRequest(f"Images are only accepted in user messages (message {number})")
        if not any(isinstance(p, bytes) or (p and p.strip()) for p in parts) and role != "assistant":
            raise InvalidRequest(f"Message {number} ({role}) has no content")
    if all(role == "system" for role, _ in messages):
        raise InvalidRequest("'messages' needs at least one user or assistant message")


def check_images(count: int, *, model: str, vision: bool, max_images: int, vision_model: str) -> None:
    """Images only for a vision model (the contract's message, naming ``vision_model``), at most
    ``max_images``."""
    if count and not vision:
        raise InvalidRequest(
            f"Model '{model}' does not support vision. Use '{vision_model}' for image inputs."
        )
    if count > max_images:
        raise InvalidRequest(f"Too many images: {count}; model '{model}' accepts at most {max_images}")


def check_image_aspect(width: int, height: int) -> None:
    """A decoded image's longer side at most :data:`MAX_IMAGE_ASPECT_RATIO` times its shorter side."""
    if max(width, height) > MAX_IMAGE_ASPECT_RATIO * min(width, height):
        raise InvalidRequest(
            f"The image is {width}x{height} pixels; its longer side may be at "
            f"most {MAX_IMAGE_ASPECT_RATIO} times its shorter side"
        )


def check_prompt_chars(chars: int, *, context: int, model: str) -> None:
    """The prompt's characters, before tokenizing: at most ``context *`` :data:`MAX_CHARS_PER_TOKEN`."""
    if chars > context * MAX_CHARS_PER_TOKEN:
        raise InvalidRequest(
            f"Model '{model}': prompt too long: {chars} characters, the context is {context} tokens"
        )


def check_prompt_tokens(tokens: int, *, context: int, model: str) -> None:
    """The tokenized prompt leaves room for at least one answer token in the context."""
    if tokens >= context:
        raise InvalidRequest(
            f"Model '{model}': prompt too long: {tokens} tokens, the context is "
            f"{context} tokens (prompt and answer together)"
        )
