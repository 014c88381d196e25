"""``GET /v1/media/{id}``: public, cacheable, conditional, with byte ranges.

A file on the edge's disk is served by ``FileResponse``; a file in a bucket (``edge.media_s3``)
is streamed from it (a ``Range`` becomes the GetObject's range: 206 with ``Content-Range``),
or the answer is a 307 to a presigned URL when the store gives one (``KILN_MEDIA_S3_REDIRECT``).
"""

from __future__ import annotations

from email.utils import formatdate

from aiohttp import web

from edge.keys import MEDIA
from edge.media_store import MediaStore, StoredMedia
from services.common.errors import NotFound, quoted

#: Media never changes once stored; the contract asks for a 60 minute cache.
CACHE_CONTROL = "public, max-age=3600, immutable"


async def get_media(request: web.Request) -> web.StreamResponse:
    media_id = request.match_info["media_id"]
    store = request.app[MEDIA]
    stored = await store.get_async(media_id)
    if stored is None:
        raise NotFound(f"Media file '{quoted(media_id)}' was not found.")
    headers = {
        "Content-Type": stored.mime_type,
        "Cache-Control": CACHE_CONTROL,
        "Vary": "User-Agent",
        "Access-Control-Allow-Origin": "*",
    }
    if stored.path is not None:
        # FileResponse answers If-None-Match / If-Modified-Since with 304 and serves ranges.
        return web.FileResponse(stored.path, headers=headers)
    url = await store.download_url(stored)
    if url is not None:
        # The presigned URL expires: the redirect itself is never cached.
        return web.Response(
            status=307,
            headers={"Location": url, "Cache-Control": "no-store", "Access-Control-Allow-Origin": "*"},
        )
    return await _stream(request, store, stored, headers)


async def _stream(
    request: web.Request, store: MediaStore, stored: StoredMedia, headers: dict[str, str]
) -> web.StreamResponse:
    """Streams a file from its store: 304 for a matching validator, 206 for a range."""
    headers["Accept-Ranges"] = "bytes"
    headers["Last-Modified"] = formatdate(stored.modified, usegmt=True)
    if stored.etag:
        headers["ETag"] = stored.etag
    if _not_modified(request, stored):
        return web.Response(status=304, headers=headers)
    size = stored.size
    start, end = 0, size
    status = 200
    if "Range" in request.headers and _if_range_holds(request, stored):
        try:
            start, end = _bounds(request.http_range, size)
        except ValueError:  # malformed, or several ranges (refused, as FileResponse does)
            start, end = size, size
        if start >= end:
            headers["Content-Range"] = f"bytes */{size}"
            del headers["Content-Type"]
            return web.Response(status=416, headers=headers)
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    # Opened before the headers go out: a file deleted meanwhile is still a 404.
    try:
        chunks = await store.open_async(stored, start, end)
    except FileNotFoundError:
        raise NotFound(f"Media file '{quoted(stored.media_id)}' was not found.") from None
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = end - start
    await response.prepare(request)
    if request.method != "HEAD":
        async for chunk in chunks:
            await response.write(chunk)
    await response.write_eof()
    return response


def _bounds(wanted: slice, size: int) -> tuple[int, int]:
    """[start, end) of ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` within a file of ``size``
    bytes; start >= end when it cannot be satisfied."""
    if wanted.start is not None and wanted.start < 0:  # a suffix: the last n bytes
        return max(size + wanted.start, 0), size
    start = wanted.start or 0
    end = size if wanted.stop is None else min(wanted.stop, size)
    return (start, end) if start < size else (size, size)


def _not_modified(request: web.Request, stored: StoredMedia) -> bool:
    """RFC 9110 13.2.2: If-None-Match when present, else If-Modified-Since."""
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None:
        if if_none_match.strip() == "*":
            return True
        tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        return bool(stored.etag) and stored.etag.removeprefix("W/") in tags
    since = request.if_modified_since
    return since is not None and int(stored.modified) <= since.timestamp()


def _if_range_holds(request: web.Request, stored: StoredMedia) -> bool:
    """A Range applies unless an If-Range names another version of the file."""
    if_range = request.headers.get("If-Range")
    if if_range is None:
        return True
    if if_range.startswith(('"', "W/")):
        return bool(stored.etag) and if_range == stored.etag  # a strong comparison
    since = request.if_range
    return since is not None and int(stored.modified) <= since.timestamp()
