"""Asynchronous tasks: what admitting one costs, how soon its webhook follows its end, and
what a task adds to the same synchronous call.

Not a test. Run with `make bench` (or `.venv/bin/python bench/tasks.py`). A child process
runs the mesh in one process (``bench.mesh``, as `kiln up`: the edge's task worker and
webhook deliverer share its event loop with every service, at their default settings);
this process is the client. The work is the cheapest paid request there is, a 64x64 PNG
upscaled 2x with lanczos: ``POST /v1/images/upscale`` synchronously, ``POST /v1/tasks``
``{"model": "lanczos", "input": {...}}`` as a task. Measured in one run:

1. **Admission.** ``-n`` requests from ``--concurrency`` clients in a closed loop:
   synchronous calls (the baseline), tasks created with ``POST /v1/tasks``, and the
   synchronous route with ``Prefer: respond-async`` (202 and the task). Requests per
   second, p50/p99 latency, and the ratio to the synchronous rate. The edge's task worker
   (``task_workers``, 2) runs the queued tasks meanwhile, as it would in service; the time
   until the queue is empty again (polled with ``GET /v1/tasks?status=...``) is printed as
   tasks done per second.
2. **Webhook delay.** A loopback aiohttp receiver (the child gets
   ``KILN_WEBHOOK_ALLOWED_HOSTS=127.0.0.1``); ``--webhooks`` tasks whose ``callback_url``
   points at it, first one at a time (each after the previous one's webhook came), then
   all at once. The delay is the receiver's arrival time minus the task's end as billing
   recorded it: the task row's ``completed_at_ms`` (the FinishTask transaction's clock;
   the public object's ``completed_at`` has whole seconds only, and polling GET would add
   its own interval), both Unix wall-clock times on the same machine. It is read with
   ``TaskService.GetTask`` over gRPC as the edge: the bench gives the child a
   ``KILN_MESH_SECRET`` it knows, so it can sign the edge's mesh credential. Every
   delivery's Standard Webhooks signature is then checked with the account's secret
   (``WebhookService.GetWebhookSecret``).
3. **Overhead of a task.** ``-k`` times each, alternately, one at a time: one synchronous
   call vs one task, from ``POST /v1/tasks`` to ``GET /v1/tasks/{id}`` first showing it
   completed (polled every 20 ms, so the poll adds up to 20 ms), and to its
   ``completed_at_ms`` (the end as billing recorded it, without the poll's granularity).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mesh import running_mesh, wait_ready  # noqa: E402

#: How often a client polls GET /v1/tasks/{id} for the end of its task.
POLL_SECONDS = 0.02


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _line(label: str, samples: list[float], rate: float | None = None) -> None:
    extra = f"{rate:7.1f} req/s" if rate is not None else ""
    print(
        f"  {label:<48}{extra:>13}   p50 {percentile(samples, 50):8.2f} ms   p99 {percentile(samples, 99):8.2f} ms"
        f"   mean {statistics.fmean(samples):8.2f} ms",
        flush=True,
    )


def _png() -> str:
    from PIL import Image

    image = Image.effect_noise((64, 64), 40).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def _batch(fn: Callable[[], Awaitable[Any]], n: int, concurrency: int) -> tuple[float, list[float]]:
    """``n`` calls of ``fn`` by ``concurrency`` clients in a closed loop: (calls/s, latencies ms)."""
    latencies: list[float] = []
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            await fn()
            latencies.append((time.perf_counter() - start) * 1000)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - start), latencies


class Receiver:
    """A loopback webhook receiver: each task's arrival time (Unix seconds), body and headers."""

    def __init__(self) -> None:
        self.arrivals: dict[str, tuple[float, bytes, dict[str, str]]] = {}
        self.waiters: dict[str, asyncio.Future[None]] = {}

    async def handle(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.read()
        arrived = time.time()
        task_id = json.loads(body)["task_id"]
        self.arrivals.setdefault(task_id, (arrived, body, dict(request.headers)))
        waiter = self.waiters.get(task_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return web.Response(status=204)

    def expect(self, task_id: str) -> asyncio.Future[None]:
        future = self.waiters.setdefault(task_id, asyncio.get_running_loop().create_future())
        if task_id in self.arrivals and not future.done():
            future.set_result(None)
        return future


async def _client(info: dict[str, Any], secret: str, args: argparse.Namespace) -> None:
    import aiohttp
    from aiohttp import web
    from standardwebhooks import Webhook

    from kiln.billing.v1 import task_service_pb2 as task_pb
    from kiln.billing.v1 import task_service_pb2_grpc as task_grpc
    from kiln.billing.v1 import webhook_service_pb2 as webhook_pb
    from kiln.billing.v1 import webhook_service_pb2_grpc as webhook_grpc
    from services.common.grpc_client import create_channel
    from services.common.mesh_auth import EDGE, mesh_token

    edge = f"http://127.0.0.1:{info['edge']}"
    headers = {"X-API-Key": str(info["key"])}
    image = _png()
    sync_body = {"image": image, "method": "lanczos", "scale": 2, "response_format": "url"}
    task_input = {"image": image, "scale": 2, "response_format": "url"}

    receiver = Receiver()
    hook_app = web.Application()
    hook_app.router.add_post("/hook", receiver.handle)
    hook_runner = web.AppRunner(hook_app, access_log=None)
    await hook_runner.setup()
    await web.TCPSite(hook_runner, "127.0.0.1", 0).start()
    hook_url = f"http://127.0.0.1:{hook_runner.addresses[0][1]}/hook"

    billing_address = f"127.0.0.1:{info['ports']['billing']}"
    edge_token = mesh_token(secret.encode(), EDGE)
    async with aiohttp.ClientSession() as http, create_channel(billing_address, token=edge_token) as channel:
        await wait_ready(http, edge)
        tasks_stub = task_grpc.TaskServiceStub(channel)
        async with http.get(edge + "/v1/account", headers=headers) as response:
            account_id = (await response.json())["id"]

        async def sync_call() -> None:
            async with http.post(edge + "/v1/images/upscale", json=sync_body, headers=headers) as response:
                assert response.status == 200, await response.text()
                await response.read()

        async def create(callback: str | None = None) -> str:
            body: dict[str, Any] = {"model": "lanczos", "input": task_input}
            if callback:
                body["callback_url"] = callback
            async with http.post(edge + "/v1/tasks", json=body, headers=headers) as response:
                answer = await response.json()
                assert response.status == 200 and answer["success"], answer
                return str(answer["data"]["task_id"])

        async def respond_async() -> None:
            async with http.post(
                edge + "/v1/images/upscale",
                json=sync_body,
                headers={**headers, "Prefer": "respond-async"},
            ) as response:
                assert response.status == 202, await response.text()
                assert (await response.json())["task_id"]

        async def status(task_id: str) -> str:
            async with http.get(f"{edge}/v1/tasks/{task_id}", headers=headers) as response:
                data = (await response.json())["data"]
                if data["status"] in ("failed", "cancelled"):
                    raise RuntimeError(f"task {task_id} ended {data['status']}: {data.get('error')}")
                return str(data["status"])

        async def completed_ms(task_id: str) -> int:
            reply = await tasks_stub.GetTask(task_pb.GetTaskRequest(account_id=account_id, task_id=task_id))
            assert reply.task.status == task_pb.TASK_STATUS_COMPLETED, reply.task
            return int(reply.task.completed_at_ms)

        async def queue_empty() -> bool:
            for state in ("pending", "processing"):
                async with http.get(f"{edge}/v1/tasks?status={state}&limit=1", headers=headers) as response:
                    if (await response.json())["data"]["tasks"]:
                        return False
            return True

        async def drained(since: float) -> float:
            deadline = time.perf_counter() + 300
            while time.perf_counter() < deadline:
                if await queue_empty():
                    return time.perf_counter() - since
                await asyncio.sleep(0.05)
            raise RuntimeError("the task queue did not empty within 300 s")

        async def run_task() -> tuple[str, float]:
            """One task, created and polled to its end: (id, Unix seconds it was created at)."""
            created = time.time()
            task_id = await create()
            deadline = time.perf_counter() + 60
            while time.perf_counter() < deadline:
                if await status(task_id) == "completed":
                    return task_id, created
                await asyncio.sleep(POLL_SECONDS)
            raise RuntimeError(f"task {task_id} did not complete within 60 s")

        # warm-up: the model, connections, the worker's first claims, the account's webhook
        # secret (made at its first delivery) and the deliverer's connection to the receiver
        for _ in range(args.warmup):
            await sync_call()
            await run_task()
        await asyncio.wait_for(receiver.expect(await create(hook_url)), 60)

        n, concurrency = args.n, args.concurrency
        print(f"\n1) admission: {n} requests by {concurrency} concurrent clients (64x64 PNG, lanczos 2x)")
        sync_rate, sync_lat = await _batch(sync_call, n, concurrency)
        _line("synchronous POST /v1/images/upscale (baseline)", sync_lat, sync_rate)
        for label, fn in (
            ("POST /v1/tasks", create),
            ("POST /v1/images/upscale, Prefer: respond-async", respond_async),
        ):
            start = time.perf_counter()
            rate, lat = await _batch(fn, n, concurrency)
            _line(label, lat, rate)
            print(f"  -> admission rate / synchronous rate {rate / sync_rate:.2f}x")
            seconds = await drained(start)
            print(
                f"  -> queue empty {seconds:.2f} s after the first creation: {n / seconds:.1f} tasks done/s"
                f" ({args.workers} workers; {n / seconds / sync_rate:.2f}x the synchronous rate)",
                flush=True,
            )

        m = args.webhooks
        print(
            f"\n2) webhook delay: arrival at a loopback receiver minus the task's completed_at_ms, {m} tasks"
        )

        async def delays(task_ids: list[str]) -> list[float]:
            await asyncio.wait_for(asyncio.gather(*(receiver.expect(t) for t in task_ids)), 120)
            ends = await asyncio.gather(*(completed_ms(t) for t in task_ids))
            return [receiver.arrivals[t][0] * 1000 - end for t, end in zip(task_ids, ends, strict=True)]

        one_by_one = []
        for _ in range(m):
            task_id = await create(hook_url)
            await asyncio.wait_for(receiver.expect(task_id), 60)
            one_by_one.append(task_id)
        _line("one at a time", await delays(one_by_one))
        burst: list[str] = []

        async def create_hooked() -> None:
            burst.append(await create(hook_url))

        await _batch(create_hooked, m, concurrency)
        _line(f"all at once ({concurrency} clients creating)", await delays(burst))
        reply = await webhook_grpc.WebhookServiceStub(channel).GetWebhookSecret(
            webhook_pb.GetWebhookSecretRequest(account_id=account_id)
        )
        verifier = Webhook(reply.secret.secret)
        verified = 0
        for task_id in one_by_one + burst:
            _, body, received = receiver.arrivals[task_id]
            payload = verifier.verify(body, received)
            verified += payload["status"] == "completed"
        print(f"  -> signatures verified, status completed: {verified}/{len(one_by_one) + len(burst)}")

        k = args.k
        print(f"\n3) one request at a time, {k} each, alternated: a task end to end vs the synchronous call")
        sync_times: list[float] = []
        polled: list[float] = []
        runs: list[tuple[str, float]] = []
        for i in range(2 * k):
            start = time.perf_counter()
            if i % 2:
                await sync_call()
                sync_times.append((time.perf_counter() - start) * 1000)
            else:
                runs.append(await run_task())
                polled.append((time.perf_counter() - start) * 1000)
        ends = await asyncio.gather(*(completed_ms(task_id) for task_id, _ in runs))
        recorded = [end - created * 1000 for (_, created), end in zip(runs, ends, strict=True)]
        _line("synchronous call (baseline)", sync_times)
        _line("task, until GET shows completed (20 ms poll)", polled)
        _line("task, until its completed_at_ms", recorded)
        base = percentile(sync_times, 50)
        for label, samples in (("polled", polled), ("completed_at_ms", recorded)):
            p50 = percentile(samples, 50)
            print(f"  -> p50 {label}: +{p50 - base:.2f} ms over the synchronous call, ratio {p50 / base:.2f}")
    await hook_runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=200, help="requests per admission case")
    parser.add_argument("--concurrency", type=int, default=16, help="clients in the admission case")
    parser.add_argument("--webhooks", type=int, default=50, help="tasks with a callback_url, per case")
    parser.add_argument("-k", type=int, default=50, help="sequential tasks and synchronous calls")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="the edge's task_workers")
    args = parser.parse_args()
    secret = secrets.token_hex(32)  # the mesh's secret, so the bench can read billing as the edge
    env = {
        "KILN_MESH_SECRET": secret,
        "KILN_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "KILN_TASK_WORKERS": str(args.workers),
    }
    with running_mesh("single", env) as info:
        asyncio.run(_client(info, secret, args))


if __name__ == "__main__":
    main()
