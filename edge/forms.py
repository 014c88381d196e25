"""Reading multipart uploads: one file field plus text fields, with clear 400s.

Every multipart reader notes each part in :func:`body_digest` as it reads it
(name, file name, content; not the boundary, which a client picks anew on a
retry): that digest is the body's part of an ``Idempotency-Key`` fingerprint.
"""

from __future__ import annotations

from aiohttp import web

from edge.keys import BODY_DIGEST, BodyDigest
from services.common.errors import InvalidRequest

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def body_digest(request: web.Request) -> BodyDigest:
    """The running SHA-256 of the request's multipart parts (made on first use)."""
    digest = request.get(BODY_DIGEST)
    if digest is None:
        digest = request[BODY_DIGEST] = BodyDigest()
    return digest


def note_part(request: web.Request, name: str, filename: str | None, data: bytes) -> None:
    """Adds one whole part to :func:`body_digest` (length-prefixed, so parts cannot run together)."""
    digest = body_digest(request)
    for value in (name.encode(), (filename or "").encode(), data):
        digest.update(len(value).to_bytes(8, "big") + value)


def note_form(request: web.Request, form: object) -> None:
    """Notes every part of a form read with ``request.post()``, in order."""
    for name, value in form.items():  # type: ignore[attr-defined]
        if isinstance(value, web.FileField):
            data = value.file.read()
            value.file.seek(0)
            note_part(request, name, value.filename, data)
        else:
            note_part(request, name, None, str(value).encode())


async def read_upload_form(request: web.Request, *, field: str, what: str) -> tuple[bytes, dict[str, str]]:
    """The ``field`` upload (``what`` it holds, for messages) and the text fields of a form.

    A file in another field, a text value in ``field``, a repeated field or a
    missing or empty upload is an :class:`InvalidRequest`. The body size limit
    is the app's (``client_max_size``).
    """
    if request.content_type not in FORM_TYPES:
        raise InvalidRequest(f"Send {what} as multipart/form-data with a '{field}' field.")
    try:
        form = await request.post()
    except ValueError as exc:
        raise InvalidRequest(f"The multipart body could not be read: {exc}") from None
    note_form(request, form)
    data = b""
    fields: dict[str, str] = {}
    for name, value in form.items():
        if isinstance(value, web.FileField):
            if name != field:
                raise InvalidRequest(f"'{name}' must be a text field")
            data = value.file.read()
        elif name == field:
            raise InvalidRequest(f"'{field}' must be a file upload")
        elif name in fields:
            raise InvalidRequest(f"The field '{name}' is given more than once")
        else:
            fields[name] = str(value)
    if not data:
        raise InvalidRequest(f"Missing required parameter: '{field}' ({what} upload)")
    return data, fields
