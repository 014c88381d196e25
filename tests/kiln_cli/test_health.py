"""``kiln health``: a real gRPC server (the standard bootstrap, mesh auth on) and a real
HTTP server on loopback port 0, probed the way a container's health check does."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from kiln_cli.health import check, local_target
from kiln_cli.main import main
from services.common.grpc_server import GrpcService, create_server
from services.common.settings import Settings, load_settings

SERVICE_NAME = "kiln.test.v1.TestService"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[GrpcService]:
    settings = load_settings(data_dir=tmp_path, mesh_secret="m" * 32)
    service = await create_server(
        address="127.0.0.1:0", settings=settings, register=lambda server: None, service_names=[SERVICE_NAME]
    )
    await service.start()
    try:
        yield service
    finally:
        await service.stop(0)


async def kiln(*args: str) -> int:
    return await asyncio.to_thread(main, list(args))


async def test_exit_status_follows_the_grpc_health_status_without_a_mesh_token(server: GrpcService) -> None:
    address = f"127.0.0.1:{server.port}"
    assert await kiln("health", address) == 1  # NOT_SERVING until the service says it is ready
    await server.set_serving(True)
    assert await kiln("health", address) == 0
    assert await kiln("health", address, "--service", SERVICE_NAME) == 0
    serving, said = await asyncio.to_thread(check, address, service="kiln.nope.v1.Nope")
    assert (serving, said.split(":")[0]) == (False, "NOT_FOUND")
    await server.health.enter_graceful_shutdown()  # SIGTERM: draining
    assert await kiln("health", address, "--quiet") == 1


async def test_nothing_listening_is_unhealthy() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serving, said = await asyncio.to_thread(check, f"127.0.0.1:{port}", timeout=2)
    assert not serving and said.startswith("UNAVAILABLE")
    assert await kiln("health", f"http://127.0.0.1:{port}/healthz", "--timeout", "2") == 1


async def test_a_url_must_answer_2xx(aiohttp_server) -> None:  # type: ignore[no-untyped-def]
    async def up(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def down(request: web.Request) -> web.Response:
        return web.json_response({}, status=503)

    app = web.Application()
    app.router.add_get("/healthz", up)
    app.router.add_get("/down", down)
    http = await aiohttp_server(app)
    assert await kiln("health", str(http.make_url("/healthz"))) == 0
    assert await kiln("health", str(http.make_url("/down"))) == 1


def test_a_service_name_means_this_machine_on_its_configured_port() -> None:
    settings = Settings(grpc_bind_host="0.0.0.0", http_host="::", http_port=9000).with_addresses(
        image_gen="image-gen.kiln.svc:6000"
    )
    # the dial address names the Service (other replicas): the probe must stay on loopback
    assert local_target("image_gen", settings) == "127.0.0.1:6000"
    assert local_target("billing", settings) == "127.0.0.1:50051"
    assert local_target("edge", settings) == "http://[::1]:9000/healthz"
    assert local_target("llm", Settings()) == "127.0.0.1:50055"
    with pytest.raises(KeyError):
        local_target("nope", settings)


async def test_no_target_and_no_kiln_service_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_SERVICE", raising=False)
    assert await kiln("health") == 2
    assert await kiln("serve") == 2
