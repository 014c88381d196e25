"""What a rate-limited answer says, in one place: seed 003's message, the retry headers and
OpenAI's ``x-ratelimit-*`` headers.

Billing builds them for Envoy (the rate limit service's ``response_headers_to_add``), the edge
for the answers it makes itself (:mod:`edge.ratelimit`, :func:`edge.errors.error_response`).
"""

from __future__ import annotations

import math

from services.common.errors import RateLimited

#: Seed 003's message; N is whole seconds, rounded up.
RATE_LIMIT_MESSAGE = (
    "You have been ratelimited, this temporary restriction will be lifted in: {seconds} seconds"
)

LIMIT_HEADER = "x-ratelimit-limit-requests"
REMAINING_HEADER = "x-ratelimit-remaining-requests"
RESET_HEADER = "x-ratelimit-reset-requests"
#: Every header :func:`limit_headers` and :func:`retry_headers` set.
HEADER_NAMES = (LIMIT_HEADER, REMAINING_HEADER, RESET_HEADER, "retry-after", "retry-after-ms")


def _wait_ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def rate_limited(seconds: float) -> RateLimited:
    """The 429 of a request refused for ``seconds``: seed 003's message, and the wait as
    :attr:`KilnError.retry_after` (it crosses gRPC; the edge answers it as ``Retry-After`` and
    ``retry-after-ms``, :func:`edge.errors.error_response`). N in the message is the
    ``Retry-After`` value."""
    wait_ms = _wait_ms(seconds)
    return RateLimited(
        RATE_LIMIT_MESSAGE.format(seconds=math.ceil(wait_ms / 1000)), retry_after=wait_ms / 1000
    )


def retry_headers(seconds: float) -> dict[str, str]:
    """``Retry-After`` and ``retry-after-ms`` as :func:`edge.errors.error_response` writes them
    (for Envoy, which answers without the edge)."""
    wait_ms = _wait_ms(seconds)
    return {"retry-after": str(math.ceil(wait_ms / 1000)), "retry-after-ms": str(wait_ms)}


def openai_duration(seconds: float) -> str:
    """OpenAI's spelling of a reset time: ``120ms``, ``1s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def limit_headers(limit: int, remaining: int, reset_seconds: float) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*-requests`` headers of the budget a request was counted in."""
    return {
        LIMIT_HEADER: str(limit),
        REMAINING_HEADER: str(max(0, remaining)),
        RESET_HEADER: openai_duration(reset_seconds),
    }
