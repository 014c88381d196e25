"""Fair admission: one account floods a model while another sends one request at a time.

Not a test. Run with `make bench` (or `.venv/bin/python bench/fairness.py`). A child
process runs the mesh in one process (``bench.mesh``); this process is the client. The
work is a small text-to-image generation (``--model``, ``--size``, ``--steps``: the tiny
random-weight z-image-turbo at 256x256 and 2 steps by default, tens of ms of engine time
on one worker, so the engine's queue is what a request waits for). Two standard accounts
(the mesh's demo key and its second key):

1. **Solo.** The quiet account sends ``-n`` requests one at a time, nothing else running:
   its p50/p99 latency.
2. **Flood.** The other account keeps ``--concurrency`` requests in flight (a closed loop)
   while the quiet account again sends ``-n`` requests one at a time: the quiet account's
   p50/p99, their ratio to solo (the goal: p99 at most 2x solo), and the flooding
   account's throughput over the same window (and any 429s it got).

Both are measured twice in the same run, on two meshes that differ only in
``KILN_ENGINE_FAIR_ADMISSION``: fair queuing (the default) and first come, first served
(the baseline). The meshes share one model cache, so the tiny model is built once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mesh import running_mesh  # noqa: E402


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _until_idle(pid: int, *, below: float = 0.15, limit: float = 600.0) -> float:
    """Waits until ``pid`` uses less than ``below`` of a core over a second; the seconds waited."""
    started = time.perf_counter()
    before = _cpu_seconds(pid)
    while time.perf_counter() - started < limit:
        await asyncio.sleep(1.0)
        now = _cpu_seconds(pid)
        if now - before < below:
            break
        before = now
    return time.perf_counter() - started


async def _measure(info: dict[str, Any], args: argparse.Namespace, label: str) -> dict[str, float]:
    import aiohttp

    edge = f"http://127.0.0.1:{info['edge']}"
    body = {
        "model": args.model,
        "prompt": "a lighthouse at dusk",
        "size": args.size,
        "num_inference_steps": args.steps,
        "seed": 1,
    }
    flooder = {"X-API-Key": str(info["key"])}
    quiet = {"X-API-Key": str(info["second_key"])}
    connector = aiohttp.TCPConnector(limit=args.concurrency + 4)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def generate(headers: dict[str, str]) -> int:
            async with http.post(edge + "/v1/images/generations", json=body, headers=headers) as response:
                await response.read()
                if response.status not in (200, 429):
                    raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
                return response.status

        # Ready when the model answers, and the mesh's other models are no longer loading (they
        # are built on first start and would take the CPU); not /readyz's 200 alone, which a
        # service that cannot start on this host would never give.
        for _ in range(3000):
            try:
                await generate(quiet)
                break
            except (RuntimeError, aiohttp.ClientError):
                await asyncio.sleep(0.1)
        for _ in range(600):
            async with http.get(edge + "/readyz") as response:
                ready = await response.json()
            models = ready.get("models", {}).values()
            if response.status == 200 or (
                models and all(m["state"] not in ("new", "loading") for m in models)
            ):
                break
            await asyncio.sleep(0.5)
        # ... and the mesh process is idle: the first mesh builds every service's tiny models in
        # the background (the image service builds its other models after the default one), the
        # second loads them from the shared cache; measuring during the build would favour
        # whichever configuration runs second.
        waited = await _until_idle(int(info["pids"]["edge"]))
        print(f"  ({label}: mesh idle after {waited:.0f} s more)", flush=True)

        async def one_at_a_time(n: int) -> list[float]:
            latencies = []
            for _ in range(n):
                started = time.perf_counter()
                await generate(quiet)
                latencies.append((time.perf_counter() - started) * 1000)
            return latencies

        for _ in range(10):  # warm-up: first runs, connections
            await generate(quiet)
        solo = await one_at_a_time(args.requests)

        done = refused = 0
        stop = asyncio.Event()

        async def flood() -> None:
            nonlocal done, refused
            while not stop.is_set():
                if await generate(flooder) == 429:
                    refused += 1
                else:
                    done += 1

        workers = [asyncio.create_task(flood()) for _ in range(args.concurrency)]
        await asyncio.sleep(args.settle)  # the queue fills up
        done = refused = 0
        window = time.perf_counter()
        flooded = await one_at_a_time(args.requests)
        window = time.perf_counter() - window
        throughput, refused_rate = done / window, refused / window
        stop.set()
        await asyncio.gather(*workers)
    return {
        "solo_p50": statistics.median(solo),
        "solo_p99": percentile(solo, 99),
        "flood_p50": statistics.median(flooded),
        "flood_p99": percentile(flooded, 99),
        "throughput": throughput,
        "refused": refused_rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--requests", type=int, default=20, help="quiet requests per phase")
    parser.add_argument(
        "--concurrency", type=int, default=16, help="the flooding account's requests in flight"
    )
    parser.add_argument("--model", default="z-image-turbo")
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--settle", type=float, default=1.0, help="seconds of flood before measuring")
    args = parser.parse_args()
    print(
        f"fair admission: {args.model} {args.size}, {args.steps} steps; quiet account one at a time "
        f"({args.requests} requests per phase), flooding account {args.concurrency} in flight"
    )
    print(
        f"{'admission':<10} {'solo p50':>9} {'solo p99':>9} {'flood p50':>10} {'flood p99':>10} "
        f"{'p99 ratio':>9} {'flood req/s':>11} {'429/s':>6}"
    )
    with tempfile.TemporaryDirectory(prefix="kiln-fairness-models-") as cache:
        for label, fair in (("fair", "true"), ("fifo", "false")):
            env = {"KILN_ENGINE_FAIR_ADMISSION": fair, "KILN_MODEL_CACHE_DIR": cache}
            with running_mesh("single", env) as info:
                r = asyncio.run(_measure(info, args, label))
            print(
                f"{label:<10} {r['solo_p50']:>7.0f}ms {r['solo_p99']:>7.0f}ms {r['flood_p50']:>8.0f}ms "
                f"{r['flood_p99']:>8.0f}ms {r['flood_p99'] / r['solo_p99']:>8.1f}x "
                f"{r['throughput']:>11.1f} {r['refused']:>6.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
