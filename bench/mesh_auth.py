"""What the mesh credential costs a gRPC call: unary calls per second to a trivial handler.

Three servers on loopback, measured in the same run, each with the same echo
handler (so only the layers differ):

* **bare**: ``grpc.aio.server()`` and a plain channel (the baseline),
* **kiln, no credential**: the error interceptor only (what every call paid before),
* **kiln**: :func:`services.common.grpc_server.create_server`'s interceptors (the
  credential check, then errors), the token sent as call metadata (as the edge does),
* **kiln, token interceptor**: the same server; a channel made by ``create_channel(token=...)``
  adds the token (what scripts, tests and backends use).

Run: ``.venv/bin/python bench/mesh_auth.py [--seconds 1] [--rounds 7] [--concurrency 8]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

METHOD = "/bench.Echo/Call"


class _Echo(grpc.GenericRpcHandler):
    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return request

        return grpc.unary_unary_rpc_method_handler(call) if handler_call_details.method == METHOD else None


async def _serve(interceptors: list[Any]) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers([_Echo()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def _rate(
    channel: grpc.aio.Channel, seconds: float, concurrency: int, metadata: tuple[tuple[str, str], ...]
) -> float:
    call = channel.unary_unary(METHOD)
    payload = b"x" * 64
    for _ in range(50):  # warm-up
        await call(payload, metadata=metadata)
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await call(payload, metadata=metadata)
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - start)


async def main(seconds: float, concurrency: int, rounds: int) -> None:
    from services.common.grpc_client import create_channel
    from services.common.grpc_server import ErrorInterceptor
    from services.common.mesh_auth import MeshAuthInterceptor, mesh_secret, mesh_token
    from services.common.settings import Settings

    secret = mesh_secret(Settings(data_dir=Path(tempfile.mkdtemp(prefix="kiln-bench-mesh-"))))
    token = mesh_token(secret, "bench")
    auth = (("authorization", f"Bearer {token}"),)
    kiln = [MeshAuthInterceptor(secret), ErrorInterceptor()]
    plain = grpc.aio.insecure_channel
    setups: dict[str, tuple[list[Any], Callable[[str], grpc.aio.Channel], tuple[tuple[str, str], ...]]] = {
        "bare": ([], plain, ()),
        "kiln, no credential": ([ErrorInterceptor()], plain, ()),
        "kiln": (kiln, plain, auth),
        "kiln, token interceptor": (kiln, lambda address: create_channel(address, token=token), ()),
    }
    servers = {name: await _serve(interceptors) for name, (interceptors, _, _) in setups.items()}
    channels = {name: setups[name][1](f"127.0.0.1:{port}") for name, (_, port) in servers.items()}
    samples: dict[str, dict[int, list[float]]] = {name: {1: [], concurrency: []} for name in setups}
    # Interleaved rounds, medians: a busy neighbour slows every setup alike.
    for _ in range(rounds):
        for name, channel in channels.items():
            for callers in (1, concurrency):
                samples[name][callers].append(await _rate(channel, seconds, callers, setups[name][2]))
    for name in setups:
        await channels[name].close()
        await servers[name][0].stop(0)
    rates = {name: {c: statistics.median(v) for c, v in by.items()} for name, by in samples.items()}
    print(
        f"unary calls/s to an echo handler on loopback (median of {rounds} interleaved {seconds:g} s runs):"
    )
    print(
        f"{'server':24} {'1 caller':>10} {f'{concurrency} callers':>11} {'vs bare':>8} {'vs no credential':>17}"
    )
    for name, by in rates.items():
        ratio_bare = by[concurrency] / rates["bare"][concurrency]
        ratio_plain = by[concurrency] / rates["kiln, no credential"][concurrency]
        print(f"{name:24} {by[1]:10.0f} {by[concurrency]:11.0f} {ratio_bare:7.2f}x {ratio_plain:16.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.concurrency, args.rounds))
