"""Speech: real-time factor of Piper through the edge, and time to the first audio byte
of a streamed answer vs. the whole answer.

Not a test. Run with `.venv/bin/python bench/tts.py` (or `make bench`). A child
process runs the mesh (`bench/mesh.py`); this process asks POST
/v1/audio/speech for a multi-sentence text as streamed WAV and as MP3 (encoded
at the end), `--runs` times each, and prints medians: time to the first audio
byte, total time, seconds of audio, and the real-time factor (total time /
audio seconds; below 1 is faster than real time). Voice cloning (Qwen3-TTS) is
not served yet, so it has no figures here.
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


async def _measure(info: dict[str, Any], runs: int) -> None:
    import aiohttp

    edge = f"http://127.0.0.1:{info['edge']}"
    headers = {"X-API-Key": str(info["key"]), "Accept-Encoding": "identity"}
    async with aiohttp.ClientSession() as http:
        await wait_ready(http, edge)
        for fmt in ("wav", "mp3"):
            first: list[float] = []
            total: list[float] = []
            audio: list[float] = []
            for index in range(runs + 1):  # the first run warms up
                body = {"model": "tts-1", "voice": "alloy", "input": TEXT, "response_format": fmt}
                started = time.perf_counter()
                got_first = 0.0
                size = 0
                async with http.post(edge + "/v1/audio/speech", json=body, headers=headers) as response:
                    assert response.status == 200, await response.text()
                    async for chunk in response.content.iter_any():
                        size += len(chunk)
                        if not got_first and size > (WAV_HEADER_BYTES if fmt == "wav" else 0):
                            got_first = time.perf_counter() - started
                elapsed = time.perf_counter() - started
                if index:
                    first.append(got_first * 1000)
                    total.append(elapsed * 1000)
                    if fmt == "wav":
                        audio.append((size - WAV_HEADER_BYTES) / 2 / 22050)
            line = (
                f"  {fmt}: first audio byte {statistics.median(first):7.1f} ms, "
                f"whole answer {statistics.median(total):7.1f} ms "
                f"(first/total {statistics.median(first) / statistics.median(total):.2f})"
            )
            if audio:
                seconds = statistics.median(audio)
                line += f", {seconds:.2f} s of audio, real-time factor {statistics.median(total) / 1000 / seconds:.3f}"
            print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"Piper 'joe' (22.05 kHz) through the edge, median of {args.runs}:")
    with running_mesh("single") as info:
        asyncio.run(_measure(info, args.runs))


if __name__ == "__main__":
    main()
