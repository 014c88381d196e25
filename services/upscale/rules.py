"""The rules of an upscale request: a known method, a scale it supports, an output within its limits.

Torch-free, so the edge checks a request with the same code as the upscale
service before it reserves credits (from the image's header size; the service
checks again with the decoded, EXIF-upright size). Each broken rule is an
:class:`~services.common.errors.InvalidRequest` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import InvalidRequest
from services.common.registry import FACE_RESTORATION, UPSCALE, ModelSpec, Registry


@dataclass(frozen=True)
class UpscaleParams:
    """An upscale request with its method's rules checked."""

    model: ModelSpec
    scale: int
    output_width: int
    output_height: int


def upscale_params(
    registry: Registry, *, method: str, scale: int | None, width: int, height: int, face_enhance: bool = False
) -> UpscaleParams:
    """Checks an upscale: a known method, a scale it supports (``options.scale`` is its own,
    ``min_scale``..``max_scale`` the range it accepts) and an output within its limits."""
    if not method:
        raise InvalidRequest("Missing required parameter: 'method'")
    spec = registry.get(method)
    if spec is None or not spec.serves(UPSCALE):
        methods = ", ".join(m.id for m in registry.for_capability(UPSCALE))
        raise InvalidRequest(f"Invalid upscaling method '{method}'. Supported methods: {methods}")
    own = int(spec.options.get("scale", 2))
    low, high = int(spec.options.get("min_scale", own)), int(spec.options.get("max_scale", own))
    chosen = own if scale is None else scale
    if not low <= chosen <= high:
        allowed = f"{own} only" if low == high else f"{low} to {high}"
        raise InvalidRequest(f"The method '{spec.id}' upscales by {allowed}; 'scale' {scale} does not fit it")
    if face_enhance and not registry.for_capability(FACE_RESTORATION):
        raise InvalidRequest(
            "'face_enhance' needs a face restoration model (such as GFPGAN or CodeFormer), and none is "
            "installed on this server; send face_enhance=false"
        )
    out_w, out_h = width * chosen, height * chosen
    limits = spec.limits
    if out_w > limits.max_width or out_h > limits.max_height:
        raise InvalidRequest(
            f"The output {out_w}x{out_h} ({width}x{height} x{chosen}) exceeds the maximum allowed for "
            f"the {spec.id} method ({limits.max_width}x{limits.max_height})"
        )
    return UpscaleParams(spec, chosen, out_w, out_h)
