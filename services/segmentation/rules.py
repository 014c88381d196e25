"""The request rules of segmentation (capability ``segmentation``), in one place and free of torch.

An image request gives a prompt or at least one point; ``multimask_output``
only with points; at most :data:`MAX_POINTS` points, each inside the image
(``0 <= x < width``, ``0 <= y < height``; the error names the point); the
prompt at most ``max_prompt_chars`` (and required for background removal);
the image within the model's ``max_width`` x ``max_height``. A video needs a
model with a ``max_frames`` limit. The servicer checks these before any model
work, the engine checks the prompt-or-points rules again for callers that
reach it directly, and the edge checks the prompt's length before anything is
charged. Every failure is an :class:`~services.common.errors.InvalidRequest`.
"""

from __future__ import annotations

import math

from services.common.errors import InvalidRequest

#: Most points one request may give.
MAX_POINTS = 64


def check_prompt_length(prompt: str, *, max_chars: int) -> None:
    """At most ``max_chars`` characters (``settings.max_prompt_chars``)."""
    if len(prompt) > max_chars:
        raise InvalidRequest(f"'prompt' is longer than {max_chars} characters")


def check_prompt(prompt: str, *, max_chars: int, required: bool) -> str:
    """The prompt's length, and that it is given when ``required``; returns it stripped."""
    check_prompt_length(prompt, max_chars=max_chars)
    if required and not prompt.strip():
        raise InvalidRequest("'prompt' is required and must not be empty")
    return prompt.strip()


def check_point_count(count: int) -> None:
    if count > MAX_POINTS:
        raise InvalidRequest(f"Too many points: {count}; the maximum is {MAX_POINTS}")


def check_prompt_or_points(prompt: str, points: int, *, multimask_output: bool) -> None:
    """Something to segment (a prompt, points or both); ``multimask_output`` only with points."""
    if not prompt.strip() and not points:
        raise InvalidRequest("Give a 'prompt' or at least one point ('point_coords') to segment")
    if multimask_output and not points:
        raise InvalidRequest("'multimask_output' is only allowed with points ('point_coords')")


def check_point(number: int, x: float, y: float, *, width: int, height: int) -> None:
    """Point ``number`` (from 1) inside a ``width`` x ``height`` image."""
    if not (math.isfinite(x) and math.isfinite(y) and 0 <= x < width and 0 <= y < height):
        raise InvalidRequest(
            f"Point {number} ({x:g}, {y:g}) is outside the {width}x{height} image; "
            f"x must be in [0, {width}) and y in [0, {height})"
        )


def check_image_size(width: int, height: int, *, model: str, max_width: int, max_height: int) -> None:
    """A decoded image within the model's ``max_width`` x ``max_height``."""
    if width > max_width or height > max_height:
        raise InvalidRequest(
            f"The image is {width}x{height} pixels; the {model} model accepts at most {max_width}x{max_height}"
        )


def check_video_model(model: str, *, max_frames: int) -> None:
    """Videos only for a model with a ``max_frames`` limit."""
    if not max_frames:
        raise InvalidRequest(f"Model '{model}' does not process videos")
