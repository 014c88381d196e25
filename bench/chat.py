"""Chat: total tokens/s with 8 concurrent streams vs. 1 (target >= 3x), and time to first token
through the edge vs. calling the llm service directly (target: within 10 ms), on the real
SmolLM2-135M-Instruct (the shipped registry: llama.cpp, ``services/llm/llamacpp.py``).
``bench/chat_peer.py`` compares the same model with llama.cpp's own server.

Not a test. Run with `.venv/bin/python bench/chat.py`.

Part 1 (direct) starts the llm service in a child process (``--serve-llm``:
the shipped registry, the model cache under ``--data-dir``, so SmolLM2's GGUF
is re-encoded on the first run only) and calls it over gRPC: time to
first token of lone requests, then the same number of tokens asked for by 1
stream and by 8 concurrent streams (sampled with fixed seeds, so answers
rarely end early); tokens/s counts the ``completion_tokens`` the service
reports.

The service runs with ``--torch-threads`` intra-op threads (default 1): that
is the transformers engines' setting (the Qwen3.5 model). On a 2-core host
torch's default (2 OpenMP threads, which spin-wait between operations)
starved the gRPC and event-loop threads that carry each token to the client.
llama.cpp's threads are the registry's ``threads`` option (default: every core).

Part 2 (edge) runs when the mesh of ``bench/mesh.py`` starts the llm service
(its JSON line has an ``llm`` port) and the edge serves ``POST
/v1/chat/completions``: it measures time to first content chunk over SSE
through the edge against the same request sent directly to that mesh's llm
service. Chat is premium only; pass a premium key with ``--api-key`` (or
``KILN_BENCH_PREMIUM_KEY``) when the mesh's demo account is not premium.
Otherwise the part says why it was skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPTS = (
    "Write a long story about a lighthouse keeper.",
    "Explain how a steam engine works, step by step.",
    "Describe a walk through a city at night.",
    "Write a letter to a friend about your holiday.",
    "List ideas for a birthday party and explain each.",
    "Tell the history of the bicycle.",
    "Describe the life of a honey bee.",
    "Write a travel guide to the mountains.",
)


def request(prompt: str, *, max_tokens: int, seed: int, greedy: bool = False) -> Any:
    from kiln.llm.v1 import llm_service_pb2 as pb

    return pb.ChatRequest(
        model=MODEL,
        messages=[pb.ChatMessage(role="user", content=[pb.ContentPart(text=prompt)])],
        max_tokens=max_tokens,
        temperature=0.0 if greedy else 0.8,
        seed=seed,
    )


async def stream(stub: Any, req: Any) -> tuple[float, int, float]:
    """(seconds to first delta, completion tokens, seconds in all) of one Chat call."""
    started = time.perf_counter()
    first = 0.0
    tokens = 0
    async for event in stub.Chat(req):
        kind = event.WhichOneof("event")
        if kind == "delta" and not first:
            first = time.perf_counter() - started
        elif kind == "end":
            tokens = event.end.usage.completion_tokens
    return first, tokens, time.perf_counter() - started


async def throughput(stub: Any, streams: int, total_tokens: int) -> float:
    """Tokens/s of ``total_tokens`` asked for across ``streams`` concurrent streams."""
    per_stream = total_tokens // streams
    started = time.perf_counter()
    results = await asyncio.gather(
        *(
            stream(stub, request(PROMPTS[i % len(PROMPTS)], max_tokens=per_stream, seed=i))
            for i in range(streams)
        )
    )
    elapsed = time.perf_counter() - started
    return sum(tokens for _, tokens, _ in results) / elapsed


async def direct_ttft(stub: Any, runs: int) -> float:
    """Median seconds to the first delta of lone, short requests."""
    times = [
        (await stream(stub, request("What is the capital of France?", max_tokens=4, seed=0, greedy=True)))[0]
        for _ in range(runs)
    ]
    return statistics.median(times)


async def part_direct(address: str, token: str, *, total_tokens: int, runs: int) -> dict[str, float]:
    from kiln.llm.v1 import llm_service_pb2_grpc as pb_grpc
    from services.common.grpc_client import create_channel

    async with create_channel(address, token=token) as channel:
        stub = pb_grpc.LlmServiceStub(channel)
        await stream(stub, request("Hi", max_tokens=8, seed=0))  # warm-up
        ttft = await direct_ttft(stub, runs)
        one = await throughput(stub, 1, total_tokens // 2)
        eight = await throughput(stub, 8, total_tokens)
    return {"ttft_ms": ttft * 1000, "tokens_per_s_1": one, "tokens_per_s_8": eight, "speedup": eight / one}


async def edge_ttft(edge_url: str, key: str, runs: int) -> float | str:
    """Median seconds to the first content chunk over SSE through the edge, or why not measured."""
    import aiohttp

    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
    }
    times = []
    async with aiohttp.ClientSession(headers={"X-API-Key": key}) as http:
        for _ in range(1200):  # SmolLM2 loads after the default model: 503 until then
            async with http.post(
                f"{edge_url}/v1/chat/completions", json=body | {"stream": False}
            ) as response:
                if response.status != 503:
                    break
            await asyncio.sleep(0.25)
        for _ in range(runs + 1):  # the first is a warm-up
            started = time.perf_counter()
            async with http.post(f"{edge_url}/v1/chat/completions", json=body) as response:
                if response.status != 200:
                    return f"the edge answered {response.status}: {(await response.text())[:200]}"
                first = 0.0
                async for line in response.content:
                    text = line.decode().strip()
                    if not text.startswith("data: ") or text == "data: [DONE]":
                        continue
                    chunk = json.loads(text[6:])
                    delta = (chunk.get("choices") or [{}])[0].get("delta", {})
                    if delta.get("content") and not first:
                        first = time.perf_counter() - started
                times.append(first)
    return statistics.median(times[1:])


async def part_edge(runs: int, api_key: str | None) -> dict[str, Any]:
    import aiohttp

    from bench.mesh import running_mesh, wait_ready
    from kiln.llm.v1 import llm_service_pb2_grpc as pb_grpc
    from services.common.grpc_client import create_channel

    # one torch thread: with two, OpenMP's spinning threads starve the gRPC ones (see part 1)
    with running_mesh("single", {"KILN_TORCH_THREADS": "1"}) as info:
        if "llm" not in info["ports"]:
            return {"skipped": "bench/mesh.py does not start the llm service yet (no 'llm' port)"}
        edge_url = f"http://127.0.0.1:{info['edge']}"
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, edge_url)
        through_edge = await edge_ttft(edge_url, api_key or info["premium_key"], runs)
        if isinstance(through_edge, str):
            return {"skipped": through_edge}
        async with create_channel(f"127.0.0.1:{info['ports']['llm']}", token=info["mesh_token"]) as channel:
            direct = await direct_ttft(pb_grpc.LlmServiceStub(channel), runs)
    return {
        "edge_ttft_ms": through_edge * 1000,
        "direct_ttft_ms": direct * 1000,
        "edge_overhead_ms": (through_edge - direct) * 1000,
    }


# --- the llm service in a child process ---


async def serve_llm(data_dir: Path) -> None:
    import signal

    from services.common.registry import load_registry
    from services.common.settings import load_settings
    from services.llm.engines import build_engine_pool
    from services.llm.server import AUTO_CHAT_BATCH, create_service

    settings = load_settings(data_dir=data_dir)
    registry = load_registry(settings.registry_path)
    pool = build_engine_pool(
        registry,
        cache_dir=settings.resolved_model_cache_dir,
        torch_threads=settings.torch_threads,
        max_batch=settings.batch_max_size or AUTO_CHAT_BATCH,
    )
    service = await create_service(settings, address="127.0.0.1:0", registry=registry, pool=pool)
    await service.start()
    await pool.wait_loaded()  # SmolLM2 included
    from services.common.mesh_auth import mesh_secret, mesh_token

    token = mesh_token(mesh_secret(settings), "bench")
    print(json.dumps({"port": service.port, "mesh_token": token}), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await service.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve-llm", metavar="DATA_DIR", help=argparse.SUPPRESS)
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "kiln-bench-chat",
        help="model cache root",
    )
    parser.add_argument("--tokens", type=int, default=512, help="tokens asked for by the 8-stream run")
    parser.add_argument("--runs", type=int, default=10, help="requests per time-to-first-token median")
    parser.add_argument("--api-key", default=os.environ.get("KILN_BENCH_PREMIUM_KEY"))
    parser.add_argument("--skip-edge", action="store_true")
    parser.add_argument(
        "--torch-threads",
        default=os.environ.get("KILN_TORCH_THREADS", "1"),
        help="the service's torch threads (default 1 on this 2-core host, see the docs)",
    )
    args = parser.parse_args()
    if args.serve_llm:
        asyncio.run(serve_llm(Path(args.serve_llm)))
        return

    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "KILN_LOG_LEVEL": "WARNING",
        "KILN_TORCH_THREADS": str(args.torch_threads),
    }
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.chat", "--serve-llm", str(args.data_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert child.stdout is not None
        served = json.loads(child.stdout.readline())
        direct = asyncio.run(
            part_direct(
                f"127.0.0.1:{served['port']}", served["mesh_token"], total_tokens=args.tokens, runs=args.runs
            )
        )
    finally:
        child.terminate()
        child.wait(timeout=60)
    print(f"direct gRPC, {MODEL}:")
    print(f"  time to first token (median of {args.runs}): {direct['ttft_ms']:.1f} ms")
    print(f"  1 stream:  {direct['tokens_per_s_1']:.1f} tokens/s")
    print(f"  8 streams: {direct['tokens_per_s_8']:.1f} tokens/s  ({direct['speedup']:.2f}x, target >= 3x)")
    if args.skip_edge:
        return
    edge = asyncio.run(part_edge(args.runs, args.api_key))
    if "skipped" in edge:
        print(f"edge vs direct time to first token: skipped ({edge['skipped']})")
    else:
        print(
            f"edge vs direct time to first token: {edge['edge_ttft_ms']:.1f} ms vs {edge['direct_ttft_ms']:.1f} ms "
            f"(+{edge['edge_overhead_ms']:.1f} ms, target <= 10 ms)"
        )


if __name__ == "__main__":
    main()
