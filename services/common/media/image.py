"""Images: encoding with fixed settings and optional metadata, and the one decoder of untrusted image bytes.

``encode_image`` writes PNG, JPEG or WebP with fixed encoder settings and no
timestamps, so identical pixels (and metadata) always give identical bytes.
Without ``metadata`` a file carries none at all; with it, PNG gets one text
chunk per field plus ``Software=Kiln``, and JPEG / WebP get EXIF:
``ImageDescription`` (the prompt), ``Software`` (Kiln), ``Model`` (the model
field) and ``UserComment`` holding every field as ASCII JSON (the lossless
copy: EXIF ASCII tags cannot hold non-ASCII prompts). :func:`read_image_metadata`
reads either form back into the same dictionary.

``decode_image`` is the one place where untrusted image bytes are opened: it
accepts only real images of the allowed formats and refuses oversized files,
decompression bombs (more than ``max_pixels`` pixels, judged from the header
before any pixel is decoded) and corrupt data with :class:`InvalidRequest`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from services.common.errors import InvalidRequest

#: Output formats and their MIME types.
IMAGE_MIME_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
#: Formats :func:`decode_image` accepts by default (Pillow format names).
DECODABLE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
#: Lossy encoders' quality.
LOSSY_QUALITY = 90
#: The ``Software`` field written with metadata.
SOFTWARE = "Kiln"
#: EXIF tags used for metadata (TIFF / EXIF numbers).
EXIF_IMAGE_DESCRIPTION = 0x010E
EXIF_MAKE = 0x010F
EXIF_MODEL = 0x0110
EXIF_SOFTWARE = 0x0131
EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286
#: The character-code prefix of an ASCII EXIF UserComment.
_ASCII_COMMENT = b"ASCII\x00\x00\x00"


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


def encode_image(image: Image.Image, fmt: str = "png", metadata: Mapping[str, str] | None = None) -> bytes:
    """Encodes an image; the same pixels, format and metadata always give the same bytes.

    ``metadata`` (e.g. prompt, negative_prompt, model, seed, steps) goes into
    PNG text chunks or JPEG / WebP EXIF, with ``Software=Kiln``; ``None``
    writes no metadata at all.
    """
    key = normalize_image_format(fmt)
    buf = io.BytesIO()
    if key == "png":
        if image.mode not in ("1", "L", "LA", "I", "P", "RGB", "RGBA"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        extra: dict[str, object] = {}
        if metadata is not None:
            info = PngImagePlugin.PngInfo()
            for name, value in metadata.items():
                info.add_text(name, str(value))  # tEXt, or iTXt when not Latin-1
            info.add_text("Software", SOFTWARE)
            extra["pnginfo"] = info
        image.save(buf, format="PNG", compress_level=6, optimize=False, **extra)
        return buf.getvalue()
    exif = _exif(metadata).tobytes() if metadata is not None else b""
    if key == "jpeg":
        if image.mode not in ("L", "RGB", "CMYK"):
            image = image.convert("RGB")
        image.save(buf, format="JPEG", quality=LOSSY_QUALITY, optimize=False, progressive=False, exif=exif)
    else:
        if image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        image.save(buf, format="WEBP", quality=LOSSY_QUALITY, method=4, exact=False, exif=exif)
    return buf.getvalue()


def _exif(metadata: Mapping[str, str]) -> Image.Exif:
    fields = {name: str(value) for name, value in metadata.items()}
    exif = Image.Exif()
    if "prompt" in fields:
        exif[EXIF_IMAGE_DESCRIPTION] = fields["prompt"]  # ASCII only: readers show it; JSON is exact
    exif[EXIF_MAKE] = SOFTWARE
    if "model" in fields:
        exif[EXIF_MODEL] = fields["model"]
    exif[EXIF_SOFTWARE] = SOFTWARE
    comment = json.dumps(fields, ensure_ascii=True, sort_keys=True, separators=(",", ":"))
    exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = _ASCII_COMMENT + comment.encode("ascii")
    return exif


def read_image_metadata(data: bytes) -> dict[str, str]:
    """The metadata :func:`encode_image` wrote into a file (``{}`` when it has none).

    PNG: every text chunk. JPEG / WebP: the fields of the EXIF UserComment
    JSON, plus ``Software`` when present. Raises :class:`InvalidRequest` for
    data that is not a PNG, JPEG or WebP image.
    """
    try:
        with Image.open(io.BytesIO(data), formats=list(DECODABLE_FORMATS)) as image:
            if image.format == "PNG":
                image.load()  # text chunks after the image data are read on load
                text = getattr(image, "text", {}) or {}
                return {str(k): str(v) for k, v in text.items()}
            exif = image.getexif()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidRequest("The file is not a readable image.") from exc
    fields: dict[str, str] = {}
    comment = exif.get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(_ASCII_COMMENT):
        try:
            parsed = json.loads(comment[len(_ASCII_COMMENT) :].decode("ascii"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            parsed = None
        if isinstance(parsed, dict):
            fields.update({str(k): str(v) for k, v in parsed.items()})
    software = exif.get(EXIF_SOFTWARE)
    if software:
        fields["Software"] = str(software).rstrip("\x00")
    return fields


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
        with Image.open(io.BytesIO(data), formats=list(formats)) as image:
            width, height = image.size
            fmt = str(image.format)
    except Image.DecompressionBombError as exc:
        raise InvalidRequest(_bomb_message(exc)) from exc
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
    data: bytes,
    *,
    max_pixels: int,
    max_bytes: int | None = None,
    formats: tuple[str, ...] = DECODABLE_FORMATS,
) -> Image.Image:
    """Opens untrusted image bytes: a fully decoded, EXIF-upright image, or InvalidRequest.

    Refuses empty input, files over ``max_bytes``, anything that is not an
    image of ``formats``, images with more than ``max_pixels`` pixels (checked
    from the header, before decoding: a decompression bomb never allocates its
    pixels) and truncated or corrupt files. Safe to call from worker threads.
    """
    if not data:
        raise InvalidRequest("The image is empty.")
    if max_bytes is not None and len(data) > max_bytes:
        raise InvalidRequest(f"The image file is {len(data)} bytes; the maximum is {max_bytes} bytes.")
    try:
        # No warnings filter here: ``warnings.catch_warnings`` is process-global and
        # not thread-safe. Pillow raises DecompressionBombError by itself past twice
        # its own limit; below that, the header check right after opening refuses
        # anything over ``max_pixels`` before a pixel is decoded.
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
    except Image.DecompressionBombError as exc:
        raise InvalidRequest(_bomb_message(exc)) from exc
    except UnidentifiedImageError as exc:
        allowed = ", ".join(f.lower() for f in formats)
        raise InvalidRequest(f"The file is not a supported image (accepted: {allowed}).") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidRequest("The image could not be decoded; it may be truncated or corrupt.") from exc
    return ImageOps.exif_transpose(image) or image


def _bomb_message(exc: Exception) -> str:
    return f"The image is too large to decode (a decompression bomb): {exc}"
