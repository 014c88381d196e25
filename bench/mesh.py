"""Runs a whole Kiln mesh in a child process for the benchmarks (not a test).

``python -m bench.mesh --serve DATA_DIR [--split]`` runs every service (in this
process, or as `kiln serve` children with ``--split``; the tts service always
as a child on its own environment's Python), the edge and a bare aiohttp
handler on loopback, creates a demo account and a second standard account with
plenty of credits (and a premium one), and prints one JSON line: the ports and the API key.
:func:`running_mesh` starts such a child and yields that line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


async def serve_child(data_dir: Path, split: bool) -> None:
    import signal

    from aiohttp import web

    from edge.app import start_edge
    from kiln_cli.main import free_port, service_python, spawn_service
    from services.billing.admin import ensure_demo_account
    from services.billing.ledger import Ledger
    from services.billing.store import Database
    from services.catalog import CATALOG, capability
    from services.common.grpc_server import GrpcService
    from services.common.mesh_auth import mesh_secret, mesh_token
    from services.common.settings import load_settings

    settings = load_settings(data_dir=data_dir)
    services: list[GrpcService] = []
    children: dict[str, subprocess.Popen[bytes]] = {}
    names = tuple(entry.name for entry in CATALOG)
    if split:  # each service its own process, as `kiln up --split` runs them
        addresses = {name: f"127.0.0.1:{free_port()}" for name in names}
        env = {
            "KILN_DATA_DIR": str(data_dir),
            **{capability(n).address_variable: a for n, a in addresses.items()},
        }
        for name in names:
            children[name] = spawn_service(name, settings, env)
    else:
        addresses = {}
        for entry in CATALOG:
            if service_python(entry.name, settings) == sys.executable:
                services.append(await entry.create(settings, address="127.0.0.1:0"))
                addresses[entry.name] = f"127.0.0.1:{services[-1].port}"
        for service in services:
            await service.start()
        # A service on another environment's Python runs as a child (as `kiln up` runs it).
        for entry in CATALOG:
            if entry.name not in addresses:
                addresses[entry.name] = f"127.0.0.1:{free_port()}"
                children[entry.name] = spawn_service(
                    entry.name,
                    settings,
                    {"KILN_DATA_DIR": str(data_dir), entry.address_variable: addresses[entry.name]},
                )
    settings = settings.with_addresses(**addresses)
    db = await Database.open(settings.resolved_database_url)
    ledger = Ledger(db)
    _, key = await ensure_demo_account(ledger, api_key=None, credits=Decimal(10**7), premium=False)
    premium = await ledger.create_account("bench-premium", premium=True)  # chat is premium only
    _, premium_key = await ledger.create_api_key(premium.id)
    second = await ledger.create_account("bench-second", premium=False)  # a second standard account
    await ledger.add_credits(second.id, "10000000", kind="grant")
    _, second_key = await ledger.create_api_key(second.id)
    await db.close()

    edge, _ = await start_edge(settings, "127.0.0.1", 0, access_log=None)

    async def bare(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    bare_app = web.Application()
    bare_app.router.add_get("/bare", bare)
    bare_runner = web.AppRunner(bare_app, access_log=None)
    await bare_runner.setup()
    await web.TCPSite(bare_runner, "127.0.0.1", 0).start()
    info = {
        "edge": edge.addresses[0][1],
        "bare": bare_runner.addresses[0][1],
        "ports": {name: int(address.rsplit(":", 1)[1]) for name, address in addresses.items()},
        "key": key,
        "premium_key": premium_key,
        "second_key": second_key,
        # the mesh credential of a backend calling the services directly (see mesh_auth)
        "mesh_token": mesh_token(mesh_secret(settings), "bench"),
        # which process runs what (for memory readings): the edge is always this one
        "pids": {
            **{name: os.getpid() for name in ("edge", *names)},
            **{name: child.pid for name, child in children.items()},
        },
    }
    print(json.dumps(info), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for child in children.values():
        child.terminate()
        child.wait(timeout=30)
    for service in services:
        await service.stop(0)


@contextlib.contextmanager
def running_mesh(topology: str = "single", env: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """A mesh in a child process ("single": one process, "split": one per service)."""
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        child_env = {**os.environ, "HF_HUB_OFFLINE": "1", "KILN_LOG_LEVEL": "WARNING", **(env or {})}
        command = [sys.executable, "-m", "bench.mesh", "--serve", tmp] + (
            ["--split"] if topology == "split" else []
        )
        child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=child_env, cwd=ROOT)
        try:
            assert child.stdout is not None
            yield json.loads(child.stdout.readline())
        finally:
            child.terminate()
            child.wait(timeout=60)


async def wait_ready(http: Any, edge_url: str) -> None:
    """Waits until the edge says every service is ready (models built and loaded)."""
    for _ in range(1200):
        async with http.get(edge_url + "/readyz") as response:
            if response.status == 200:
                return
        await asyncio.sleep(0.1)
    raise RuntimeError("the mesh did not become ready")


async def wait_all_loaded(http: Any, edge_url: str) -> None:
    """Waits until no model of the mesh is still loading (``/readyz``'s ``models``): a model
    loading in the background (the tts clone model, say) would share the CPU with a benchmark."""
    await wait_ready(http, edge_url)
    for _ in range(6000):
        async with http.get(edge_url + "/readyz") as response:
            models = (await response.json()).get("models", {})
        if models and all(m.get("state") not in ("new", "loading") for m in models.values()):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError("the mesh's models did not finish loading")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", metavar="DATA_DIR", required=True)
    parser.add_argument("--split", action="store_true")
    args = parser.parse_args()
    asyncio.run(serve_child(Path(args.serve), args.split))


if __name__ == "__main__":
    main()
