"""Internal trust: every gRPC service of the mesh asks its caller for the mesh credential
(health excepted), and billing moves money only for the edge."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
from pathlib import Path

import aiohttp
import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from kiln.billing.v1 import billing_service_pb2 as billing_pb
from kiln.billing.v1 import billing_service_pb2_grpc as billing_grpc
from services.billing.server import EDGE_ONLY_METHODS, READ_ONLY_METHODS, SERVICE_NAME
from services.common.grpc_client import create_channel
from services.common.mesh_auth import (
    SECRET_FILE,
    MeshSecretError,
    mesh_secret,
    mesh_token,
    verify_token,
)
from services.common.settings import Settings
from tests.conftest import Mesh, balance, new_customer
from tests.stack import edge_app
from tests.test_mesh import _grpcurl

SECRET = b"0123456789abcdef0123456789abcdef"


def _ports(mesh: Mesh) -> dict[str, int]:
    return {
        "kiln.billing.v1.BillingService": mesh.billing_port,
        "kiln.image.v1.ImageService": mesh.ports["image_gen"],
        "kiln.segmentation.v1.SegmentationService": mesh.ports["segmentation"],
        "kiln.upscale.v1.UpscaleService": mesh.ports["upscale"],
        "kiln.llm.v1.LlmService": mesh.ports["llm"],
        "kiln.tts.v1.TtsService": mesh.ports["tts"],
        "kiln.music.v1.MusicService": mesh.ports["music"],
        "kiln.video.v1.VideoService": mesh.ports["video"],
    }


async def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, list(args), capture_output=True, text=True, timeout=120)


# --- tokens ---


def test_a_token_proves_its_identity_and_nothing_else() -> None:
    token = mesh_token(SECRET, "operator")
    assert verify_token(SECRET, f"Bearer {token}") == "operator"
    assert verify_token(SECRET, f"bearer {token}") == "operator"
    assert verify_token(b"another secret of thirty-two bytes!", f"Bearer {token}") is None
    forged = token.replace(".operator.", ".edge.")
    assert verify_token(SECRET, f"Bearer {forged}") is None
    assert verify_token(SECRET, token) is None  # no scheme
    assert verify_token(SECRET, f"Basic {token}") is None
    assert verify_token(SECRET, "Bearer " + "a" * 100_000) is None
    assert verify_token(SECRET, "Bearer kiln1..") is None
    with pytest.raises(ValueError):
        mesh_token(SECRET, "Operator With Spaces")


def test_the_secret_file_is_made_once_readable_only_by_its_owner(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "state")
    first = mesh_secret(settings)
    path = settings.data_dir / SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) >= 32
    assert mesh_secret(Settings(data_dir=tmp_path / "state")) == first  # another process reads the same
    assert mesh_secret(Settings(data_dir=tmp_path / "elsewhere")) != first


def test_a_short_configured_secret_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MeshSecretError, match="at least 32 bytes"):
        mesh_secret(Settings(data_dir=tmp_path, mesh_secret=SecretStr("short")))
    assert mesh_secret(Settings(data_dir=tmp_path, mesh_secret=SecretStr(SECRET.decode()))) == SECRET
    assert not (tmp_path / SECRET_FILE).exists()


def test_bind_and_dial_addresses_are_separate_settings() -> None:
    assert Settings().bind_address("image-gen.kiln.svc:50052") == "image-gen.kiln.svc:50052"
    assert Settings(grpc_bind_host="0.0.0.0").bind_address("image-gen.kiln.svc:50052") == "0.0.0.0:50052"
    assert Settings(grpc_bind_host="::").bind_address("image-gen:50052") == "[::]:50052"


def test_every_billing_rpc_is_either_edge_only_or_read_only() -> None:
    methods = {m.name for m in billing_pb.DESCRIPTOR.services_by_name["BillingService"].methods}
    assert set(EDGE_ONLY_METHODS) | set(READ_ONLY_METHODS) == methods
    assert not set(EDGE_ONLY_METHODS) & set(READ_ONLY_METHODS)


# --- the running mesh ---


async def test_grpcurl_without_the_credential_generates_nothing(mesh: Mesh) -> None:
    grpcurl = _grpcurl()
    body = json.dumps({"prompt": "a fox", "width": 256, "height": 256, "num_inference_steps": 1})
    method = "kiln.image.v1.ImageService/GenerateImages"
    address = f"127.0.0.1:{mesh.ports['image_gen']}"
    refused = await _run(grpcurl, "-plaintext", "-d", body, address, method)
    assert refused.returncode != 0
    assert "Unauthenticated" in refused.stderr and "mesh credential" in refused.stderr
    token = mesh_token(mesh_secret(mesh.settings), "operator")
    served = await _run(
        grpcurl, "-plaintext", "-H", f"authorization: Bearer {token}", "-d", body, address, method
    )
    assert served.returncode == 0, served.stderr
    assert '"image"' in served.stdout or '"images"' in served.stdout


async def test_every_service_refuses_reflection_without_the_credential_and_answers_health(mesh: Mesh) -> None:
    grpcurl = _grpcurl()
    for service, port in _ports(mesh).items():
        refused = await _run(grpcurl, "-plaintext", f"127.0.0.1:{port}", "list")
        assert refused.returncode != 0, service
        assert "Unauthenticated" in refused.stderr, (service, refused.stderr)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:  # probes send no metadata
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service)
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_billing_moves_money_only_for_the_edge(mesh: Mesh) -> None:
    customer = await new_customer(mesh)
    before = await balance(mesh, customer.account_id)
    credential = billing_pb.Credential(api_key=customer.key)
    usage = [
        billing_pb.Usage(
            image_generation=billing_pb.ImageGenerationUsage(
                model="z-image-turbo", width=256, height=256, steps=8
            )
        )
    ]
    token = mesh_token(mesh_secret(mesh.settings), "operator")
    async with create_channel(f"127.0.0.1:{mesh.billing_port}", token=token) as channel:
        stub = billing_grpc.BillingServiceStub(channel)
        service = billing_pb.DESCRIPTOR.services_by_name["BillingService"]
        calls = {}
        for name in EDGE_ONLY_METHODS:
            request = message_factory.GetMessageClass(service.methods_by_name[name].input_type)()
            if name == "Authorize":  # a real, affordable request: refused for who asks, not what
                request = billing_pb.AuthorizeRequest(credential=credential, usage=usage)
            calls[name] = getattr(stub, name)(request)
        for name, call in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
            assert f"/{SERVICE_NAME}/{name} accepts calls only from: edge" in str(refused.value.details())
        # reading is allowed with any identity's credential
        account = await stub.Authenticate(billing_pb.AuthenticateRequest(credential=credential))
        assert account.account.id == customer.account_id
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.billing_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await billing_grpc.BillingServiceStub(channel).GetAccount(
                billing_pb.GetAccountRequest(account_id=customer.account_id)
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await balance(mesh, customer.account_id) == before


async def test_an_edge_with_another_secret_answers_500_and_charges_nothing(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    customer = await new_customer(mesh)
    before = await balance(mesh, customer.account_id)
    stranger = mesh.settings.model_copy(update={"mesh_secret": SecretStr(os.urandom(32).hex())})
    async with edge_app(stranger) as edge:
        body = {"prompt": "a kite", "size": "256x256"}
        async with http.post(
            edge.url + "/v1/images/generations", json=body, headers=customer.headers
        ) as response:
            error = await response.json()
            assert response.status == 500, error
        assert error["error"]["type"] == "processing_error"
        async with http.get(edge.url + "/readyz") as response:
            assert response.status == 200  # health needs no credential
    assert await balance(mesh, customer.account_id) == before
