"""Video background removal: frames per second on a 10 s 480p clip, and peak memory
for a 10 s vs. a 60 s clip (flat memory is the target: growth < 300 MB).

Not a test. Run with `.venv/bin/python bench/segmentation.py` (or `make bench`).
Each clip gets a fresh mesh with one process per service (`bench/mesh.py`,
split), so the segmentation service's and the edge's peak resident memory
(VmHWM from /proc) belong to that clip alone. The clips (H.264 MP4, 854x480,
24 fps, a moving object) are made with PyAV and streamed from disk.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mesh import running_mesh, wait_ready  # noqa: E402

WIDTH, HEIGHT, RATE = 854, 480, 24


def make_clip(path: Path, seconds: int) -> int:
    """Writes an MP4 of a disc moving over a gradient; returns its frame count."""
    import av
    import numpy as np

    frames = seconds * RATE
    background = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    background[..., 0] = np.linspace(40, 200, WIDTH, dtype=np.uint8)[None, :]
    background[..., 1] = np.linspace(60, 160, HEIGHT, dtype=np.uint8)[:, None]
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=RATE, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for index in range(frames):
            pixels = background.copy()
            cx = 80 + (index * 7) % (WIDTH - 160)
            pixels[(xx - cx) ** 2 + (yy - HEIGHT // 2) ** 2 < 70**2] = (230, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return frames


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _run(info: dict[str, Any], clip: Path) -> dict[str, float]:
    import aiohttp

    edge = f"http://127.0.0.1:{info['edge']}"
    pids = info["pids"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as http:
        await wait_ready(http, edge)
        before = {name: peak_rss_mb(pids[name]) for name in ("segmentation", "edge")}
        with open(clip, "rb") as fh:  # noqa: ASYNC230 - aiohttp streams it in chunks
            form = aiohttp.FormData()
            form.add_field("prompt", "the red disc")
            form.add_field("file", fh, filename=clip.name, content_type="video/mp4")
            start = time.perf_counter()
            async with http.post(
                edge + "/v1/videos/remove-background", data=form, headers={"X-API-Key": str(info["key"])}
            ) as response:
                assert response.status == 200, await response.text()
                size = 0
                async for chunk in response.content.iter_chunked(1 << 20):
                    size += len(chunk)
                processed = int(response.headers["X-Frames-Processed"])
                charged = int(response.headers["X-Frames-Charged"])
            seconds = time.perf_counter() - start
    after = {name: peak_rss_mb(pids[name]) for name in ("segmentation", "edge")}
    return {
        "frames": processed,
        "charged": charged,
        "seconds": seconds,
        "fps": processed / seconds,
        "output_mb": size / 2**20,
        "seg_before": before["segmentation"],
        "seg_peak": after["segmentation"],
        "edge_before": before["edge"],
        "edge_peak": after["edge"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", type=int, default=10, help="seconds of the short clip")
    parser.add_argument("--long", type=int, default=60, help="seconds of the long clip")
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=0.0,
        help="sam3 score threshold for the run; 0 counts every frame as found (the full path: "
        "compose and encode alpha, charge every frame), the tiny random model finds little at 0.5",
    )
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="kiln-seg-bench-") as tmp:
        from services.common.settings import DEFAULT_REGISTRY

        registry = Path(tmp) / "registry.toml"
        registry.write_text(
            DEFAULT_REGISTRY.read_text().replace(
                "score_threshold = 0.5", f"score_threshold = {args.score_threshold}"
            )
        )
        for seconds in (args.short, args.long):
            clip = Path(tmp) / f"clip_{seconds}s.mp4"
            frames = make_clip(clip, seconds)
            print(
                f"clip: {seconds} s, {frames} frames, {WIDTH}x{HEIGHT} @ {RATE} fps, {clip.stat().st_size / 2**20:.1f} MiB"
            )
            with running_mesh("split", {"KILN_REGISTRY_PATH": str(registry)}) as info:
                results[seconds] = result = asyncio.run(_run(info, clip))
            print(
                f"  {result['frames']:.0f} frames in {result['seconds']:.1f} s = {result['fps']:.1f} fps "
                f"({result['charged']:.0f} charged), output {result['output_mb']:.1f} MiB; peak RSS "
                f"segmentation {result['seg_before']:.0f} -> {result['seg_peak']:.0f} MB, "
                f"edge {result['edge_before']:.0f} -> {result['edge_peak']:.0f} MB"
            )
    short, long = results[args.short], results[args.long]
    for name in ("seg", "edge"):
        growth = long[f"{name}_peak"] - short[f"{name}_peak"]
        label = "segmentation" if name == "seg" else "edge"
        verdict = "meets" if growth < 300 else "misses"
        print(
            f"{label}: peak RSS {args.long} s clip vs {args.short} s clip: +{growth:.0f} MB "
            f"(ratio {long[f'{name}_peak'] / short[f'{name}_peak']:.2f}); target < 300 MB: {verdict}"
        )
    print(f"throughput ratio {args.long} s vs {args.short} s clip: {long['fps'] / short['fps']:.2f}")


if __name__ == "__main__":
    main()
