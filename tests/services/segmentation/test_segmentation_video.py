"""RemoveVideoBackground over real gRPC: the probe/start protocol, VP9-with-alpha output, the skip rule, bounds."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import grpc
import pytest

from kiln.segmentation.v1 import segmentation_service_pb2 as pb
from kiln.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc

from .conftest import LIMITED_MODEL, Seg
from .media_util import decode_alpha_webm, decode_rgb_frames, make_audio_only, make_video

CHUNK = 4096


async def read_all(call: grpc.aio.StreamStreamCall) -> list[pb.RemoveVideoBackgroundResponse]:
    """Every remaining message of a call (read API: the read/write and iterator styles do not mix)."""
    messages = []
    while (message := await call.read()) is not grpc.aio.EOF:
        messages.append(message)
    return messages


def job(prompt: str = "the ball", model: str = "", request_id: str = "") -> pb.RemoveVideoBackgroundRequest:
    return pb.RemoveVideoBackgroundRequest(job=pb.VideoJob(prompt=prompt, model=model, request_id=request_id))


def chunks(data: bytes) -> list[pb.RemoveVideoBackgroundRequest]:
    return [pb.RemoveVideoBackgroundRequest(chunk=data[i : i + CHUNK]) for i in range(0, len(data), CHUNK)]


COMPLETE = pb.RemoveVideoBackgroundRequest(upload_complete=True)
START = pb.RemoveVideoBackgroundRequest(start=pb.StartProcessing())


@dataclass
class VideoRun:
    probe: pb.VideoProbe
    output: bytes
    progress: list[tuple[int, int]] = field(default_factory=list)
    summary: pb.VideoSummary | None = None


async def run_video(
    stub: pb_grpc.SegmentationServiceStub, data: bytes, *, job_last: bool = False, **job_fields: str
) -> VideoRun:
    """The whole protocol: job, chunks, upload_complete; read the probe; start; read to the summary.

    ``job_last``: the job after the chunks (as a multipart form with the file before the prompt).
    """
    call = stub.RemoveVideoBackground()
    upload = (
        [*chunks(data), job(**job_fields), COMPLETE]
        if job_last
        else [job(**job_fields), *chunks(data), COMPLETE]
    )
    for message in upload:
        await call.write(message)
    first = await call.read()
    assert first.WhichOneof("event") == "probe"
    await call.write(START)
    await call.done_writing()
    run = VideoRun(first.probe, b"")
    output = bytearray()
    while (message := await call.read()) is not grpc.aio.EOF:
        kind = message.WhichOneof("event")
        assert run.summary is None, "the summary is the last message"
        if kind == "chunk":
            output += message.chunk
        elif kind == "progress":
            run.progress.append((message.progress.step, message.progress.total_steps))
        else:
            assert kind == "summary"
            run.summary = message.summary
    run.output = bytes(output)
    return run


async def expect_invalid_video(
    stub: pb_grpc.SegmentationServiceStub, data: bytes, *words: str, model: str = ""
) -> None:
    call = stub.RemoveVideoBackground()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        for message in [job(model=model), *chunks(data), COMPLETE]:
            await call.write(message)
        while (message := await call.read()) is not grpc.aio.EOF:
            assert message.WhichOneof("event") != "chunk"
            await call.write(START)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    for word in words:
        assert word in (caught.value.details() or ""), caught.value.details()


async def test_mp4_to_webm_with_alpha_counts_only_frames_with_the_object(
    seg: Seg, seg_factory: Callable[[float], Awaitable[Seg]], tmp_path: Path
) -> None:
    count = 12
    data = make_video(tmp_path / "in.mp4", frames=count, width=64, height=48, rate=10)
    frames = decode_rgb_frames(data)
    assert len(frames) == count
    # Measure each frame's best score with the engine, in the batches the video path uses.
    engine = seg.engine()
    scores: list[float] = []
    for start in range(0, count, engine.frame_batch):
        batch = await engine.detect_frames(frames[start : start + engine.frame_batch], "the ball")
        scores.extend(d.score for d in batch.detections)
    ordered = sorted(scores)
    gaps = [(ordered[i + 1] - ordered[i], i) for i in range(2, count - 3)]
    gap, index = max(gaps)
    assert gap > 1e-4, f"the tiny model's scores do not spread: {ordered}"
    threshold = (ordered[index] + ordered[index + 1]) / 2
    service = await seg_factory(threshold)
    above = [s >= threshold for s in scores]
    masks = [d.mask for d in (await service.engine().detect_frames(frames, "the ball")).detections]
    expected = sum(1 for a, m in zip(above, masks, strict=True) if a and m is not None)
    assert 0 < expected < count

    run = await run_video(service.stub, data, prompt="the ball", request_id="video-1")
    assert (run.probe.frames, run.probe.width, run.probe.height) == (count, 64, 48)
    assert run.probe.frame_rate == pytest.approx(10.0)
    assert run.probe.duration_seconds == pytest.approx(1.2, abs=0.05)
    assert run.summary is not None
    assert run.summary.frames_processed == count
    assert run.summary.frames_with_object == expected
    assert run.summary.model == "sam3"
    assert run.progress[-1] == (count, count)
    assert [step for step, _ in run.progress] == sorted(step for step, _ in run.progress)

    output, rate, container = decode_alpha_webm(run.output)
    assert container == "matroska,webm"
    assert len(output) == count
    assert rate == Fraction(10)
    assert all(frame.shape == (48, 64, 4) for frame in output)
    alphas = [frame[..., 3] for frame in output]
    assert any(a.min() < 128 for a in alphas)  # not uniformly opaque
    for alpha, mask in zip(alphas, masks, strict=True):
        if mask is None:
            assert alpha.max() < 32  # skipped frames are written fully transparent
    for alpha, found, mask in zip(alphas, above, masks, strict=True):
        if found and mask is not None:
            assert alpha.max() > 200 and alpha.min() < 32


async def test_webm_input_is_probed_before_the_upload_completes(seg: Seg, tmp_path: Path) -> None:
    data = make_video(
        tmp_path / "in.webm", frames=20, width=96, height=64, rate=20, container="webm", noise=True
    )
    call = seg.stub.RemoveVideoBackground()
    pieces = chunks(data)
    half = len(pieces) // 2
    await call.write(job())
    for message in pieces[:half]:
        await call.write(message)
    probe = await call.read()  # answered while half of the file is still to come
    assert probe.WhichOneof("event") == "probe"
    assert (probe.probe.width, probe.probe.height, probe.probe.frames) == (96, 64, 20)
    assert probe.probe.frame_rate == pytest.approx(20.0)
    for message in [*pieces[half:], COMPLETE, START]:
        await call.write(message)
    await call.done_writing()
    events = await read_all(call)
    assert events[-1].summary.frames_processed == 20
    output, rate, _ = decode_alpha_webm(b"".join(m.chunk for m in events if m.WhichOneof("event") == "chunk"))
    assert len(output) == 20 and rate == Fraction(20)


async def test_nothing_is_processed_before_start(seg: Seg, tmp_path: Path) -> None:
    data = make_video(tmp_path / "in.mp4", frames=6)
    engine = seg.engine()
    call = seg.stub.RemoveVideoBackground()
    for message in [job(request_id="wait-for-start"), *chunks(data), COMPLETE]:
        await call.write(message)
    probe = await call.read()
    assert probe.WhichOneof("event") == "probe"
    for _ in range(20):
        await asyncio.sleep(0)
    assert not [r for r in engine.runner.reports if r.key == "wait-for-start"]
    assert engine.runner.running == 0
    await call.write(START)
    await call.done_writing()
    events = await read_all(call)
    assert events[-1].summary.frames_processed == 6
    assert [r for r in engine.runner.reports if r.key == "wait-for-start"]


async def test_protocol_errors_are_invalid_argument(seg: Seg, tmp_path: Path) -> None:
    data = make_video(tmp_path / "in.mp4", frames=4)
    # start before the probe (the upload is not even complete)
    call = seg.stub.RemoveVideoBackground()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.write(job())
        await call.write(START)
        await read_all(call)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "probe" in (caught.value.details() or "")
    # no job at all
    call = seg.stub.RemoveVideoBackground()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        for message in [*chunks(data), COMPLETE]:
            await call.write(message)
        await call.done_writing()
        await read_all(call)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "job" in (caught.value.details() or "")
    # two jobs
    call = seg.stub.RemoveVideoBackground()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.write(job())
        await call.write(job())
        await read_all(call)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "once" in (caught.value.details() or "")
    # an empty prompt
    call = seg.stub.RemoveVideoBackground()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.write(job(prompt=" "))
        await read_all(call)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # the stream ends without start
    call = seg.stub.RemoveVideoBackground()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        for message in [job(), *chunks(data), COMPLETE]:
            await call.write(message)
        await call.done_writing()
        await read_all(call)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "start" in (caught.value.details() or "")


async def test_bad_videos_are_invalid_argument(seg: Seg, tmp_path: Path) -> None:
    mp4 = make_video(tmp_path / "in.mp4", frames=12)
    assert mp4.find(b"moov") > mp4.find(b"mdat")  # moov at the end: cutting the file loses it
    await expect_invalid_video(seg.stub, mp4[: len(mp4) // 2], "not a readable video")
    await expect_invalid_video(seg.stub, b"\x00garbage" * 500, "not a readable video")
    await expect_invalid_video(seg.stub, b"", "not a readable video")
    await expect_invalid_video(seg.stub, make_audio_only(tmp_path / "tone.m4a"), "no video stream")


async def test_video_bounds_are_invalid_argument(seg: Seg, tmp_path: Path) -> None:
    # sam3-limited: at most 48x48, 8 frames, 1 second
    too_large = make_video(tmp_path / "large.mp4", frames=4, width=64, height=48)
    await expect_invalid_video(seg.stub, too_large, "64x48", model=LIMITED_MODEL)
    too_long = make_video(tmp_path / "long.mp4", frames=20, width=32, height=32, rate=10)
    await expect_invalid_video(seg.stub, too_long, "2.0 seconds", model=LIMITED_MODEL)
    too_many = make_video(tmp_path / "many.webm", frames=12, width=32, height=32, rate=24, container="webm")
    await expect_invalid_video(seg.stub, too_many, "12 frames", model=LIMITED_MODEL)
    fits = make_video(tmp_path / "fits.mp4", frames=6, width=32, height=32, rate=10)
    run = await run_video(seg.stub, fits, model=LIMITED_MODEL)
    assert run.summary is not None and run.summary.frames_processed == 6


async def test_mp4_with_audio_keeps_the_video_and_drops_the_audio(seg: Seg, tmp_path: Path) -> None:
    data = make_video(tmp_path / "av.mp4", frames=8, audio=True)
    run = await run_video(seg.stub, data, job_last=True)  # the job may also follow the file
    assert run.summary is not None and run.summary.frames_processed == 8
    with av.open(io.BytesIO(run.output)) as container:
        assert len(container.streams.video) == 1 and not container.streams.audio


async def test_a_client_that_goes_away_cancels_the_work(seg: Seg, tmp_path: Path) -> None:
    data = make_video(tmp_path / "in.mp4", frames=200, width=32, height=32, rate=25)
    engine = seg.engine()
    call = seg.stub.RemoveVideoBackground()
    for message in [job(request_id="gone"), *chunks(data), COMPLETE]:
        await call.write(message)
    assert (await call.read()).WhichOneof("event") == "probe"
    await call.write(START)
    while (await call.read()).WhichOneof("event") != "progress":
        pass
    call.cancel()
    for _ in range(500):  # the server notices the cancellation on its own schedule
        jobs = [r for r in engine.runner.reports if r.key == "gone"]
        if engine.runner.running == 0 and jobs:
            break
        await asyncio.sleep(0.01)
    processed = len([r for r in engine.runner.reports if r.key == "gone"])
    assert engine.runner.running == 0
    assert 0 < processed < 200 // engine.frame_batch
