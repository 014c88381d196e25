"""The playground (issue 20): a browser page per capability, served by the edge at ``/``.

Plain HTML, one vanilla JS module per concern and CSS from ``edge/playground/`` (no build
step, no CDN: every asset is in the repository, so it works offline). The pages sign in
with the session cookie (``POST /v1/session``) and never see an API key.

Only the files of that one flat folder with a known type are served, each with a strict
Content-Security-Policy: scripts, styles and connections from this origin only; images and
media also from ``data:`` and ``blob:`` (results are shown from the answer's bytes).
"""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

from services.common.errors import NotFound

#: The folder whose files are served (flat: no sub-folders).
ASSETS = Path(__file__).resolve().parent.parent / "playground"

#: The types served, by suffix; any other file is a 404.
CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}

#: A served name: one path segment of lower-case letters, digits, ``-`` and ``_`` with a
#: known suffix, so that no ``..``, slash, backslash or hidden file can ever be asked for.
_NAME = re.compile(r"[a-z0-9_-]{1,64}\.(html|js|css|svg)")

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self' data: blob:",
        "media-src 'self' data: blob:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)

_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # The assets change with the server: revalidate, never serve a stale page.
    "Cache-Control": "no-cache",
}


def _asset(name: str) -> web.Response:
    path = ASSETS / name
    if not _NAME.fullmatch(name) or not path.is_file():
        raise NotFound(f"No playground file '{name[:80]}'.")
    return web.Response(
        body=path.read_bytes(),  # a few kB, read once per request: not worth a thread
        content_type=CONTENT_TYPES[path.suffix],
        charset="utf-8",
        headers=_HEADERS,
    )


async def index(request: web.Request) -> web.Response:
    """``GET /``: the playground's page (the layout; pages are chosen by the URL's fragment)."""
    return _asset("index.html")


async def asset(request: web.Request) -> web.Response:
    """``GET /playground/{name}``: one of the playground's scripts, style sheets or icons."""
    return _asset(request.match_info["name"])
