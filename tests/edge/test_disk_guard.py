"""The disk guard: while the disk of the media root (and of a SQLite database) has less free
space than ``min_free_disk_bytes``, paid requests are refused with a 503 in the contract's
envelope before anything is held; free routes keep working.

The guard trips for real: the threshold is set above this machine's free space (no fake
filesystem).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import aiohttp
import pytest

from edge.retention import DiskGuard
from services.common.errors import LowDiskSpace
from services.common.settings import Settings
from tests.conftest import Mesh, new_customer
from tests.edge.media_util import moving_square_video
from tests.stack import books, edge_app

GEN = "/v1/images/generations"


def more_than_free(path: Path) -> int:
    return shutil.disk_usage(path).free + 1024**4


async def test_a_paid_request_is_a_503_that_holds_nothing_while_free_routes_work(
    mesh: Mesh, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    customer = await new_customer(mesh, "10")
    settings = mesh.settings.model_copy(
        update={"media_root": tmp_path / "media", "min_free_disk_bytes": more_than_free(tmp_path)}
    )
    async with edge_app(settings) as edge:
        body = {"prompt": "a kiln", "size": "256x256"}
        async with http.post(edge.url + GEN, json=body, headers=customer.headers) as response:
            assert response.status == 503
            error = (await response.json())["error"]
        assert error["type"] == "processing_error"
        assert "disk space" in error["message"]
        # The video upload route places its hold apart from the billed flow: refused the same way.
        upload = aiohttp.FormData({"prompt": "the blue square"})
        upload.add_field("file", moving_square_video(frames=4), filename="clip.mp4", content_type="video/mp4")
        async with http.post(
            edge.url + "/v1/videos/remove-background", data=upload, headers=customer.headers
        ) as response:
            assert response.status == 503, await response.text()
        state = await books(mesh.ledger, customer.account_id)
        assert (state.balance, state.held, state.open_holds) == (1000, 0, 0)

        for path, headers in (
            ("/healthz", {}),
            ("/v1/models", {}),
            ("/v1/images/user-videos", customer.headers),
        ):
            async with http.get(edge.url + path, headers=headers) as response:
                assert response.status == 200, (path, await response.text())
        async with http.get(edge.url + "/v1/media/" + "A" * 24) as response:
            assert response.status == 404


async def test_with_room_on_the_disk_paid_requests_go_through(
    mesh: Mesh, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    customer = await new_customer(mesh, "10")
    settings = mesh.settings.model_copy(update={"media_root": tmp_path / "media", "min_free_disk_bytes": 1})
    async with edge_app(settings) as edge:
        body = {"prompt": "a kiln", "size": "256x256"}
        async with http.post(edge.url + GEN, json=body, headers=customer.headers) as response:
            assert response.status == 200, await response.text()


def test_the_guard_watches_the_sqlite_database_folder_and_the_media_root(tmp_path: Path) -> None:
    media = tmp_path / "disk" / "media"
    media.mkdir(parents=True)
    settings = Settings(data_dir=tmp_path / "not-made-yet", media_root=media)
    # The database folder does not exist yet: its nearest existing parent is measured.
    assert DiskGuard.from_settings(settings).paths == [media.absolute(), tmp_path.absolute()]
    postgres = Settings(media_root=media, database_url="postgresql://db.example/kiln")
    assert DiskGuard.from_settings(postgres).paths == [media.absolute()]


def test_zero_turns_the_guard_off_and_the_free_space_is_measured_once_a_second(tmp_path: Path) -> None:
    DiskGuard([tmp_path], 0).check()
    now = [100.0]
    guard = DiskGuard([tmp_path], more_than_free(tmp_path), clock=lambda: now[0])
    with pytest.raises(LowDiskSpace):
        guard.check()
    free = guard.free_bytes()
    guard.paths = [tmp_path / "gone"]  # measuring it would fail
    now[0] += 0.5
    assert guard.free_bytes() == free  # remembered, not measured
    now[0] += 1.0
    with pytest.raises(FileNotFoundError):
        guard.free_bytes()
