"""The media store in an S3 bucket (``KILN_MEDIA_BACKEND=s3``, ``edge.media_s3``) against a real
S3 server, SeaweedFS on loopback (``tests.s3_server``): the store's round trip, ``GET
/v1/media/{id}`` streamed (ranges, validators) and redirected to a presigned URL (which expires),
SigV4 enforced, and the retention sweep deleting objects by their last-modified times.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import obstore
import pytest

from edge.keys import MEDIA
from edge.media_s3 import S3MediaStore
from edge.media_store import MediaStore, MediaStoreError, StoredMedia
from edge.retention import ANSWER_TTL_SECONDS, SWEEPER, orphan_grace_seconds
from services.common.settings import Settings
from tests.s3_server import S3Server, seaweedfs
from tests.stack import OfflineStack, offline_stack

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


def s3_store(server: S3Server, **overrides: object) -> S3MediaStore:
    return S3MediaStore.from_settings(Settings(**server.settings(**overrides)))  # type: ignore[arg-type]


def edge_store(stack: OfflineStack) -> MediaStore:
    return stack.edge.runner.app[MEDIA]


async def listed(store: S3MediaStore) -> dict[str, tuple[str, float]]:
    return {media_id: (ext, mtime) async for media_id, ext, mtime in store.files_async()}


async def test_the_store_round_trip(s3: S3Server) -> None:
    store = s3_store(s3)
    media_id = await store.put_async(PNG, "image/png")
    stored = await store.get_async(media_id)
    assert stored is not None
    assert (stored.media_id, stored.path, stored.mime_type, stored.size) == (
        media_id,
        None,
        "image/png",
        len(PNG),
    )
    assert stored.key == f"media/{media_id}/{media_id}.png"
    assert stored.etag.startswith('"') and abs(stored.modified - time.time()) < 60
    assert await store.read_async(media_id) == PNG
    chunks = await store.open_async(stored, 8, 20)
    assert b"".join([chunk async for chunk in chunks]) == PNG[8:20]
    # The object carries its type (what a presigned URL answers with).
    head = await obstore.get_async(store.store, stored.key)
    assert head.attributes.get("Content-Type") == "image/png"

    # An id announced before it is written (streams), and a stored answer.
    announced = store.new_id()
    assert await store.put_async(b"RIFF....WAVE", "audio/wav", announced) == announced
    answer = await store.put_async(b'{"a": 1}', "application/octet-stream")
    # Objects that are not the store's are ignored by the listing.
    await obstore.put_async(store.store, "media/README.txt", b"not media")
    await obstore.put_async(store.store, "elsewhere/" + announced + ".png", b"not media")
    files = await listed(store)
    assert {media_id: files[media_id][0], announced: files[announced][0], answer: files[answer][0]} == {
        media_id: ".png",
        announced: ".wav",
        answer: ".bin",
    }
    assert "README" not in "".join(files)

    assert await store.delete_async(media_id) is True
    assert await store.get_async(media_id) is None
    assert await store.read_async(media_id) is None
    assert await store.delete_async(media_id) is False
    assert await store.get_async("not-an-id") is None
    assert await store.remove_stale_temporaries_async(time.time()) == 0


async def test_a_wrong_secret_is_refused(s3: S3Server, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """SeaweedFS checks SigV4: a store with a wrong secret can neither write nor read, and the
    edge answers a 500 (the fault is ours, not the client's)."""
    good = s3_store(s3)
    media_id = await good.put_async(PNG, "image/png")
    wrong = s3_store(s3, s3_secret_access_key="not-" + s3.secret_access_key)
    with pytest.raises(MediaStoreError, match="SignatureDoesNotMatch"):
        await wrong.put_async(PNG, "image/png")
    with pytest.raises(MediaStoreError):
        await wrong.get_async(media_id)
    async with offline_stack(tmp_path, **s3.settings(s3_secret_access_key="wrong")) as stack:
        async with http.get(f"{stack.url}/v1/media/{media_id}") as response:
            assert response.status == 500
            assert (await response.json())["error"]["type"] == "processing_error"


async def test_get_media_streams_from_the_bucket(
    s3: S3Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with offline_stack(tmp_path, **s3.settings()) as stack:
        store = edge_store(stack)
        assert isinstance(store, S3MediaStore)
        media_id = await store.put_async(PNG, "image/png")
        url = f"{stack.url}/v1/media/{media_id}"
        async with http.get(url) as response:
            assert response.status == 200
            assert await response.read() == PNG
            assert response.headers["Content-Type"] == "image/png"
            assert response.headers["Content-Length"] == str(len(PNG))
            assert response.headers["Accept-Ranges"] == "bytes"
            assert response.headers["Cache-Control"] == "public, max-age=3600, immutable"
            etag = response.headers["ETag"]
            last_modified = response.headers["Last-Modified"]

        async with http.get(url, headers={"Range": "bytes=10-19"}) as response:
            assert response.status == 206
            assert await response.read() == PNG[10:20]
            assert response.headers["Content-Range"] == f"bytes 10-19/{len(PNG)}"
            assert response.headers["Content-Type"] == "image/png"
        async with http.get(url, headers={"Range": "bytes=-5"}) as response:
            assert (response.status, await response.read()) == (206, PNG[-5:])
        async with http.get(url, headers={"Range": f"bytes={len(PNG) - 3}-"}) as response:
            assert (response.status, await response.read()) == (206, PNG[-3:])
            assert response.headers["Content-Range"] == f"bytes {len(PNG) - 3}-{len(PNG) - 1}/{len(PNG)}"
        async with http.get(url, headers={"Range": f"bytes={len(PNG)}-"}) as response:
            assert response.status == 416
            assert response.headers["Content-Range"] == f"bytes */{len(PNG)}"
        async with http.get(url, headers={"Range": "bytes=0-1,5-6"}) as response:
            assert response.status == 416
        # If-Range naming another version: the whole file.
        async with http.get(url, headers={"Range": "bytes=0-3", "If-Range": '"other"'}) as response:
            assert (response.status, await response.read()) == (200, PNG)
        async with http.get(url, headers={"Range": "bytes=0-3", "If-Range": etag}) as response:
            assert (response.status, await response.read()) == (206, PNG[:4])

        async with http.get(url, headers={"If-None-Match": etag}) as response:
            assert response.status == 304
            assert response.headers["ETag"] == etag
        async with http.get(url, headers={"If-Modified-Since": last_modified}) as response:
            assert response.status == 304
        async with http.get(url, headers={"If-None-Match": '"other"'}) as response:
            assert response.status == 200

        for missing in (store.new_id(), "not-an-id"):
            async with http.get(f"{stack.url}/v1/media/{missing}") as response:
                assert response.status == 404
                assert (await response.json())["error"]["type"] == "not_found_error"


async def test_redirect_mode_answers_with_a_presigned_url_that_expires(
    s3: S3Server, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    settings = s3.settings(media_s3_redirect=True, s3_presign_seconds=2)
    async with offline_stack(tmp_path, **settings) as stack:
        media_id = await edge_store(stack).put_async(PNG, "image/png")
        async with http.get(f"{stack.url}/v1/media/{media_id}", allow_redirects=False) as response:
            assert response.status == 307
            assert response.headers["Cache-Control"] == "no-store"
            location = response.headers["Location"]
        assert location.startswith(f"{s3.endpoint}/{s3.bucket}/media/{media_id}/{media_id}.png?")
        assert "X-Amz-Expires=2" in location and "X-Amz-Signature=" in location
        async with http.get(location) as response:
            assert response.status == 200
            assert await response.read() == PNG
            assert response.headers["Content-Type"] == "image/png"
        # A client that follows redirects gets the file; ranges go to S3 itself.
        async with http.get(f"{stack.url}/v1/media/{media_id}", headers={"Range": "bytes=0-7"}) as response:
            assert (response.status, await response.read()) == (206, PNG[:8])
        async with http.get(f"{stack.url}/v1/media/{stack.edge.runner.app[MEDIA].new_id()}") as response:
            assert response.status == 404

        await asyncio.sleep(3.5)
        async with http.get(location) as response:
            assert response.status == 403, "SeaweedFS serves a presigned URL past its expiry"


async def test_retention_deletes_objects_from_the_bucket(s3: S3Server, tmp_path: Path) -> None:
    """An object without a billing record goes after the grace period, a stored answer after
    its key's TTL; younger ones stay (the sweep reads the objects' last-modified times)."""
    async with offline_stack(tmp_path, **s3.settings(s3_prefix="retention")) as stack:
        store = edge_store(stack)
        assert isinstance(store, S3MediaStore)
        unpaid = await store.put_async(PNG, "image/png")
        answer = await store.put_async(b"a large stored answer", "application/octet-stream")
        sweeper = stack.edge.runner.app[SWEEPER]
        now = time.time()

        counts = await sweeper.run_once(now=now + 60)  # too young for both
        assert (counts["unpaid"], counts["answers"]) == (0, 0)
        assert set(await listed(store)) == {unpaid, answer}

        counts = await sweeper.run_once(now=now + orphan_grace_seconds(stack.edge.settings) + 60)
        assert (counts["unpaid"], counts["answers"]) == (1, 0)
        assert await store.get_async(unpaid) is None
        assert set(await listed(store)) == {answer}

        counts = await sweeper.run_once(now=now + ANSWER_TTL_SECONDS + 60)
        assert counts["answers"] == 1
        assert await listed(store) == {}
        assert await obstore.list(store.store, prefix="retention").collect_async() == []


async def test_the_local_store_keeps_its_interface(tmp_path: Path) -> None:
    """The same interface on the local disk (the default backend)."""
    from edge.media_store import LocalMediaStore

    store: MediaStore = LocalMediaStore(tmp_path)
    media_id = await store.put_async(PNG, "image/png")
    stored = await store.get_async(media_id)
    assert isinstance(stored, StoredMedia) and stored.path is not None and stored.size == len(PNG)
    assert await store.download_url(stored) is None
    assert await store.read_async(media_id) == PNG
    assert b"".join([c async for c in await store.open_async(stored, 3, 9)]) == PNG[3:9]
    assert [(i, ext) async for i, ext, _ in store.files_async()] == [(media_id, ".png")]
    assert await store.delete_async(media_id) is True
    assert await store.read_async(media_id) is None
