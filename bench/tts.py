"""Speech and voice cloning: real-time factors of Piper and of Qwen3-TTS through the
edge, and time to the first audio byte of a streamed answer vs. the whole answer.

Not a test. Run with `.venv/bin/python bench/tts.py` (or `make bench`). A child
process runs the mesh (`bench/mesh.py`); this process asks POST
/v1/audio/speech for a multi-sentence text as streamed WAV and as MP3 (encoded
at the end), `--runs` times each, and prints medians: time to the first audio
byte, total time, seconds of audio, and the real-time factor (total time /
audio seconds; below 1 is faster than real time). Then the same for POST
/v1/audio/clone (Qwen3-TTS, the tiny random-weight build unless the registry
points at real weights) with a 3-second reference, ``stream`` true and false:
the streamed answer's first audio byte leaves after the first four codec frames
are decoded.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mesh import running_mesh, wait_ready  # noqa: E402

TEXT = (
    "Kiln serves generation models on your own machines. This sentence is the second one. "
    "Speech streams to the client one sentence at a time, so the first words play early. "
    "The last sentence closes the paragraph."
)
WAV_HEADER_BYTES = 44
CLONE_TEXT = "Kiln clones a voice from a short recording. This sentence is spoken in that voice."


def _reference_b64() -> str:
    import base64

    import numpy as np

    from services.common.media.audio import encode_audio

    t = np.arange(3 * 16000) / 16000
    pcm = (0.3 * np.sin(2 * np.pi * 180 * t) * 32767).astype("<i2").tobytes()
    return base64.b64encode(encode_audio(pcm, 16000, "wav")[0]).decode()


async def _timed(
    http: Any, url: str, body: dict[str, Any], headers: dict[str, str], skip: int
) -> tuple[float, float, int]:
    """(ms to the first byte after ``skip`` bytes, ms in all, bytes) of one POST."""
    started = time.perf_counter()
    got_first = 0.0
    size = 0
    async with http.post(url, json=body, headers=headers) as response:
        assert response.status == 200, await response.text()
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if not got_first and size > skip:
                got_first = time.perf_counter() - started
    return got_first * 1000, (time.perf_counter() - started) * 1000, size


def _report(label: str, first: list[float], total: list[float], audio: list[float]) -> None:
    line = (
        f"  {label}: first audio byte {statistics.median(first):7.1f} ms, "
        f"whole answer {statistics.median(total):7.1f} ms "
        f"(first/total {statistics.median(first) / statistics.median(total):.2f})"
    )
    if audio:
        seconds = statistics.median(audio)
        line += (
            f", {seconds:.2f} s of audio, real-time factor {statistics.median(total) / 1000 / seconds:.3f}"
        )
    print(line, flush=True)


async def _measure(info: dict[str, Any], runs: int) -> None:
    import aiohttp

    edge = f"http://127.0.0.1:{info['edge']}"
    headers = {"X-API-Key": str(info["key"]), "Accept-Encoding": "identity"}
    async with aiohttp.ClientSession() as http:
        await wait_ready(http, edge)
        print(f"Piper 'joe' (22.05 kHz) through the edge, median of {runs}:", flush=True)
        for fmt in ("wav", "mp3"):
            first: list[float] = []
            total: list[float] = []
            audio: list[float] = []
            for index in range(runs + 1):  # the first run warms up
                body = {"model": "tts-1", "voice": "alloy", "input": TEXT, "response_format": fmt}
                skip = WAV_HEADER_BYTES if fmt == "wav" else 0
                ms_first, ms_total, size = await _timed(http, edge + "/v1/audio/speech", body, headers, skip)
                if index:
                    first.append(ms_first)
                    total.append(ms_total)
                    if fmt == "wav":
                        audio.append((size - WAV_HEADER_BYTES) / 2 / 22050)
            _report(fmt, first, total, audio)
        await _wait_for_cloning(http, edge)
        print(f"Qwen3-TTS voice cloning (24 kHz) through the edge, median of {runs}:", flush=True)
        reference = _reference_b64()
        for stream in (True, False):
            first, total, audio = [], [], []
            for index in range(runs + 1):
                clone: dict[str, Any] = {
                    "text": CLONE_TEXT,
                    "ref_audio": reference,
                    "ref_text": "A reference recording.",
                    "stream": stream,
                    "seed": 1 + index,
                }
                ms_first, ms_total, size = await _timed(
                    http, edge + "/v1/audio/clone", clone, headers, WAV_HEADER_BYTES
                )
                if index:
                    first.append(ms_first)
                    total.append(ms_total)
                    audio.append((size - WAV_HEADER_BYTES) / 2 / 24000)
            _report("stream" if stream else "whole ", first, total, audio)


async def _wait_for_cloning(http: Any, edge: str) -> None:
    """The voice-cloning model loads after the default voice."""
    while True:
        async with http.get(edge + "/v1/audio/clone/languages") as response:
            if any(model["languages"] for model in (await response.json())["data"]):
                return
        await asyncio.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with running_mesh("single") as info:
        asyncio.run(_measure(info, args.runs))


if __name__ == "__main__":
    main()
