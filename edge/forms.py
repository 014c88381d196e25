"""Reading multipart uploads: one file field plus text fields, with clear 400s."""

from __future__ import annotations

from aiohttp import web

from services.common.errors import InvalidRequest

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


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
