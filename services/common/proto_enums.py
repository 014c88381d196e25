"""Proto enums and Kiln's names for them: one map each, for the servicers and the edge."""

from __future__ import annotations

from kiln.common.v1 import media_pb2
from services.common.errors import InvalidRequest

#: ``kiln.common.v1.ImageFormat`` -> the registry's output format name (unspecified is PNG).
IMAGE_FORMAT_NAMES: dict[media_pb2.ImageFormat, str] = {
    media_pb2.IMAGE_FORMAT_UNSPECIFIED: "png",
    media_pb2.IMAGE_FORMAT_PNG: "png",
    media_pb2.IMAGE_FORMAT_JPEG: "jpeg",
    media_pb2.IMAGE_FORMAT_WEBP: "webp",
}
#: Output format name -> ``kiln.common.v1.ImageFormat``.
IMAGE_FORMATS: dict[str, media_pb2.ImageFormat] = {
    name: value for value, name in IMAGE_FORMAT_NAMES.items() if value != media_pb2.IMAGE_FORMAT_UNSPECIFIED
}


def image_format_name(value: int) -> str:
    """The output format name of an ``ImageFormat`` value, or a 400 for an unknown one."""
    name = IMAGE_FORMAT_NAMES.get(media_pb2.ImageFormat.ValueType(value))
    if name is None:
        raise InvalidRequest(f"Unknown output_format {value}; use PNG, JPEG or WEBP")
    return name
