"""Encoding and decoding of media files, shared by every capability.

``encode_image`` writes PNG, JPEG or WebP with fixed encoder settings and no
metadata (no timestamps, no text chunks, no EXIF), so identical pixels always
give identical bytes. ``decode_image`` is the one place where untrusted image
bytes are opened: it accepts only real images of the allowed formats and
refuses decompression bombs (more than ``max_pixels`` pixels, judged from the
header before any pixel is decoded) with :class:`InvalidRequest`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from services.common.errors import InvalidRequest

#: Output formats and their MIME types.
IMAGE_MIME_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
#: Formats :func:`decode_image` accepts by default (Pillow format names).
DECODABLE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
#: Lossy encoders' quality.
LOSSY_QUALITY = 90


def normalize_image_format(fmt: str) -> str:
    """``"PNG"`` / ``"jpg"`` / ``"image/webp"`` -> ``"png"`` / ``"jpeg"`` / ``"webp"``."""
    key = fmt.strip().lower().removeprefix("image/")
    key = "jpeg" if key == "jpg" else key
    if key not in IMAGE_MIME_TYPES:
        raise InvalidRequest(f"Unsupported image format '{fmt}'. Supported formats: png, jpeg, webp")
    return key


def image_mime_type(fmt: str = "png") -> str:
    """The MIME type of an output format (``"png"`` -> ``"image/png"``)."""
    return IMAGE_MIME_TYPES[normalize_image_format(fmt)]


def encode_image(image: Image.Image, fmt: str = "png") -> bytes:
    """Encodes an image; the same pixels and format always give the same bytes."""
    key = normalize_image_format(fmt)
    buf = io.BytesIO()
    if key == "png":
        if image.mode not in ("1", "L", "LA", "I", "P", "RGB", "RGBA"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        image.save(buf, format="PNG", compress_level=6, optimize=False)
    elif key == "jpeg":
        if image.mode not in ("L", "RGB", "CMYK"):
            image = image.convert("RGB")
        image.save(buf, format="JPEG", quality=LOSSY_QUALITY, optimize=False, progressive=False)
    else:
        if image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        image.save(buf, format="WEBP", quality=LOSSY_QUALITY, method=4, exact=False)
    return buf.getvalue()


@dataclass(frozen=True)
class ImageInfo:
    """What an image file's header says."""

    format: str
    width: int
    height: int


def probe_image(
    data: bytes,
    *,
    max_pixels: int,
    max_bytes: int | None = None,
    formats: tuple[str, ...] = DECODABLE_FORMATS,
) -> ImageInfo:
    """Reads only an untrusted image's header: its format and size, or InvalidRequest.

    Cheap enough for the edge to check every input before anything is reserved;
    :func:`decode_image` decodes fully (and checks again).
    """
    if not data:
        raise InvalidRequest("The image is empty.")
    if max_bytes is not None and len(data) > max_bytes:
        raise InvalidRequest(f"The image file is {len(data)} bytes; the maximum is {max_bytes} bytes.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=list(formats)) as image:
                width, height = image.size
                fmt = str(image.format)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequest("The image is too large to decode.") from exc
    except UnidentifiedImageError as exc:
        allowed = ", ".join(f.lower() for f in formats)
        raise InvalidRequest(f"The file is not a supported image (accepted: {allowed}).") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidRequest("The image could not be read; it may be truncated or corrupt.") from exc
    if width <= 0 or height <= 0:
        raise InvalidRequest("The image has no pixels.")
    if width * height > max_pixels:
        raise InvalidRequest(
            f"The image is too large: {width}x{height} pixels, the maximum is {max_pixels} pixels."
        )
    return ImageInfo(fmt.lower(), width, height)


def decode_image(
    data: bytes, *, max_pixels: int, formats: tuple[str, ...] = DECODABLE_FORMATS
) -> Image.Image:
    """Opens untrusted image bytes: a fully decoded, EXIF-upright image, or InvalidRequest.

    Refuses empty input, anything that is not an image of ``formats``, images
    with more than ``max_pixels`` pixels (checked from the header, before
    decoding) and truncated or corrupt files.
    """
    if not data:
        raise InvalidRequest("The image is empty.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(formats))
            width, height = image.size
            if width <= 0 or height <= 0:
                raise InvalidRequest("The image has no pixels.")
            if width * height > max_pixels:
                raise InvalidRequest(
                    f"The image is too large: {width}x{height} pixels, the maximum is {max_pixels} pixels."
                )
            image.load()
    except InvalidRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequest("The image is too large to decode.") from exc
    except UnidentifiedImageError as exc:
        allowed = ", ".join(f.lower() for f in formats)
        raise InvalidRequest(f"The file is not a supported image (accepted: {allowed}).") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidRequest("The image could not be decoded; it may be truncated or corrupt.") from exc
    return ImageOps.exif_transpose(image) or image
