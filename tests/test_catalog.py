"""The catalog is the one list of the mesh's services: everything that wires the mesh iterates
it, and nothing else names a capability."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import aiohttp
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edge.clients import Upstreams
from kiln_cli.envoy import render_envoy_config
from kiln_cli.main import SERVICES
from services.catalog import CAPABILITIES, CATALOG, PACKAGES, capability
from services.common.capability import Capability
from services.common.grpc_client import create_channel
from services.common.mesh_auth import mesh_secret, mesh_token
from tests.conftest import Mesh

ROOT = Path(__file__).resolve().parent.parent
#: Files that wire the mesh: they take every service from the catalog and name none.
WIRING = (
    "kiln_cli/main.py",
    "kiln_cli/envoy.py",
    "tests/conftest.py",
    "bench/mesh.py",
    "services/common/settings.py",
)


def test_every_package_declares_itself_and_its_proto_service_exists() -> None:
    assert [entry.name for entry in CATALOG] == list(PACKAGES)
    assert [entry.name for entry in CATALOG if entry.billing] == ["billing"]
    assert len({entry.port for entry in CATALOG}) == len(CATALOG)
    for entry in CATALOG:
        proto_package, _, service = entry.service.rpartition(".")  # kiln.image.v1, ImageService
        generated = [
            importlib.import_module(f"{proto_package}.{path.stem}")
            for path in (ROOT / "kiln" / Path(*proto_package.split(".")[1:])).glob("*_service_pb2.py")
        ]
        assert any(service in g.DESCRIPTOR.services_by_name for g in generated), entry
        module_name, _, function = entry.server.partition(":")
        assert callable(getattr(importlib.import_module(module_name), function)), entry
    assert SERVICES == (*PACKAGES, "edge")
    with pytest.raises(KeyError):
        capability("nothing")


@pytest.mark.parametrize("path", WIRING)
def test_the_wiring_names_no_capability(path: str) -> None:
    names = {entry.name for entry in CAPABILITIES}  # billing (money) has settings of its own
    tree = ast.parse((ROOT / path).read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
            found.append(node.value)
        identifier = (
            node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
        )
        if any(identifier.startswith(f"{name}_") for name in names):
            found.append(identifier)
    assert not found, f"{path} names {sorted(set(found))}: take them from services.catalog"


def test_addresses_come_from_one_map_and_the_variables_keep_working(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.common.settings import load_settings

    for entry in CATALOG:
        monkeypatch.setenv(entry.address_variable, f"10.0.0.{entry.port % 250}:{entry.port}")
    settings = load_settings()
    for entry in CATALOG:
        assert settings.address(entry.name) == f"10.0.0.{entry.port % 250}:{entry.port}"
        monkeypatch.delenv(entry.address_variable)
    assert load_settings().address(CATALOG[1].name) == f"127.0.0.1:{CATALOG[1].port}"


async def test_the_mesh_is_built_from_the_catalog(
    mesh: Mesh, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Every entry is started, reachable through the edge's upstreams (health and reflection
    with the edge's credential), in /readyz, and in the Envoy config."""
    assert set(mesh.ports) == {entry.name for entry in CAPABILITIES}
    upstreams = Upstreams.connect(mesh.settings)
    try:
        assert set(upstreams.channels) == {entry.name for entry in CATALOG}
        for entry in CATALOG:
            reply = await health_pb2_grpc.HealthStub(upstreams.channels[entry.name]).Check(
                health_pb2.HealthCheckRequest(service=entry.service), timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, entry.name
    finally:
        await upstreams.close()
    token = mesh_token(mesh_secret(mesh.settings), "tests")
    for entry in CATALOG:
        async with create_channel(mesh.settings.address(entry.name), token=token) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            async for answer in stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            ):
                listed = {service.name for service in answer.list_services_response.service}
                assert entry.service in listed, entry.name
    async with http.get(mesh.url + "/readyz") as response:
        assert response.status == 200
        assert set((await response.json())["services"]) == {entry.name for entry in CATALOG}
    config = render_envoy_config(mesh.settings, descriptor=tmp_path / "d.binpb", expose_billing=True)
    clusters = {cluster["name"] for cluster in config["static_resources"]["clusters"]}
    assert clusters == {"edge", *(entry.name for entry in CATALOG)}


@pytest.mark.parametrize("entry", CAPABILITIES, ids=lambda entry: entry.name)
def test_every_capability_has_a_tiny_model_module(entry: Capability) -> None:
    """Each capability builds its tiny random-weight models in ``services.<name>.tiny``
    (billing runs no model, so the catalog's ``CAPABILITIES`` leaves it out)."""
    assert importlib.util.find_spec(f"services.{entry.name}.tiny") is not None, entry.name
