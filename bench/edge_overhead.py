"""What the edge costs: the same request through the edge vs. straight to the service.

Not a test. Run with `make bench` (or `.venv/bin/python bench/edge_overhead.py`).
A child process runs the mesh plus a bare aiohttp handler on loopback, in
both topologies `kiln` offers: everything in one process (`kiln up`) and one
process per service (`kiln up --split`, as in production). This process is
the client and measures, one request at a time:

  1. the same small generation (256x256, 1 step, fixed seed) through
     POST /v1/images/generations (auth + reservation + gRPC + media store +
     base64 + commit) vs. the GenerateImages RPC called directly;
  2. the authenticated no-op route GET /v1/account (one billing call) vs. a
     bare aiohttp handler;
  3. throughput of case 1 with several concurrent clients, edge vs. direct.

It prints p50/p99 of each, the differences and the ratios, measured in one run.
On an idle VM every loopback round trip after a pause is slower (here an
in-process aiohttp round trip took 0.10 ms back to back and 0.45 ms after
30 ms idle; a gRPC one 0.15 and 0.80 ms): the sequential case pays that on
each of the edge's extra calls, the concurrent one mostly does not.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mesh import running_mesh, wait_ready  # noqa: E402


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    await fn()
    return (time.perf_counter() - start) * 1000


async def _measure_pair(labels: tuple[str, str], ours, base, n: int, warmup: int) -> float:  # type: ignore[no-untyped-def]
    """Runs the two cases alternately (so drift hits both alike) and prints both and the gap."""
    for _ in range(warmup):
        await ours()
        await base()
    a: list[float] = []
    b: list[float] = []
    for i in range(n):
        if i % 2:
            a.append(await _timed(ours))
            b.append(await _timed(base))
        else:
            b.append(await _timed(base))
            a.append(await _timed(ours))
    for label, samples in zip(labels, (a, b), strict=True):
        print(
            f"  {label:<46} p50 {percentile(samples, 50):8.3f} ms   p99 {percentile(samples, 99):8.3f} ms"
            f"   mean {statistics.fmean(samples):8.3f} ms"
        )
    for q in (50, 99):
        x, y = percentile(a, q), percentile(b, q)
        print(f"  -> p{q}: +{x - y:.3f} ms over the baseline, ratio {x / y:.3f}")
    paired = statistics.median(x - y for x, y in zip(a, b, strict=True))
    print(f"  -> median of paired differences: +{paired:.3f} ms", flush=True)
    return percentile(a, 50) - percentile(b, 50)


async def _throughput(label: str, fn, concurrency: int, seconds: float) -> float:  # type: ignore[no-untyped-def]
    """Requests per second and latency with `concurrency` clients in a closed loop."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            latencies.append(await _timed(fn))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    rate = len(latencies) / (time.perf_counter() - start)
    print(
        f"  {label:<46} {rate:7.1f} req/s   p50 {percentile(latencies, 50):8.3f} ms"
        f"   p99 {percentile(latencies, 99):8.3f} ms"
    )
    return rate


async def _client(
    info: dict[str, object], n: int, warmup: int, concurrency: int = 4, seconds: float = 10.0
) -> None:
    import aiohttp

    from kiln.image.v1 import image_service_pb2 as image_pb
    from kiln.image.v1 import image_service_pb2_grpc as image_grpc
    from services.common.grpc_client import create_channel

    edge = f"http://127.0.0.1:{info['edge']}"
    headers = {"X-API-Key": str(info["key"])}
    prompt = "a small red fox"
    body = {"prompt": prompt, "size": "256x256", "num_inference_steps": 1, "seed": 42}
    direct_request = image_pb.GenerateImagesRequest(
        model="z-image-turbo", prompt=prompt, width=256, height=256, num_inference_steps=1, seed=42
    )
    async with (
        aiohttp.ClientSession() as http,
        create_channel(
            f"127.0.0.1:{cast(dict[str, int], info['ports'])['image_gen']}", token=str(info["mesh_token"])
        ) as ch,
    ):
        stub = image_grpc.ImageServiceStub(ch)
        await wait_ready(http, edge)

        async def via_edge(encoding: str = "identity") -> None:
            # identity: the gRPC baseline is not compressed either; gzip is measured apart
            request_headers = {**headers, "Accept-Encoding": encoding}
            async with http.post(
                edge + "/v1/images/generations", json=body, headers=request_headers
            ) as response:
                assert response.status == 200, await response.text()
                await response.read()

        async def via_edge_gzip() -> None:
            await via_edge("gzip")

        async def direct() -> None:
            async for event in stub.GenerateImages(direct_request):
                if event.HasField("result"):
                    assert event.result.images

        async def account() -> None:
            async with http.get(edge + "/v1/account", headers=headers) as response:
                assert response.status == 200
                await response.read()

        async def bare() -> None:
            async with http.get(f"http://127.0.0.1:{info['bare']}/bare") as response:
                assert response.status == 200
                await response.read()

        print(f"\nsequential requests, n={n} per case after {warmup} warm-up, cases alternated, loopback")
        print("1) the same 256x256 1-step generation (b64_json and url in the response)")
        overhead = await _measure_pair(
            ("through the edge (HTTP, auth, reserve, store)", "direct gRPC GenerateImages (baseline)"),
            via_edge,
            direct,
            n,
            warmup,
        )
        print("1b) the same through the edge with Accept-Encoding: gzip (what SDK clients send)")
        await _measure_pair(
            ("edge, gzip response", "edge, identity (baseline)"), via_edge_gzip, via_edge, n // 2, warmup
        )
        print("2) authenticated no-op vs bare handler")
        await _measure_pair(
            ("GET /v1/account (auth via billing)", "bare aiohttp handler (baseline)"),
            account,
            bare,
            n,
            warmup,
        )
        verdict = "meets" if overhead <= 2.0 else "misses"
        print(f"  target: edge adds <= 2 ms p50 over direct gRPC -> {overhead:.3f} ms ({verdict})")
        print(f"3) {concurrency} concurrent clients for {seconds:.0f} s each (the engine is the bottleneck)")
        edge_rate = await _throughput("through the edge", via_edge, concurrency, seconds)
        direct_rate = await _throughput("direct gRPC (baseline)", direct, concurrency, seconds)
        print(f"  -> throughput ratio edge/direct {edge_rate / direct_rate:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=200, help="measured requests per case")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4, help="clients in the throughput case")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each throughput case")
    parser.add_argument(
        "--topology", choices=("split", "single", "both"), default="both", help="process layout to measure"
    )
    args = parser.parse_args()
    topologies = ("single", "split") if args.topology == "both" else (args.topology,)
    title = {"single": "one process (kiln up)", "split": "one process per service (kiln up --split)"}
    for topology in topologies:
        print(f"\n=== {title[topology]} ===")
        with running_mesh(topology) as info:
            asyncio.run(_client(info, args.n, args.warmup, args.concurrency, args.seconds))


if __name__ == "__main__":
    main()
