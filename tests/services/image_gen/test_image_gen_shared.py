"""The shared pieces image_gen introduced: the step runner, media helpers, the tiny tokenizer."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from services.common.errors import InvalidRequest
from services.common.media.image import decode_image, encode_image, image_mime_type, read_image_metadata
from services.common.runner import Progress, StepControl, StepRunner
from services.common.tiny_tokenizer import build_tiny_tokenizer

# --- StepRunner ---


async def test_runner_streams_progress_then_the_outcome() -> None:
    runner = StepRunner("t")

    def job(control: StepControl) -> str:
        for i in range(1, 4):
            control.step(i, 3)
        return "done"

    try:
        async with runner.start(job, key="a") as running:
            events = [e async for e in running]
    finally:
        runner.shutdown()
    assert events == [Progress(1, 3), Progress(2, 3), Progress(3, 3)]
    outcome = running.outcome
    assert outcome.value == "done" and outcome.steps_done == 3
    assert runner.reports[-1].outcome == "completed"


async def test_runner_stops_a_job_whose_consumer_left_and_frees_the_slot() -> None:
    runner = StepRunner("t")

    def endless(control: StepControl) -> None:
        for i in range(1, 100_000):
            control.step(i, 100_000)
            time.sleep(0.001)

    try:
        async with runner.start(endless, key="gone") as running:
            async for event in running:
                assert event == Progress(1, 100_000)
                break
        follow_up = await runner.result(lambda c: 7, key="next")
    finally:
        runner.shutdown()
    assert follow_up.value == 7
    gone = next(r for r in runner.reports if r.key == "gone")
    assert gone.outcome == "cancelled"
    assert gone.steps_done < 100_000


async def test_runner_runs_one_job_at_a_time_and_propagates_errors() -> None:
    runner = StepRunner("t")
    log: list[str] = []
    release = threading.Event()

    def first(control: StepControl) -> None:
        log.append("first started")
        control.step(1, 1)
        release.wait()
        log.append("first ended")

    def second(control: StepControl) -> None:
        log.append("second started")
        raise ValueError("boom")

    first_job = runner.start(first)
    try:
        assert await anext(first_job) == Progress(1, 1)  # the first job holds the only slot
        second_task = asyncio.create_task(runner.result(second))
        await asyncio.sleep(0)  # lets the second request run up to its wait for the slot
        assert runner.waiting == 1
        assert log == ["first started"]
        release.set()
        assert [e async for e in first_job] == [] and first_job.outcome.value is None
        with pytest.raises(ValueError, match="boom"):
            await second_task
    finally:
        release.set()
        runner.shutdown()
    assert log == ["first started", "first ended", "second started"]
    assert [r.outcome for r in runner.reports] == ["completed", "failed"]


# --- media ---


def _picture() -> Image.Image:
    image = Image.new("RGB", (40, 30))
    image.putdata([(x * 6, y * 8, (x * y) % 256) for y in range(30) for x in range(40)])
    return image


@pytest.mark.parametrize(
    ("fmt", "mime"), [("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")]
)
def test_encode_is_deterministic_and_round_trips(fmt: str, mime: str) -> None:
    data = encode_image(_picture(), fmt)
    assert data == encode_image(_picture(), fmt)
    assert image_mime_type(fmt) == mime
    decoded = decode_image(data, max_pixels=40 * 30)
    assert decoded.size == (40, 30)
    if fmt == "png":
        assert list(decoded.getdata()) == list(_picture().getdata())


def test_decode_refuses_non_images_bombs_and_truncated_files() -> None:
    png = encode_image(_picture())
    with pytest.raises(InvalidRequest, match="not a supported image"):
        decode_image(b"hello, not an image", max_pixels=10_000)
    with pytest.raises(InvalidRequest, match="empty"):
        decode_image(b"", max_pixels=10_000)
    with pytest.raises(InvalidRequest, match="too large"):
        decode_image(png, max_pixels=40 * 30 - 1)
    with pytest.raises(InvalidRequest, match="could not be decoded"):
        decode_image(png[: len(png) // 2], max_pixels=10_000)
    # A 10000x10000 PNG of one colour is tiny on disk and refused from its header.
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")
    # Pillow warns (above its own limit) and the header check refuses, before any pixel is decoded.
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(InvalidRequest, match="too large"):
        decode_image(buf.getvalue(), max_pixels=4096 * 4096)
    with pytest.raises(InvalidRequest, match=r"1001 bytes; the maximum is 1000 bytes"):
        decode_image(b"\0" * 1001, max_pixels=10_000, max_bytes=1000)
    with pytest.raises(InvalidRequest, match="Unsupported image format"):
        encode_image(_picture(), "tiff")


METADATA = {
    "prompt": "a café, 夜の街",
    "negative_prompt": "blurry",
    "model": "black-forest-labs/FLUX.2-klein-4B",
    "seed": "42",
    "steps": "4",
}


@pytest.mark.parametrize(("fmt", "pillow_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_metadata_round_trips_deterministically(fmt: str, pillow_format: str) -> None:
    data = encode_image(_picture(), fmt, METADATA)
    assert data == encode_image(_picture(), fmt, dict(METADATA))
    assert read_image_metadata(data) == {**METADATA, "Software": "Kiln"}
    assert read_image_metadata(encode_image(_picture(), fmt)) == {}
    picture = Image.open(io.BytesIO(data))
    assert picture.format == pillow_format
    if fmt == "png":  # one text chunk per field, as any PNG reader shows them
        picture.load()
        assert picture.text["prompt"] == METADATA["prompt"]  # type: ignore[attr-defined]
    else:  # EXIF: the ASCII tags readers show, and the exact fields as JSON in UserComment
        exif = picture.getexif()
        assert exif[0x0131] == "Kiln"
        assert exif[0x0110] == METADATA["model"]
        assert exif[0x010E].startswith("a caf")
        assert exif.get_ifd(0x8769)[0x9286].startswith(b"ASCII\0\0\0{")
    with pytest.raises(InvalidRequest):
        read_image_metadata(b"not an image")


# --- tiny tokenizer ---


def test_tiny_tokenizer_is_deterministic_with_qwen_tokens_and_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = build_tiny_tokenizer()
    assert tok.get_vocab() == build_tiny_tokenizer().get_vocab()
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert len(tok.tokenize("<|image_pad|>")) == 1
    text = tok.apply_chat_template(
        [{"role": "user", "content": "a cat"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    ids = tok("a photo of a cat")["input_ids"]
    assert tok.decode(ids) == "a photo of a cat"
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok) and loaded("a photo of a cat")["input_ids"] == ids
