"""Money under faults, through the real mesh: a commit slower than the edge's timeout, a
capability process killed mid-generation, clients that leave at random points of a stream,
SIGTERM with requests in flight, and a conservation run of concurrent mixed requests with
injected service errors and disconnects. Each runs on SQLite and on PostgreSQL (the mesh's
two databases).

After each: the balance equals start minus what the completed answers said they charged,
no hold is left, the ledger rows sum to the balance, and no client both paid and got an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from kiln_cli.main import free_port, spawn_service, stop_in_order
from services.billing.ledger import Ledger
from services.catalog import CATALOG
from tests.conftest import Mesh, new_customer
from tests.edge.images_util import b64, png_bytes
from tests.stack import (
    ChaosProxy,
    billing_service,
    edge_app,
    eventually,
    settled_books,
    units,
    wait_for_hold,
)

GEN = "/v1/images/generations"
SPEECH = "/v1/audio/speech"
IMAGE_256 = 29
LONG_TEXT = " ".join(["Kiln speaks this sentence slowly, one clause after another."] * 12)


async def reservation_states(ledger: Ledger, account_id: str) -> dict[str, tuple[str, int]]:
    """trace id (the request's X-Request-ID) -> (state, charged) of its hold."""
    rows = await ledger.db.run(
        lambda tx: tx.all(
            "SELECT request_id, state, charged FROM reservations WHERE account_id = ?", (account_id,)
        ),
        write=False,
    )
    return {str(r[0]): (str(r[1]), int(r[2])) for r in rows}


# --- billing slower than the edge ---


@contextlib.asynccontextmanager
async def slow_commit_edge(mesh: Mesh, *, delay: float, after: bool) -> AsyncIterator[tuple[str, Ledger]]:
    """An edge whose billing takes ``delay`` s over every Commit (before or after it lands),
    with a billing deadline of 0.3 s."""
    async with billing_service(mesh.settings) as billing:
        ledger = billing.ledger
        assert ledger is not None
        real_commit = ledger.commit

        async def slow(*args: Any, **kwargs: Any) -> Any:
            if not after:
                await asyncio.sleep(delay)
            result = await real_commit(*args, **kwargs)
            if after:
                await asyncio.sleep(delay)
            return result

        ledger.commit = slow  # type: ignore[method-assign]
        settings = mesh.settings.with_addresses(billing=f"127.0.0.1:{billing.port}").model_copy(
            update={"billing_timeout_seconds": 0.3}
        )
        async with edge_app(settings) as edge:
            yield edge.url, ledger


async def test_a_commit_answered_after_the_edge_timeout_is_charged_once_and_answered(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "10")
    async with slow_commit_edge(mesh, delay=0.6, after=True) as (url, ledger):
        body = {"prompt": "a kiln", "size": "256x256"}
        async with http.post(url + GEN, json=body, headers=customer.headers) as response:
            assert response.status == 200, await response.text()
            assert response.headers["X-Credits-Charged"] == "0.29"
        state = await settled_books(ledger, customer.account_id)
    assert (state.balance, state.held, state.open_holds) == (1000 - IMAGE_256, 0, 0)
    assert state.ledger_sum == state.balance


async def test_a_commit_that_never_lands_in_time_is_a_500_that_costs_nothing(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "10")
    async with slow_commit_edge(mesh, delay=30, after=False) as (url, ledger):
        body = {"prompt": "a kiln", "size": "256x256"}
        async with http.post(url + GEN, json=body, headers=customer.headers) as response:
            assert response.status == 500
            assert (await response.json())["error"]["type"] == "processing_error"
        state = await settled_books(ledger, customer.account_id)
    assert (state.balance, state.held, state.open_holds) == (1000, 0, 0)
    assert list((await reservation_states(mesh.ledger, customer.account_id)).values()) == [("released", 0)]


# --- a capability process killed mid-generation ---


async def test_killing_the_image_service_mid_generation_charges_nothing(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    child = spawn_service(
        "image_gen",
        mesh.settings,
        {
            "KILN_DATA_DIR": str(mesh.settings.data_dir),
            "KILN_MODEL_CACHE_DIR": str(mesh.settings.model_cache_dir),
            "KILN_REGISTRY_PATH": str(mesh.settings.registry_path),
            "KILN_IMAGE_GEN_ADDRESS": f"127.0.0.1:{port}",
            "KILN_TORCH_THREADS": "1",
            "KILN_LOG_LEVEL": "WARNING",
        },
    )
    try:
        settings = mesh.settings.with_addresses(image_gen=f"127.0.0.1:{port}")
        async with edge_app(settings) as edge:
            for _ in range(600):
                async with http.get(edge.url + "/readyz") as ready:
                    if ready.status == 200:
                        break
                await asyncio.sleep(0.1)
            customer = await new_customer(mesh, "10")
            body = {"prompt": "a long job", "size": "1024x1024", "n": 4}
            request = asyncio.create_task(http.post(edge.url + GEN, json=body, headers=customer.headers))
            await wait_for_hold(mesh.ledger, customer.account_id)
            await asyncio.sleep(0.3)  # generating
            child.kill()
            async with await request as response:
                assert response.status == 500
                assert (await response.json())["error"]["type"] == "processing_error"
            state = await settled_books(mesh.ledger, customer.account_id)
            assert (state.balance, state.held, state.open_holds) == (1000, 0, 0)
    finally:
        child.kill()
        await asyncio.to_thread(child.wait, 30)


# --- clients leaving streams at random points ---


async def test_clients_leaving_a_stream_at_random_points_pay_only_for_streams_they_finished(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh, "10")
    body = {"model": "tts-1", "voice": "alloy", "input": LONG_TEXT, "response_format": "pcm"}
    async with http.post(mesh.url + SPEECH, json=body, headers=customer.headers) as response:
        full = len(await response.read())
    rng = random.Random(13)
    finished = 1
    for index in range(6):
        # A third read to the end; the others leave in the first quarter, while the speech is
        # still being made (a client that leaves after the last chunk was written has paid).
        leave_at = rng.randrange(0, full // 4) if index % 3 else None
        headers = customer.headers | {"X-Request-ID": f"leaver-{index}"}
        async with http.post(mesh.url + SPEECH, json=body, headers=headers) as response:
            assert response.status == 200
            if leave_at is None:
                assert len(await response.read()) > full // 2  # Piper varies the length a little
                finished += 1
                continue
            if leave_at:
                await response.content.readexactly(leave_at)
            response.close()  # gone
    state = await settled_books(mesh.ledger, customer.account_id)
    assert (state.balance, state.held, state.open_holds) == (1000 - 10 * finished, 0, 0)
    assert state.ledger_sum == state.balance


# --- SIGTERM with requests in flight ---


async def test_sigterm_lets_in_flight_requests_finish_or_releases_them(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    settings = mesh.settings
    child = spawn_service(
        "edge",
        settings,
        {
            "KILN_DATA_DIR": str(settings.data_dir),
            "KILN_REGISTRY_PATH": str(settings.registry_path),
            "KILN_HTTP_PORT": str(port),
            "KILN_GRACE_SECONDS": "3",
            "KILN_LOG_LEVEL": "WARNING",
            **{entry.address_variable: settings.address(entry.name) for entry in CATALOG},
        },
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url + "/healthz") as health:
                    if health.status == 200:
                        break
            await asyncio.sleep(0.1)
        customer = await new_customer(mesh, "100")

        async def one(index: int, path: str, body: dict[str, Any]) -> tuple[int, str]:
            headers = customer.headers | {"X-Request-ID": f"sigterm-{index}"}
            try:
                async with http.post(url + path, json=body, headers=headers) as response:
                    await response.read()
                    return response.status, response.headers.get("X-Credits-Charged", "0")
            except aiohttp.ClientError:
                return 0, "0"

        # Three quick images finish within the grace period; a 600-second song cannot.
        jobs: list[tuple[str, dict[str, Any]]] = [
            (GEN, {"prompt": f"quick {i}", "size": "256x256"}) for i in range(3)
        ]
        jobs.append(("/v1/music/generate", {"prompt": "a long song", "duration": 600, "instrumental": True}))
        tasks = [asyncio.create_task(one(i, path, body)) for i, (path, body) in enumerate(jobs)]

        async def all_held() -> bool:
            return len(await reservation_states(mesh.ledger, customer.account_id)) == len(jobs)

        await eventually(all_held, "every job's hold")
        child.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*tasks)
        assert await asyncio.to_thread(child.wait, 30) == 0
        state = await settled_books(mesh.ledger, customer.account_id)
        assert [status for status, _ in results[:3]] == [200, 200, 200]
        assert results[3][0] != 200
        paid = sum(units(charged) for status, charged in results if status == 200)
        assert (paid, state.held, state.open_holds) == (3 * IMAGE_256, 0, 0)
        assert state.balance == 10_000 - paid and state.ledger_sum == state.balance
        holds = await reservation_states(mesh.ledger, customer.account_id)
        assert sorted(state for state, _ in holds.values()) == ["committed"] * 3 + ["released"]
    finally:
        if child.poll() is None:
            child.kill()
        await asyncio.to_thread(child.wait, 30)


def test_split_mode_stops_the_edge_first_and_billing_last(tmp_path: Any) -> None:
    log = tmp_path / "order.log"
    script = (
        "import signal, sys, time\n"
        "def stop(*_):\n"
        f"    open({str(log)!r}, 'a').write(sys.argv[1] + '\\n'); time.sleep(0.2); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "time.sleep(60)\n"
    )
    names = ["billing", "music", "edge", "image_gen"]
    children = {name: subprocess.Popen([sys.executable, "-c", script, name]) for name in names}
    time.sleep(0.5)
    stop_in_order(children, grace_seconds=5)
    order = log.read_text().split()
    assert order[0] == "edge" and order[-1] == "billing" and sorted(order[1:3]) == ["image_gen", "music"]


# --- the conservation run ---


@dataclass
class Outcome:
    trace: str
    status: int  # 0: the client left
    charged: int


async def conservation_run(mesh: Mesh, database_url: str, count: int, seed: int) -> None:
    rng = random.Random(seed)
    proxies = {
        name: ChaosProxy(mesh.settings.address(name), failure_rate=0.15, seed=seed + i)
        for i, name in enumerate(("image_gen", "upscale", "tts", "music"))
    }
    for proxy in proxies.values():
        await proxy.start()
    settings = mesh.settings.model_copy(update={"database_url": database_url})
    try:
        async with billing_service(settings) as billing:
            ledger = billing.ledger
            assert ledger is not None
            account = await ledger.create_account("conservation")
            await ledger.add_credits(account.id, 1000, kind="grant")
            _, key = await ledger.create_api_key(account.id)
            edge_settings = settings.with_addresses(
                billing=f"127.0.0.1:{billing.port}",
                **{name: f"127.0.0.1:{p.port}" for name, p in proxies.items()},
            )
            async with edge_app(edge_settings) as edge:
                connector = aiohttp.TCPConnector(limit=0)
                async with aiohttp.ClientSession(connector=connector) as http:
                    requests = [_mixed_request(rng, index) for index in range(count)]
                    outcomes = await asyncio.gather(
                        *(_send(http, edge.url, key, rng.random() < 0.2, rng, *r) for r in requests)
                    )
            state = await settled_books(ledger, account.id, seconds=60)
            holds = await reservation_states(ledger, account.id)
    finally:
        for proxy in proxies.values():
            await proxy.stop()
    stuck = [(o, holds.get(o.trace)) for o in outcomes if holds.get(o.trace, ("", 0))[0] == "held"]
    assert (state.held, state.open_holds) == (0, 0), stuck
    assert state.ledger_sum == state.balance
    statuses = {o.status for o in outcomes}
    assert 200 in statuses and 500 in statuses and 0 in statuses, statuses  # every path was taken
    for outcome in outcomes:
        hold_state, charged = holds.get(outcome.trace, ("none", 0))
        if outcome.status == 200:  # what the answer said is what billing charged
            assert (hold_state, charged) == ("committed", outcome.charged), outcome
        elif outcome.status != 0:  # no client both paid and got an error
            assert hold_state in ("released", "none"), outcome
    # Clients that left are charged only when the answer was already made (committed before they left).
    left_paid = sum(holds[o.trace][1] for o in outcomes if o.status == 0 and o.trace in holds)
    completed = sum(o.charged for o in outcomes if o.status == 200)
    assert state.balance == 100_000 - completed - left_paid


def _mixed_request(rng: random.Random, index: int) -> tuple[str, str, dict[str, Any]]:
    """Upscales, 1-step images, short speech and 1-second 1-step songs (the cheapest of each,
    so 300 fit in a test run; the mix is weighted by how long each takes)."""
    trace = f"mix-{index}"
    kind = rng.random()
    if kind < 0.4:
        return trace, "/v1/images/upscale", {"image": b64(png_bytes(32, 32)), "method": "lanczos", "scale": 2}
    if kind < 0.65:
        return (
            trace,
            GEN,
            {"prompt": f"tile {index}", "size": "256x256", "num_inference_steps": 1, "seed": index},
        )
    if kind < 0.85:
        return trace, SPEECH, {"model": "tts-1", "voice": "alloy", "input": "Hi.", "response_format": "wav"}
    body = {"prompt": "drums", "duration": 1.0, "seed": index, "instrumental": True, "num_inference_steps": 1}
    return trace, "/v1/music/generate", body


async def _send(
    http: aiohttp.ClientSession,
    url: str,
    key: str,
    leave: bool,
    rng: random.Random,
    trace: str,
    path: str,
    body: dict[str, Any],
) -> Outcome:
    headers = {"X-API-Key": key, "X-Request-ID": trace}
    timeout = aiohttp.ClientTimeout(total=rng.uniform(0.05, 1.5) if leave else 600)
    try:
        async with http.post(url + path, json=body, headers=headers, timeout=timeout) as response:
            await response.read()
            charged = response.headers.get("X-Credits-Charged")
            return Outcome(trace, response.status, units(charged) if charged else 0)
    except (TimeoutError, aiohttp.ClientError):
        return Outcome(trace, 0, 0)


async def test_conservation_of_credits_under_faults_and_disconnects(mesh: Mesh) -> None:
    """300 concurrent mixed requests on one account, on the mesh's database (SQLite, PostgreSQL)."""
    await conservation_run(mesh, mesh.settings.resolved_database_url, count=300, seed=1)
