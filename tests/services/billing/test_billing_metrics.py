"""Billing's metrics: credits reserved, committed and released, and its gRPC calls, scraped
over HTTP and read with Prometheus's parser."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiln.billing.v1 import billing_service_pb2 as pb
from kiln.billing.v1 import billing_service_pb2_grpc as pb_grpc
from services.common.grpc_client import mesh_channel
from services.common.mesh_auth import EDGE
from services.common.metrics import start_metrics_server
from services.common.settings import DEFAULT_REGISTRY, Settings
from tests.stack import billing_service

SERVICE = "/kiln.billing.v1.BillingService"


async def test_credit_counters_follow_holds_commits_and_releases(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, registry_path=DEFAULT_REGISTRY)
    async with billing_service(settings) as billing:
        assert billing.ledger is not None
        account = await billing.ledger.create_account("metrics")
        channel = mesh_channel(f"127.0.0.1:{billing.port}", settings, EDGE)
        runner, port = await start_metrics_server(billing.metrics, "127.0.0.1", 0)
        try:
            stub = pb_grpc.BillingServiceStub(channel)
            kept = await stub.Reserve(
                pb.ReserveRequest(account_id=account.id, amount_hundredths=0, request_id="a", ttl_seconds=60)
            )
            await billing.ledger.add_credits(account.id, 10, kind="grant")
            held = await stub.Reserve(
                pb.ReserveRequest(
                    account_id=account.id, amount_hundredths=250, request_id="b", ttl_seconds=60
                )
            )
            back = await stub.Reserve(
                pb.ReserveRequest(
                    account_id=account.id, amount_hundredths=100, request_id="c", ttl_seconds=60
                )
            )
            usage = pb.Usage(
                image_generation=pb.ImageGenerationUsage(
                    model="z-image-turbo", width=512, height=512, steps=8
                )
            )
            done = await stub.Commit(pb.CommitRequest(reservation_id=held.reservation.id, usage=[usage]))
            await stub.Release(pb.ReleaseRequest(reservation_id=back.reservation.id))
            await stub.Release(pb.ReleaseRequest(reservation_id=kept.reservation.id))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Release(pb.ReleaseRequest(reservation_id="res_nope"))
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{port}/metrics") as response,
            ):
                assert response.status == 200
                text = await response.text()
        finally:
            await runner.cleanup()
            await channel.close()

    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    charged = done.reservation.charged_hundredths
    assert 0 < charged < 250
    assert values[("kiln_credits_reserved_total", ())] == 350
    assert values[("kiln_credits_committed_total", ())] == charged
    assert values[("kiln_credits_released_total", ())] == (250 - charged) + 100
    assert values[("kiln_grpc_requests_total", (("code", "OK"), ("method", f"{SERVICE}/Reserve")))] == 3
    assert (
        values[("kiln_grpc_requests_total", (("code", "NOT_FOUND"), ("method", f"{SERVICE}/Release")))] == 1
    )
    assert values[("kiln_grpc_request_duration_seconds_count", (("method", f"{SERVICE}/Commit"),))] == 1


def _free_ports() -> tuple[int, int]:
    """Two free loopback ports, the second above the first by at most the offset's limit."""
    while True:
        sockets = [socket.socket(), socket.socket()]
        try:
            for each in sockets:
                each.bind(("127.0.0.1", 0))
            low, high = sorted(each.getsockname()[1] for each in sockets)
        finally:
            for each in sockets:
                each.close()
        if 0 < high - low <= 10000:
            return low, high


async def test_metrics_port_offset_serves_metrics_beside_the_grpc_port(tmp_path: Path) -> None:
    grpc_port, metrics_port = _free_ports()
    settings = Settings(
        data_dir=tmp_path, registry_path=DEFAULT_REGISTRY, metrics_port_offset=metrics_port - grpc_port
    )
    from services.billing.server import create_service

    service = await create_service(settings, address=f"127.0.0.1:{grpc_port}")
    await service.start()
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):  # the metrics server starts as a background job
                try:
                    async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
                        text = await response.text()
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.02)
            else:
                raise AssertionError("no metrics server")
        assert response.status == 200
        names = {family.name for family in text_string_to_metric_families(text)}
        assert {"kiln_credits_reserved", "kiln_grpc_requests"} <= names
    finally:
        await service.stop(0)
    with pytest.raises(aiohttp.ClientConnectionError):  # stopped with the service
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{metrics_port}/metrics"):
            pass
