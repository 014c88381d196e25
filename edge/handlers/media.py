"""``GET /v1/media/{id}``: public, cacheable, conditional."""

from __future__ import annotations

from aiohttp import web

from edge.keys import MEDIA
from services.common.errors import NotFound, quoted

#: Media never changes once stored; the contract asks for a 60 minute cache.
CACHE_CONTROL = "public, max-age=3600, immutable"


async def get_media(request: web.Request) -> web.StreamResponse:
    media_id = request.match_info["media_id"]
    stored = request.app[MEDIA].get(media_id)
    if stored is None:
        raise NotFound(f"Media file '{quoted(media_id)}' was not found.")
    # FileResponse answers If-None-Match / If-Modified-Since with 304 and serves ranges.
    return web.FileResponse(
        stored.path,
        headers={
            "Content-Type": stored.mime_type,
            "Cache-Control": CACHE_CONTROL,
            "Vary": "User-Agent",
            "Access-Control-Allow-Origin": "*",
        },
    )
