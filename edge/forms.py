"""Reading request bodies: JSON bodies and forms, bounded for the whole request.

Every body is read against a clock (:class:`BodyClock`): it gets
``http_body_timeout_seconds`` plus one second per ``http_body_min_rate``
bytes that arrived; a slower body is a 408 (:class:`BodyRefused`), and the
connection is closed (``edge.middlewares``). A declared ``Content-Length``
over the limit is a 413 before anything is read.

Forms (``multipart/form-data``, or ``application/x-www-form-urlencoded`` for
text fields only) are read part by part by :class:`FormReader`, which counts
for the whole request (aiohttp's own form reader bounded each field on its
own before 3.14): at most ``max_form_parts`` parts and the body limit in total
(413), text fields at most ``max_form_field_bytes`` (400). Parts with a
``Content-Encoding`` or a ``Content-Transfer-Encoding`` (which would be
decoded, or decompressed, past those counts) are refused.

Every form reader notes each part in :func:`body_digest` as it reads it
(name, file name, content; not the boundary, which a client picks anew on a
retry): that digest is the body's part of an ``Idempotency-Key`` fingerprint.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import BadHttpMessage

from edge.keys import BODY_DIGEST, SETTINGS, BodyDigest
from services.common.errors import InvalidRequest, quoted

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
#: A part's transfer encodings that leave its bytes as they are.
_PLAIN_ENCODINGS = frozenset({"", "identity", "binary", "7bit", "8bit"})
#: Bytes read from the client at a time.
READ_CHUNK_BYTES = 256 * 1024


class BodyRefused(Exception):
    """A body refused before it was all read (413 too large, 408 too slow, ...): answered with
    ``status`` in the error envelope, and the connection is closed without reading the rest."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def too_large(limit: int, what: str = "The request body") -> BodyRefused:
    return BodyRefused(413, f"{what} is larger than the limit of {limit} bytes.")


class BodyClock:
    """How long a request's body may take: ``http_body_timeout_seconds`` plus one second per
    ``http_body_min_rate`` bytes received. Only time spent waiting for the client counts
    (not, say, time spent handing an upload on to a service)."""

    def __init__(self, request: web.Request) -> None:
        settings = request.app[SETTINGS]
        self._content = request.content
        self._timeout = settings.http_body_timeout_seconds
        self._rate = settings.http_body_min_rate
        self._spent = 0.0

    def _allowed(self) -> float:
        return self._timeout + self._content.total_bytes / self._rate

    @contextlib.asynccontextmanager
    async def waiting(self) -> AsyncIterator[None]:
        """Wraps a wait for the client's bytes; :class:`BodyRefused` (408) when the body is late."""
        loop = asyncio.get_running_loop()
        began = loop.time()

        def deadline() -> float:
            return began + self._allowed() - self._spent

        handle: asyncio.TimerHandle | None = None
        try:
            async with asyncio.timeout(None) as timeout:

                def check() -> None:  # the deadline moves on as bytes arrive
                    nonlocal handle
                    when = deadline()
                    if loop.time() >= when:
                        timeout.reschedule(loop.time())
                    else:
                        handle = loop.call_at(when, check)

                handle = loop.call_at(deadline(), check)
                yield
        except TimeoutError:
            raise BodyRefused(
                408, f"The request body did not arrive in time (at least {self._rate} bytes per second)."
            ) from None
        finally:
            if handle is not None:
                handle.cancel()
            self._spent += loop.time() - began


_CLOCK = web.RequestKey("body_clock", BodyClock)


def body_clock(request: web.Request) -> BodyClock:
    """The request's :class:`BodyClock` (made on first use)."""
    clock = request.get(_CLOCK)
    if clock is None:
        clock = request[_CLOCK] = BodyClock(request)
    return clock


def check_declared_length(request: web.Request, limit: int) -> None:
    """A 413 before anything is read when the declared ``Content-Length`` is over ``limit``."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)


async def read_body(request: web.Request) -> bytes:
    """The whole body (at most the app's ``client_max_size``: 413), read against the clock."""
    check_declared_length(request, request.client_max_size)
    async with body_clock(request).waiting():
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large(request.client_max_size) from None


def body_digest(request: web.Request) -> BodyDigest:
    """The running SHA-256 of the request's form parts (made on first use)."""
    digest = request.get(BODY_DIGEST)
    if digest is None:
        digest = request[BODY_DIGEST] = BodyDigest()
    return digest


def note_part(request: web.Request, name: str, filename: str | None, data: bytes) -> None:
    """Adds one whole part to :func:`body_digest` (length-prefixed, so parts cannot run together)."""
    digest = body_digest(request)
    for value in (name.encode(), (filename or "").encode(), data):
        digest.update(len(value).to_bytes(8, "big") + value)


class FormReader:
    """A form's parts, in order, bounded for the whole request (see the module docstring).

    ``max_bytes`` is the whole body's limit (the app's ``client_max_size`` by default; the
    video route allows its upload limit). Parts are counted as they start, bytes as they
    arrive, so neither many small parts nor one endless part get past the limits.
    """

    def __init__(self, request: web.Request, *, max_bytes: int | None = None) -> None:
        settings = request.app[SETTINGS]
        self.request = request
        self.max_bytes = request.client_max_size if max_bytes is None else max_bytes
        self.max_parts = settings.max_form_parts
        self.max_field_bytes = settings.max_form_field_bytes
        self.clock = body_clock(request)
        self._parts = 0

    def _count_bytes(self) -> None:
        if self.request.content.total_bytes > self.max_bytes:
            raise too_large(self.max_bytes)

    def _count_part(self) -> None:
        self._parts += 1
        if self._parts > self.max_parts:
            raise BodyRefused(413, f"The form has more than {self.max_parts} parts.")

    async def parts(self) -> AsyncGenerator[BodyPartReader]:
        """The form's parts (multipart only); each needs a name and no encoding of its own."""
        request = self.request
        if request.content_type != "multipart/form-data":
            raise InvalidRequest("Send the form as multipart/form-data.")
        check_declared_length(request, self.max_bytes)
        try:
            reader = await request.multipart()
            while True:
                async with self.clock.waiting():
                    part = await reader.next()
                self._count_bytes()
                if part is None:
                    return
                self._count_part()
                if not isinstance(part, BodyPartReader):
                    raise InvalidRequest("Nested multipart parts are not supported.")
                if not part.name:
                    raise InvalidRequest("Every part of the form needs a name.")
                for header in ("Content-Encoding", "Content-Transfer-Encoding"):
                    if part.headers.get(header, "").strip().lower() not in _PLAIN_ENCODINGS:
                        raise InvalidRequest(
                            f"The form part '{quoted(part.name)}' has an unsupported {header}."
                        )
                yield part
        except (ValueError, AssertionError, BadHttpMessage) as exc:  # aiohttp's words for a malformed body
            raise InvalidRequest(f"The multipart body could not be read: {quoted(str(exc))}") from None

    async def chunks(self, part: BodyPartReader) -> AsyncGenerator[bytes]:
        """The part's bytes as they arrive (counted against the whole body's limit)."""
        while True:
            async with self.clock.waiting():
                chunk = await part.read_chunk(READ_CHUNK_BYTES)
            self._count_bytes()
            if not chunk:
                return
            yield chunk

    async def file(self, part: BodyPartReader) -> bytes:
        """A file part's bytes (noted in the body digest)."""
        data = bytearray()
        async for chunk in self.chunks(part):
            data += chunk
        note_part(self.request, part.name or "", part.filename, bytes(data))
        return bytes(data)

    async def text(self, part: BodyPartReader) -> str:
        """A text part, at most ``max_form_field_bytes`` (noted in the body digest)."""
        name = part.name or ""
        data = bytearray()
        async for chunk in self.chunks(part):
            data += chunk
            if len(data) > self.max_field_bytes:
                raise InvalidRequest(
                    f"The form field '{quoted(name)}' is longer than {self.max_field_bytes} bytes."
                )
        note_part(self.request, name, None, bytes(data))
        try:
            return bytes(data).decode(part.get_charset(default="utf-8"))
        except (LookupError, UnicodeDecodeError):
            raise InvalidRequest(f"The form field '{quoted(name)}' is not valid text.") from None


@dataclass
class Form:
    """A form's files (name, bytes; in order) and text fields."""

    files: list[tuple[str, bytes]] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)


async def read_form(request: web.Request, *, files: Collection[str]) -> Form:
    """A whole form whose file fields are ``files``: a file in another field, a text value in
    one of ``files`` or a repeated text field is an :class:`InvalidRequest`."""
    form = Form()

    def add_text(name: str, value: str) -> None:
        if name in files:
            raise InvalidRequest(f"'{quoted(name)}' must be a file upload")
        if name in form.fields:
            raise InvalidRequest(f"The field '{quoted(name)}' is given more than once")
        form.fields[name] = value

    if request.content_type == "application/x-www-form-urlencoded":
        await _read_urlencoded(request, add_text)
        return form
    reader = FormReader(request)
    async with contextlib.aclosing(reader.parts()) as parts:
        async for part in parts:
            name = part.name or ""
            if part.filename:  # aiohttp's rule: a part with a file name is a file
                if name not in files:
                    raise InvalidRequest(f"'{quoted(name)}' must be a text field")
                form.files.append((name, await reader.file(part)))
            else:
                add_text(name, await reader.text(part))
    return form


async def _read_urlencoded(request: web.Request, add: Callable[[str, str], None]) -> None:
    settings = request.app[SETTINGS]
    raw = await read_body(request)
    try:
        pairs = parse_qsl(
            raw.decode(request.charset or "utf-8"),
            keep_blank_values=True,
            max_num_fields=settings.max_form_parts,
        )
    except UnicodeDecodeError:
        raise InvalidRequest("The form is not valid text.") from None
    except ValueError:
        raise BodyRefused(413, f"The form has more than {settings.max_form_parts} parts.") from None
    for name, value in pairs:
        if len(value.encode()) > settings.max_form_field_bytes:
            raise InvalidRequest(
                f"The form field '{quoted(name)}' is longer than {settings.max_form_field_bytes} bytes."
            )
        note_part(request, name, None, value.encode())
        add(name, value)


async def read_upload_form(request: web.Request, *, field: str, what: str) -> tuple[bytes, dict[str, str]]:
    """The ``field`` upload (``what`` it holds, for messages) and the text fields of a form.

    A file in another field, a text value in ``field``, a repeated field or a
    missing or empty upload is an :class:`InvalidRequest`.
    """
    if request.content_type not in FORM_TYPES:
        raise InvalidRequest(f"Send {what} as multipart/form-data with a '{field}' field.")
    form = await read_form(request, files=(field,))
    if len(form.files) > 1:
        raise InvalidRequest(f"The field '{field}' is given more than once")
    data = form.files[0][1] if form.files else b""
    if not data:
        raise InvalidRequest(f"Missing required parameter: '{field}' ({what} upload)")
    return data, form.fields
