"""Hostile media sent to every route that takes media: a 4xx in the envelope, free, service healthy.

A corpus made here: zero-length, truncated (inside the header: a file cut later
is often a valid, shorter file) and wrong-magic PNG / JPEG / WebP / MP4 / WebM /
WAV / FLAC / MP3; a PNG decompression bomb (a header claiming 30000x30000);
100000x1 and 1x100000 images; an 8-channel 384 kHz FLAC whose header claims an
hour (gigabytes of samples in a few kilobytes); eleven minutes of FLAC silence
(a decompression bomb within the limits of rate and channels); a WAV header
claiming ten hours over one second of data; a 9-channel WAV; and files of the
wrong kind (a WAV as an image, a PNG as audio or video).

Each goes to every media route of its kind (image routes: edits, segmentation,
background removal, upscale, chat's data: URL, image-to-video; audio routes:
voice clone reference, music cover and repaint; the video route: video
background removal). Each answer is a 4xx in the contract's error envelope and
leaves the customer's books as they were (no charge, no open hold). Afterwards
a normal request to every route succeeds, and the peak memory of the decode
workers (where the media was opened) is printed and bounded.
"""

from __future__ import annotations

import asyncio
import base64
import io
import resource
from collections.abc import Callable
from typing import Any

import aiohttp
import numpy as np
import psutil
import pytest
import soundfile
from PIL import Image

from services.common.media.audio import encode_audio, wav_header
from tests.conftest import Customer, Mesh, new_customer
from tests.edge.images_util import bomb_png, png_bytes
from tests.edge.media_util import moving_square_video, object_png
from tests.stack import settled_books

#: One database is enough here: the money checks are the same on both.
pytestmark = pytest.mark.parametrize("mesh", ["sqlite"], indirect=True)

#: The vision model of the chat route.
VLM = "Qwen/Qwen3.5-4B"
#: A bound on the peak memory of one decode worker (its own limit is KILN_DECODE_MEMORY_BYTES).
MAX_WORKER_PEAK_BYTES = 1024 * 1024 * 1024


# --- the corpus ---


def _image(fmt: str, width: int = 96, height: int = 64) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _flac(rate: int, channels: int, seconds: int, *, claim_samples: int | None = None) -> bytes:
    """Silence as FLAC; ``claim_samples`` rewrites STREAMINFO's total sample count."""
    buf = io.BytesIO()
    with soundfile.SoundFile(buf, "w", samplerate=rate, channels=channels, format="FLAC") as out:
        second = np.zeros((rate, channels), dtype=np.int16)
        for _ in range(seconds):
            out.write(second)
    data = bytearray(buf.getvalue())
    if claim_samples is not None:
        # "fLaC", a 4-byte block header, then STREAMINFO: the total is the low 36 bits of bytes 10-17.
        field = int.from_bytes(data[18:26], "big")
        field = (field & ~((1 << 36) - 1)) | claim_samples
        data[18:26] = field.to_bytes(8, "big")
    return bytes(data)


def _tone(seconds: float, rate: int = 16000) -> bytes:
    return (np.sin(np.arange(int(rate * seconds)) / 3) * 8000).astype("<i2").tobytes()


def _wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    return encode_audio(_tone(seconds, rate), rate, "wav")[0]


def _mp3(seconds: float = 1.0) -> bytes:
    return encode_audio(_tone(seconds), 16000, "mp3")[0]


def _magic(data: bytes, other: bytes) -> bytes:
    """``data`` with its first bytes replaced by another format's magic."""
    return other + data[len(other) :]


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def image_corpus() -> dict[str, bytes]:
    png, jpeg, webp = _image("PNG"), _image("JPEG"), _image("WEBP")
    return {
        "empty": b"",
        "png-truncated": png[: len(png) // 2],
        "jpeg-truncated": jpeg[: len(jpeg) // 2],
        "webp-truncated": webp[: len(webp) // 2],
        "png-wrong-magic": _magic(png, b"\xff\xd8\xff\xe0"),
        "jpeg-wrong-magic": _magic(jpeg, PNG_MAGIC),
        "webp-wrong-magic": _magic(webp, b"RIFX"),
        "png-bomb-30000x30000": bomb_png(),
        "png-100000x1": png_bytes(100000, 1),
        "png-1x100000": png_bytes(1, 100000),
        "a-wav": _wav(0.2),
    }


def audio_corpus() -> dict[str, bytes]:
    wav, flac, mp3 = _wav(), _flac(16000, 1, 1), _mp3()
    return {
        "empty": b"",
        "wav-truncated": wav[:40],
        "flac-truncated": flac[:30],
        "mp3-truncated": mp3[:60],
        "wav-wrong-magic": _magic(wav, PNG_MAGIC),
        "flac-wrong-magic": _magic(flac, b"OggS"),
        "mp3-wrong-magic": b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"no audio frames follow" * 40,
        "flac-8ch-384khz-claiming-an-hour": _flac(384000, 8, 2, claim_samples=384000 * 3600),
        "flac-eleven-minutes-of-silence": _flac(8000, 1, 660),
        "wav-claiming-ten-hours": wav_header(8000, data_bytes=8000 * 2 * 3600 * 10) + b"\0\0" * 8000,
        "wav-9-channels": wav_header(8000, channels=9, data_bytes=8000 * 18) + b"\0" * 8000 * 18,
        "a-png": _image("PNG"),
    }


def video_corpus() -> dict[str, bytes]:
    mp4, webm = moving_square_video(6, 6), moving_square_video(6, 6, container="webm")
    return {
        "empty": b"",
        "mp4-truncated": mp4[: len(mp4) // 2],  # cut before its moov atom (written last)
        "webm-truncated": webm[:120],
        "mp4-wrong-magic": _magic(mp4, b"\x00\x00\x00\x18ftypXXXX"),
        "webm-wrong-magic": _magic(webm, b"\x00\x00\x00\x00"),
        "a-png": _image("PNG"),
        "a-wav": _wav(0.5),
    }


IMAGES, AUDIO, VIDEOS = image_corpus(), audio_corpus(), video_corpus()


# --- the routes: media in, (path, request keyword arguments) out ---

Request = tuple[str, dict[str, Any]]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def form(fields: dict[str, Any], filename: str, content_type: str) -> aiohttp.FormData:
    data = aiohttp.FormData()
    for name, value in fields.items():
        if isinstance(value, bytes):
            data.add_field(name, value, filename=filename, content_type=content_type)
        else:
            data.add_field(name, str(value))
    return data


def image_edit(media: bytes) -> Request:
    body = {"prompt": "make it green", "input_images": [b64(media)], "seed": 1, "num_steps": 1}
    return "/v1/images/edits", {"json": body}


def segmentation(media: bytes) -> Request:
    fields = {"file": media, "prompt": "the red disc"}
    return "/v1/images/segmentations", {"data": form(fields, "input.png", "image/png")}


def image_background(media: bytes) -> Request:
    fields = {"file": media, "prompt": "the red disc"}
    return "/v1/images/remove-background", {"data": form(fields, "input.png", "image/png")}


def upscale(media: bytes) -> Request:
    return "/v1/images/upscale", {"json": {"image": b64(media), "method": "lanczos"}}


def chat(media: bytes) -> Request:
    content = [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(media)}"}},
    ]
    body = {"model": VLM, "messages": [{"role": "user", "content": content}], "max_tokens": 2}
    return "/v1/chat/completions", {"json": body}


def image_to_video(media: bytes) -> Request:
    fields = {"image": media, "prompt": "a slow pan", "num_frames": 5, "num_steps": 2, "resolution": "480p"}
    return "/v1/images/img2video", {"data": form(fields, "input.png", "image/png")}


def voice_clone(media: bytes) -> Request:
    body = {
        "text": "Hello.",
        "ref_audio": b64(media),
        "ref_text": "Reference text here",
        "language": "English",
        "stream": False,
        "seed": 1,
    }
    return "/v1/audio/clone", {"json": body}


def music_cover(media: bytes) -> Request:
    body = {"audio": b64(media), "prompt": "jazz", "seed": 1, "num_inference_steps": 1}
    return "/v1/music/cover", {"json": body}


def music_repaint(media: bytes) -> Request:
    body = {
        "audio": b64(media),
        "prompt": "drums",
        "start": 0.25,
        "end": 0.6,
        "seed": 1,
        "num_inference_steps": 1,
    }
    return "/v1/music/repaint", {"json": body}


def video_background(media: bytes) -> Request:
    fields = {"file": media, "prompt": "the blue square"}
    return "/v1/videos/remove-background", {"data": form(fields, "clip.mp4", "video/mp4")}


IMAGE_ROUTES = (image_edit, segmentation, image_background, upscale, chat, image_to_video)
AUDIO_ROUTES = (voice_clone, music_cover, music_repaint)
VIDEO_ROUTES = (video_background,)

CASES = (
    [(route, name) for route in IMAGE_ROUTES for name in IMAGES]
    + [(route, name) for route in AUDIO_ROUTES for name in AUDIO]
    + [(route, name) for route in VIDEO_ROUTES for name in VIDEOS]
)
CORPUS = {**IMAGES, **AUDIO, **VIDEOS}
KIND: dict[Callable[[bytes], Request], dict[str, bytes]] = {
    **{route: IMAGES for route in IMAGE_ROUTES},
    **{route: AUDIO for route in AUDIO_ROUTES},
    video_background: VIDEOS,
}


@pytest.fixture(scope="module")
async def customers(mesh: Mesh) -> dict[str, Customer]:
    """One paying customer per route; the voice-cloning model is loaded first (it loads last)."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(240):
        while True:
            async with http.get(mesh.url + "/v1/audio/clone/languages") as response:
                if any(model["languages"] for model in (await response.json())["data"]):
                    break
            await asyncio.sleep(0.2)
    routes = IMAGE_ROUTES + AUDIO_ROUTES + VIDEO_ROUTES
    # The vision model is premium-only: a premium account pays nothing, but a hold is still checked.
    return {route.__name__: await new_customer(mesh, "50", premium=route is chat) for route in routes}


@pytest.mark.parametrize(("route", "name"), CASES, ids=[f"{route.__name__}-{name}" for route, name in CASES])
async def test_hostile_media_is_a_free_4xx_in_the_envelope(
    mesh: Mesh,
    http: aiohttp.ClientSession,
    customers: dict[str, Customer],
    route: Callable[[bytes], Request],
    name: str,
) -> None:
    customer = customers[route.__name__]
    before = await settled_books(mesh.ledger, customer.account_id)
    path, kwargs = route(KIND[route][name])
    async with http.post(mesh.url + path, headers=customer.headers, **kwargs) as response:
        text = await response.text()
        assert 400 <= response.status < 500, f"{path} {name}: {response.status} {text[:300]}"
        payload = await response.json()
    error = payload["error"]
    assert {"message", "type"} <= set(error) and error["message"], payload
    assert error["type"] == "invalid_request_error", payload
    after = await settled_books(mesh.ledger, customer.account_id)
    assert (after.balance, after.held, after.ledger_sum, after.open_holds) == (
        before.balance,
        0,
        before.ledger_sum,
        0,
    )


async def test_every_media_route_still_serves_and_decoding_memory_stayed_bounded(
    mesh: Mesh, http: aiohttp.ClientSession, customers: dict[str, Customer]
) -> None:
    """After the whole corpus: a normal request to every route succeeds; peak RSS is printed."""
    good: dict[Callable[[bytes], Request], bytes] = {
        image_edit: png_bytes(64, 64),
        segmentation: object_png(160, 120),
        image_background: object_png(160, 120),
        upscale: png_bytes(32, 32),
        chat: png_bytes(64, 48),
        image_to_video: png_bytes(208, 120),
        voice_clone: _wav(2.0),
        music_cover: _wav(1.0, 8000),
        music_repaint: _wav(1.0, 8000),
        video_background: moving_square_video(),
    }

    async def succeeds(route: Callable[[bytes], Request], media: bytes) -> str:
        path, kwargs = route(media)
        headers = customers[route.__name__].headers
        async with http.post(mesh.url + path, headers=headers, **kwargs) as response:
            body = await response.read()
            return f"{path} {response.status} {body[:300].decode(errors='replace')}"

    answers = await asyncio.gather(*(succeeds(route, media) for route, media in good.items()))
    assert all(answer.split()[1] == "200" for answer in answers), answers

    peaks = _decode_worker_peaks()
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"\npeak RSS of the test process (edge, billing and the services, models included): {own >> 20} MiB"
    )
    for pid, (parent, peak) in sorted(peaks.items()):
        print(f"peak RSS of decode worker {pid} (of pid {parent}): {peak >> 20} MiB")
    assert peaks, "no decode worker ran"
    assert max(peak for _, peak in peaks.values()) < MAX_WORKER_PEAK_BYTES


def _decode_worker_peaks() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, peak RSS in bytes) of every live decode worker under this process
    (the tts service's included: it runs as a child process with workers of its own)."""
    peaks: dict[int, tuple[int, int]] = {}
    for child in psutil.Process().children(recursive=True):
        try:
            if "spawn_main" not in " ".join(child.cmdline()):
                continue
            with open(f"/proc/{child.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        peaks[child.pid] = (child.ppid(), int(line.split()[1]) * 1024)
        except (psutil.NoSuchProcess, FileNotFoundError):
            continue
    return peaks
