"""Media retention through the real mesh (SQLite and PostgreSQL): the files of a request that
was not paid for are deleted, paid files expire after the TTL while library videos stay, and
files without a record, stored answers and partial writes go after their grace periods.

Each test runs an edge of its own (its own media root) in front of the mesh's billing and
services; the sweep is run by hand with a moved clock (``run_once(now=...)``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edge.flow import HOLD_MARGIN_SECONDS
from edge.keys import MEDIA
from edge.media_store import LocalMediaStore
from edge.retention import ANSWER_TTL_SECONDS, STALE_TEMP_SECONDS, SWEEPER, MediaSweeper, orphan_grace_seconds
from services.common.errors import InvalidRequest
from tests.conftest import Mesh, new_customer
from tests.edge.test_video_api import form
from tests.stack import Edge, billing_service, edge_app, eventually, settled_books

GEN = "/v1/images/generations"
IMG2VIDEO = "/v1/images/img2video"
LIBRARY = "/v1/images/user-videos"
DAY = 24 * 3600


@contextlib.asynccontextmanager
async def own_edge(mesh: Mesh, media_root: Path, **settings: Any) -> AsyncIterator[Edge]:
    async with edge_app(mesh.settings.model_copy(update={"media_root": media_root, **settings})) as edge:
        yield edge


def sweeper(edge: Edge) -> MediaSweeper:
    return edge.runner.app[SWEEPER]


def store(edge: Edge) -> LocalMediaStore:
    media = edge.runner.app[MEDIA]
    assert isinstance(media, LocalMediaStore)
    return media


def stored_names(root: Path) -> list[str]:
    """Every file under the media root (temporary ones included)."""
    return sorted(path.name for path in root.rglob("*") if path.is_file())


async def media_status(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as response:
        return response.status


async def record_kinds(mesh: Mesh, account_id: str) -> dict[str, str]:
    rows = await mesh.ledger.db.run(
        lambda tx: tx.all("SELECT media_id, kind FROM media_records WHERE account_id = ?", (account_id,)),
        write=False,
    )
    return {str(row[0]): str(row[1]) for row in rows}


async def test_a_request_whose_charge_fails_leaves_no_file(
    mesh: Mesh, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The image is made and stored, then billing refuses the commit: a 500, nothing charged,
    and the stored file is deleted with the release (no file without a record is left)."""
    customer = await new_customer(mesh, "10")
    async with billing_service(mesh.settings) as billing:
        ledger = billing.ledger
        assert ledger is not None

        async def refuse(*args: Any, **kwargs: Any) -> Any:
            raise InvalidRequest("refused by the test")

        ledger.commit = refuse  # type: ignore[method-assign]
        media = tmp_path / "media"
        async with own_edge(
            mesh, media, addresses={**mesh.settings.addresses, "billing": f"127.0.0.1:{billing.port}"}
        ) as edge:
            body = {"prompt": "a kiln", "size": "256x256"}
            async with http.post(edge.url + GEN, json=body, headers=customer.headers) as response:
                assert response.status == 500, await response.text()
                assert (await response.json())["error"]["type"] == "processing_error"
            assert stored_names(media) == []
    state = await settled_books(mesh.ledger, customer.account_id)
    assert (state.balance, state.held, state.open_holds) == (1000, 0, 0)
    assert await record_kinds(mesh, customer.account_id) == {}


async def test_paid_files_expire_after_the_ttl_and_library_videos_stay(
    mesh: Mesh, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    customer = await new_customer(mesh, "10")
    media = tmp_path / "media"
    async with own_edge(mesh, media, media_ttl_seconds=7 * DAY) as edge:
        async with http.post(
            edge.url + GEN, json={"prompt": "a kiln", "size": "256x256"}, headers=customer.headers
        ) as response:
            assert response.status == 200, await response.text()
            image_url = (await response.json())["data"][0]["url"]
        async with http.post(edge.url + IMG2VIDEO, data=form(), headers=customer.headers) as response:
            assert response.status == 200, await response.text()
            video = await response.json()
        image_id = image_url.rsplit("/", 1)[1]
        # Every paid file is recorded with its charge: the image as an output, the video in the library.
        assert await record_kinds(mesh, customer.account_id) == {image_id: "output", video["id"]: "video"}

        now = time.time()
        # Within the TTL (and past the orphan grace: both files are checked): nothing goes.
        assert (await sweeper(edge).run_once(now=now + DAY))["expired"] == 0
        assert await media_status(http, image_url) == 200

        counts = await sweeper(edge).run_once(now=now + 7 * DAY + 60)
        assert (counts["expired"], counts["unpaid"]) == (1, 0)
        assert await media_status(http, image_url) == 404
        assert await media_status(http, video["url"]) == 200
        assert await record_kinds(mesh, customer.account_id) == {video["id"]: "video"}
        async with http.get(edge.url + LIBRARY, headers=customer.headers) as response:
            assert [entry["id"] for entry in (await response.json())["data"]] == [video["id"]]
        assert stored_names(media) == [video["id"] + ".mp4"]


async def test_files_without_a_record_go_after_the_grace_period_and_partial_writes_after_an_hour(
    mesh: Mesh, tmp_path: Path
) -> None:
    media = tmp_path / "media"
    async with own_edge(mesh, media) as edge:
        files = store(edge)
        # A file stored for a request whose edge crashed before the commit: no record.
        unpaid = files.put(b"\x89PNG unpaid", "image/png")
        # A partial write left by a crash, and one still being written.
        stale = media / unpaid[:2] / ".stale-partial.png.tmp"
        stale.write_bytes(b"half a file")
        old = time.time() - STALE_TEMP_SECONDS - 60
        os.utime(stale, (old, old))
        fresh = media / unpaid[:2] / ".being-written.png.tmp"
        fresh.write_bytes(b"in progress")

        now = time.time()
        grace = orphan_grace_seconds(edge.settings)
        assert grace > edge.settings.service_timeout_seconds + HOLD_MARGIN_SECONDS  # longer than a hold lives
        counts = await sweeper(edge).run_once(now=now)
        assert (counts["unpaid"], counts["temporaries"]) == (0, 1)
        assert files.get(unpaid) is not None and fresh.exists() and not stale.exists()

        counts = await sweeper(edge).run_once(now=now + grace + 60)
        assert counts["unpaid"] == 1
        assert files.get(unpaid) is None


async def test_a_stored_answer_lives_as_long_as_its_idempotency_key(mesh: Mesh, tmp_path: Path) -> None:
    media = tmp_path / "media"
    async with own_edge(mesh, media) as edge:
        files = store(edge)
        answer = files.put(b"a large stored answer", "application/octet-stream")
        now = time.time()
        await sweeper(edge).run_once(now=now + orphan_grace_seconds(edge.settings) + 60)
        assert files.get(answer) is not None
        counts = await sweeper(edge).run_once(now=now + ANSWER_TTL_SECONDS + 60)
        assert counts["answers"] == 1
        assert files.get(answer) is None


def test_a_failed_write_leaves_no_partial_file(tmp_path: Path) -> None:
    files = LocalMediaStore(tmp_path)
    not_bytes: Any = "a write that fails half way"
    with pytest.raises(TypeError):
        files.put(not_bytes, "image/png")
    assert stored_names(tmp_path) == []


async def test_the_edge_runs_the_sweep_every_media_sweep_seconds(mesh: Mesh, tmp_path: Path) -> None:
    media = tmp_path / "media"
    (media / "ab").mkdir(parents=True)
    stale = media / "ab" / ".left-by-a-crash.mp4.tmp"
    stale.write_bytes(b"partial")
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))
    async with own_edge(mesh, media, media_sweep_seconds=0.05):

        async def swept() -> bool:
            return not stale.exists()

        await eventually(swept, "the periodic media sweep")
