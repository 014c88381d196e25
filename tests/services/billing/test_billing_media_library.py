"""The account's media library (videos): recorded with the charge, listed per account, paged, sorted."""

from __future__ import annotations

import pytest

from services.billing.ledger import Ledger, MediaRecord
from services.common.errors import InvalidRequest

from .billing_fakes import FakeClock
from .test_billing_ledger import funded


def video(media_id: str, frames: int = 81, prompt: str = "a cat") -> MediaRecord:
    return MediaRecord(
        media_id=media_id,
        kind="video",
        mime_type="video/mp4",
        model="wan",
        prompt=prompt,
        width=832,
        height=480,
        frames=frames,
        fps=16.0,
        duration_seconds=frames / 16,
        size_bytes=1000 + frames,
    )


async def paid(ledger: Ledger, account_id: str, request_id: str, *records: MediaRecord) -> None:
    res = await ledger.reserve(account_id, 100, request_id, 60)
    await ledger.commit(res.id, 100, records)


async def test_committed_files_are_listed_for_their_account_only(ledger: Ledger, clock: FakeClock) -> None:
    alice, bob = await funded(ledger), await funded(ledger)
    await paid(ledger, alice.id, "a1", video("vid-a1", prompt="first"))
    clock.advance(1.0)
    await paid(ledger, alice.id, "a2", video("vid-a2", prompt="second"))
    await paid(ledger, bob.id, "b1", video("vid-b1"))
    records, total = await ledger.list_media(alice.id, "video")
    assert total == 2 and [r.media_id for r in records] == ["vid-a2", "vid-a1"]  # newest first
    assert records[0].prompt == "second" and records[0].created_at_ms > records[1].created_at_ms
    assert (records[0].width, records[0].height, records[0].frames, records[0].fps) == (832, 480, 81, 16.0)
    bobs, bob_total = await ledger.list_media(bob.id, "video")
    assert bob_total == 1 and [r.media_id for r in bobs] == ["vid-b1"]
    assert await ledger.list_media(alice.id, "music") == ([], 0)


async def test_released_or_repeated_commits_record_nothing_more(ledger: Ledger) -> None:
    account = await funded(ledger)
    held = await ledger.reserve(account.id, 100, "r1", 60)
    await ledger.release(held.id)
    res = await ledger.reserve(account.id, 100, "r2", 60)
    await ledger.commit(res.id, 100, (video("v1"),))
    await ledger.commit(res.id, 100, (video("v1"),))  # the same commit again: idempotent
    records, total = await ledger.list_media(account.id, "video")
    assert total == 1 and [r.media_id for r in records] == ["v1"]


async def test_pages_cover_every_file_exactly_once_in_both_orders(ledger: Ledger, clock: FakeClock) -> None:
    account = await funded(ledger, "100")
    for index in range(7):
        await paid(
            ledger, account.id, f"r{index}", video(f"v{index}", frames=[9, 81, 9, 33, 81, 9, 17][index])
        )
        if index % 2:
            clock.advance(1.0)  # some files share a timestamp: the id breaks the tie
    for sort_by in ("created_at", "frames", "size_bytes"):
        for ascending in (False, True):
            seen: list[str] = []
            for offset in range(0, 9, 3):
                page, total = await ledger.list_media(
                    account.id, "video", sort_by=sort_by, ascending=ascending, limit=3, offset=offset
                )
                assert total == 7
                seen += [r.media_id for r in page]
            assert sorted(seen) == [f"v{i}" for i in range(7)] and len(set(seen)) == 7
    by_frames, _ = await ledger.list_media(account.id, "video", sort_by="frames", ascending=True, limit=7)
    assert [r.frames for r in by_frames] == sorted(r.frames for r in by_frames)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sort_by": "prompt; DROP TABLE accounts"}, "Invalid sort field"),
        ({"limit": 0}, "between 1 and 100"),
        ({"limit": 101}, "between 1 and 100"),
        ({"offset": -1}, "must not be negative"),
    ],
)
async def test_bad_listing_arguments_are_invalid(
    ledger: Ledger, kwargs: dict[str, object], message: str
) -> None:
    account = await funded(ledger)
    with pytest.raises(InvalidRequest, match=message):
        await ledger.list_media(account.id, "video", **kwargs)  # type: ignore[arg-type]
