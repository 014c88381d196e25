"""Metrics (issue 17): the edge's ``/metrics`` (public only with KILN_METRICS_PUBLIC), a
capability service's own metrics, and a cold load: a model still loading answers 503
``maintenance_mode`` with ``Retry-After``, and ``/readyz`` reports its load state.

The capability service here is a real image_gen server whose engines never load (its pool
waits behind a closed gate), in front of billing and an edge (tests/stack.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge.metrics import EdgeMetrics
from services.common.grpc_server import GrpcService
from services.common.metrics import start_metrics_server
from services.common.registry import load_registry
from services.common.settings import DEFAULT_REGISTRY, Settings
from services.image_gen.engines import build_engine_pool
from services.image_gen.server import create_service
from tests.services.serving import GatedPool
from tests.stack import offline_stack, settled_books

GENERATE = "/kiln.image.v1.ImageService/GenerateImages"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, parsed by Prometheus's own parser:
    (name, labels) -> value."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return parsed.get((name, frozenset(labels.items())), 0.0)


async def scrape(
    http: aiohttp.ClientSession, url: str
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with http.get(url + "/metrics") as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "text/plain"
        return samples(await response.text())


@pytest.fixture
async def loading_image_gen(tmp_path: Path) -> AsyncIterator[GrpcService]:
    """image_gen with its engines never loaded (the gate stays closed)."""
    settings = Settings(
        data_dir=tmp_path, model_cache_dir=tmp_path / "models", registry_path=DEFAULT_REGISTRY
    )
    registry = load_registry(DEFAULT_REGISTRY)
    pool = GatedPool(build_engine_pool(registry, cache_dir=tmp_path / "models", torch_threads=1))
    service = await create_service(settings, address="127.0.0.1:0", registry=registry, pool=pool)
    await service.start()
    try:
        yield service
    finally:
        await service.stop(0)


async def test_edge_metrics_count_requests_by_route_template_and_status(tmp_path: Path) -> None:
    async with offline_stack(tmp_path, metrics_public=True) as stack, aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.get(stack.url + "/healthz") as response:
                assert response.status == 200
        async with http.get(stack.url + "/v1/tasks/task_nope") as response:
            assert response.status == 401  # no credential
        async with http.get(stack.url + "/no/such/route") as response:
            assert response.status == 404
        async with http.delete(stack.url + "/healthz") as response:
            assert response.status == 405
        parsed = await scrape(http, stack.url)

    ok = {"route": "/healthz", "method": "GET"}
    assert value(parsed, "kiln_http_requests_total", **ok, status="200") == 3
    assert value(parsed, "kiln_http_request_duration_seconds_count", **ok) == 3
    assert value(parsed, "kiln_http_request_duration_seconds_bucket", **ok, le="+Inf") == 3
    assert value(parsed, "kiln_http_request_duration_seconds_sum", **ok) > 0
    # The route's template, never the raw path; a path or method no route takes is "unmatched".
    task = {"route": "/v1/tasks/{task_id}", "method": "GET", "status": "401"}
    assert value(parsed, "kiln_http_requests_total", **task) == 1
    assert value(parsed, "kiln_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert not any(dict(labels).get("route") == "/no/such/route" for _, labels in parsed)
    assert value(parsed, "kiln_http_requests_total", route="unmatched", method="DELETE", status="405") == 1


async def test_edge_metrics_are_404_unless_public(tmp_path: Path) -> None:
    async with offline_stack(tmp_path) as stack, aiohttp.ClientSession() as http:
        async with http.get(stack.url + "/metrics") as response:
            assert response.status == 404
            assert (await response.json())["error"]["type"] == "not_found_error"


def test_429_answers_count_as_rate_limit_rejections() -> None:
    metrics = EdgeMetrics()
    metrics.observe("/v1/images/generations", "POST", 429, 0.001)
    metrics.observe("/v1/images/generations", "POST", 200, 0.5)
    metrics.webhook("delivered")
    metrics.webhook("dead")
    parsed = samples(metrics.exposition().decode())
    assert value(parsed, "kiln_rate_limit_rejections_total", route="/v1/images/generations") == 1
    assert value(parsed, "kiln_webhook_deliveries_total", outcome="delivered") == 1
    assert value(parsed, "kiln_webhook_deliveries_total", outcome="dead") == 1


async def test_a_loading_model_is_503_with_retry_after_and_readyz_and_metrics_show_it(
    tmp_path: Path, loading_image_gen: GrpcService
) -> None:
    service = loading_image_gen
    runner, port = await start_metrics_server(service.metrics, "127.0.0.1", 0)
    addresses = {"image_gen": f"127.0.0.1:{service.port}"}
    try:
        async with (
            offline_stack(tmp_path, metrics_public=True, addresses=addresses) as stack,
            aiohttp.ClientSession() as http,
        ):
            account_id, headers = await stack.customer("10")
            body = {"prompt": "a kiln", "model": "z-image-turbo"}
            async with http.post(
                stack.url + "/v1/images/generations", json=body, headers=headers
            ) as response:
                assert response.status == 503
                error = (await response.json())["error"]
                assert error["type"] == "maintenance_mode"
                assert error["message"] == "Model 'z-image-turbo' is still loading; please try again shortly."
                assert response.headers["Retry-After"] == "5"
                assert response.headers["retry-after-ms"] == "5000"

            assert (await settled_books(stack.ledger, account_id)).held == 0  # the hold came back

            async with http.get(stack.url + "/readyz") as response:
                assert response.status == 503  # image_gen is not serving yet (and the others are absent)
                readiness = await response.json()
            assert readiness["services"]["image_gen"] is False
            model = readiness["models"]["z-image-turbo"]
            assert model == {
                "service": "image_gen",
                "state": "new",
                "unavailable_reason": None,
                "running_jobs": 0,
                "waiting_jobs": 0,
            }
            assert {m["service"] for m in readiness["models"].values()} == {"image_gen"}

            edge = await scrape(http, stack.url)
            route = {"route": "/v1/images/generations", "method": "POST"}
            assert value(edge, "kiln_http_requests_total", **route, status="503") == 1

            own = await scrape(http, f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()

    assert value(own, "kiln_engine_state", model="z-image-turbo", state="new") == 1
    assert value(own, "kiln_engine_state", model="z-image-turbo", state="ready") == 0
    assert value(own, "kiln_engine_queue_depth", model="z-image-turbo") == 0
    assert value(own, "kiln_engine_running_jobs", model="z-image-turbo") == 0
    assert value(own, "kiln_grpc_requests_total", method=GENERATE, code="UNAVAILABLE") == 1
    assert value(own, "kiln_grpc_request_duration_seconds_count", method=GENERATE) == 1
