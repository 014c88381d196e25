"""The rules of an image-to-video request: checked, defaults filled, output size chosen.

Torch-free, so the edge can check a request with the same code before it
reserves credits. The rules (each broken one is an
:class:`~services.common.errors.InvalidRequest` naming the field):

* ``prompt``: required, not blank, at most ``max_prompt_chars`` characters
  (as ``negative_prompt``, whose default is the model's).
* ``num_frames``: the model's ``defaults.num_frames`` (81) when not given;
  otherwise ``4k + 1`` (the Wan VAE packs the first frame alone and then 4
  frames per latent frame) from :data:`MIN_FRAMES` to the model's
  ``limits.max_frames``: 5, 9, 13, ..., 81. Zero is refused, not defaulted.
* ``num_steps``: the model's default (4) when not given, else 1 to
  ``limits.max_steps``.
* ``resolution``: a tier of :data:`VIDEO_RESOLUTIONS`, case-insensitive,
  :data:`DEFAULT_RESOLUTION` when empty.
* ``guidance_scale``: the model's default when not given, else 0 to 30;
  ``seed``: 0 to ``MAX_SEED`` (drawn by the engine when not given).

**Output size** (:func:`video_size`). A tier is a box, long side x short side
(480p: 832x480, 720p: 1280x720, 1080p: 1920x1080), turned upright for a
portrait input (taller than wide). The output is the largest size with the
input's aspect ratio that fits the box, each side rounded to the nearest
multiple of the model's ``limits.multiple_of`` (16 for Wan: VAE scale 8 x
2x2 patches; halves round up, so 1080 becomes 1088). A 16:9 input at 1080p
is 1920x1088, a 9:16 one 1088x1920, a square one 1088x1088 at 1080p and
480x480 at 480p. The input is scaled and centre-cropped to exactly that size
(the crop removes at most the rounding). Inputs more elongated than
:data:`MAX_INPUT_ASPECT`:1 are refused.

**Frame rate**: the model's ``options.fps`` (16 for Wan 2.2 A14B), so a
video lasts ``num_frames / fps`` seconds (81 frames: 5.0625 s).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import InvalidRequest
from services.common.registry import MAX_SEED, ModelSpec

#: Resolution tiers: the box (long side, short side) in pixels.
VIDEO_RESOLUTIONS: dict[str, tuple[int, int]] = {
    "480p": (832, 480),
    "720p": (1280, 720),
    "1080p": (1920, 1080),
}
DEFAULT_RESOLUTION = "480p"
#: Fewest frames of a video (k = 1 in 4k + 1).
MIN_FRAMES = 5
#: Frames per latent frame of the Wan VAE (num_frames = 1 + FRAME_GROUP * k).
FRAME_GROUP = 4
#: Frame rate when the registry gives none (Wan 2.1 / 2.2 A14B).
DEFAULT_FPS = 16.0
#: Flow-matching shift when neither the registry nor the checkpoint gives one
#: (Wan 2.2's image-to-video value; the tiny build's scheduler saves it too).
DEFAULT_SHIFT = 5.0
#: Most elongated input accepted (long side / short side).
MAX_INPUT_ASPECT = 4.0
#: Guidance range accepted.
MAX_GUIDANCE = 30.0


@dataclass(frozen=True)
class VideoParams:
    """A checked image-to-video request, every default filled (the size comes with the image)."""

    model: ModelSpec
    prompt: str
    negative_prompt: str
    num_frames: int
    steps: int
    resolution: str
    use_ode: bool
    guidance_scale: float
    seed: int | None
    fps: float

    @property
    def duration_seconds(self) -> float:
        return self.num_frames / self.fps


def model_fps(spec: ModelSpec) -> float:
    """Frames per second of a model's videos (``options.fps``, else 16)."""
    fps = float(spec.options.get("fps", DEFAULT_FPS))
    if fps <= 0:
        raise ValueError(f"model {spec.id}: options.fps must be positive")
    return fps


def frame_choices(max_frames: int) -> str:
    """``"5, 9, 13, ..., 81"``: the accepted frame counts, for messages."""
    counts = list(range(MIN_FRAMES, max_frames + 1, FRAME_GROUP))
    if len(counts) <= 4:
        return ", ".join(map(str, counts))
    return f"{', '.join(map(str, counts[:3]))}, ..., {counts[-1]}"


def check_num_frames(spec: ModelSpec, num_frames: int) -> None:
    """Refuses a frame count that is not 4k + 1 within [MIN_FRAMES, max_frames]."""
    most = spec.limits.max_frames
    if not MIN_FRAMES <= num_frames <= most or (num_frames - 1) % FRAME_GROUP:
        raise InvalidRequest(
            f"'num_frames' must be of the form 4k+1 between {MIN_FRAMES} and {most} "
            f"({frame_choices(most)}) for the {spec.id} model; got {num_frames}"
        )


def normalize_resolution(resolution: str | None) -> str:
    """``"720P"`` -> ``"720p"``; empty -> the default tier; unknown -> InvalidRequest."""
    tier = (resolution or DEFAULT_RESOLUTION).strip().lower()
    if tier not in VIDEO_RESOLUTIONS:
        raise InvalidRequest(
            f"Invalid resolution '{resolution}'. Supported resolutions: {', '.join(VIDEO_RESOLUTIONS)}"
        )
    return tier


def video_params(
    spec: ModelSpec,
    *,
    prompt: str,
    negative_prompt: str | None = None,
    num_frames: int | None = None,
    steps: int | None = None,
    resolution: str | None = None,
    use_ode: bool = False,
    guidance_scale: float | None = None,
    seed: int | None = None,
    max_prompt_chars: int = 4000,
) -> VideoParams:
    """Checks an image-to-video request against its model and fills the defaults."""
    if not spec.limits.max_frames:
        raise InvalidRequest(f"Model '{spec.id}' does not generate videos")
    if not prompt or not prompt.strip():
        raise InvalidRequest("'prompt' is required and must not be empty")
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt or "")):
        if len(text) > max_prompt_chars:
            raise InvalidRequest(f"'{name}' is longer than {max_prompt_chars} characters")
    frames = spec.defaults.num_frames if num_frames is None else num_frames
    check_num_frames(spec, frames)
    steps = spec.defaults.steps if steps is None else steps
    if not 1 <= steps <= spec.limits.max_steps:
        raise InvalidRequest(f"'num_steps' must be between 1 and {spec.limits.max_steps}; got {steps}")
    tier = normalize_resolution(resolution)
    guidance = spec.defaults.guidance_scale if guidance_scale is None else guidance_scale
    if not 0.0 <= guidance <= MAX_GUIDANCE:
        raise InvalidRequest(f"'guidance_scale' must be between 0 and {MAX_GUIDANCE:g}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise InvalidRequest(f"'seed' must be between 0 and {MAX_SEED}")
    negative = spec.defaults.negative_prompt if negative_prompt is None else negative_prompt
    return VideoParams(
        model=spec,
        prompt=prompt,
        negative_prompt=negative,
        num_frames=frames,
        steps=steps,
        resolution=tier,
        use_ode=use_ode,
        guidance_scale=guidance,
        seed=seed,
        fps=model_fps(spec),
    )


def _round_to(value: float, multiple: int) -> int:
    """The nearest multiple (halves up), at least one multiple."""
    return max(multiple, int((value + multiple / 2) // multiple) * multiple)


def video_size(spec: ModelSpec, image_size: tuple[int, int], resolution: str) -> tuple[int, int]:
    """The output (width, height) for an input of ``image_size`` at a tier (see the module doc)."""
    width, height = image_size
    if width <= 0 or height <= 0:
        raise InvalidRequest("The image has no pixels.")
    if max(width, height) / min(width, height) > MAX_INPUT_ASPECT:
        raise InvalidRequest(
            f"The image is {width}x{height} pixels; image-to-video accepts aspect ratios up to "
            f"{MAX_INPUT_ASPECT:g}:1"
        )
    long_side, short_side = VIDEO_RESOLUTIONS[normalize_resolution(resolution)]
    box_w, box_h = (long_side, short_side) if width >= height else (short_side, long_side)
    scale = min(box_w / width, box_h / height)
    m = spec.limits.multiple_of
    out_w, out_h = _round_to(width * scale, m), _round_to(height * scale, m)
    limits = spec.limits
    if out_w > limits.max_width or out_h > limits.max_height:
        raise InvalidRequest(
            f"The resolution {resolution} ({out_w}x{out_h}) exceeds the maximum allowed for the "
            f"{spec.id} model ({limits.max_width}x{limits.max_height})"
        )
    return out_w, out_h
