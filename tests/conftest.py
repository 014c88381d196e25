"""Shared fixtures: the whole mesh, started in-process on loopback port 0, once with billing
on SQLite and once on PostgreSQL (the capability services are shared).

Tracing goes to an in-memory exporter so tests can check that one request's
spans from the edge, billing and image_gen share a trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.billing.ledger import Ledger
from services.common.grpc_server import GrpcService
from services.common.settings import DEFAULT_REGISTRY, Settings, load_settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: The tts service's tests need its own environment (qwen-tts pins transformers 4.57.3):
#: `make test` runs them with .venv-tts's Python; elsewhere they are not collected.
if importlib.util.find_spec("qwen_tts") is None:
    collect_ignore_glob = ["services/tts/*"]

SPANS = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(SPANS))
trace.set_tracer_provider(_provider)

JWT_SECRET = "test-secret-for-hs256-tokens-0123456789"
#: The `aud` and `iss` every JWT of the mesh must carry (required when JWTs are enabled).
JWT_AUDIENCE = "kiln-tests"
JWT_ISSUER = "https://issuer.kiln.test"

#: A registry with the shipped models plus a premium-only one (for 403 tests).
PREMIUM_MODEL = """

[[models]]
id = "z-image-turbo-premium"
capability = "text-to-image"
description = "Premium-only copy of z-image-turbo, for tests"
engine = "zimage"
weights = "tiny"

[models.limits]
max_width = 1792
max_height = 1792

[models.defaults]
steps = 8

[models.price]
base = "1"
reference_steps = 8
premium_only = true
"""


@dataclass
class Capabilities:
    """The capability services of the catalog, started once per session; billing and the edge
    come per database."""

    settings: Settings
    #: Each capability's port, by catalog name.
    ports: dict[str, int]


@dataclass
class Mesh(Capabilities):
    """The capability services with billing and the edge in front."""

    url: str
    ledger: Ledger  # on the same database as the mesh's billing
    billing_port: int


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny-model cache for the whole session (models are built once)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
async def capabilities(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path
) -> AsyncIterator[Capabilities]:
    from kiln_cli.main import free_port, service_python, spawn_service
    from services.catalog import CAPABILITIES

    data_dir = tmp_path_factory.mktemp("kiln")
    registry = data_dir / "registry.toml"
    registry.write_text(DEFAULT_REGISTRY.read_text() + PREMIUM_MODEL)
    settings = load_settings(
        data_dir=data_dir,
        model_cache_dir=model_cache,
        registry_path=registry,
        max_body_bytes=256 * 1024,
        max_input_image_pixels=1024 * 1024,
        jwt_hs256_secret=JWT_SECRET,
        jwt_audience=JWT_AUDIENCE,
        jwt_issuer=JWT_ISSUER,
        expiry_sweep_seconds=0.5,
    )
    services: dict[str, GrpcService] = {}
    children: dict[str, subprocess.Popen[bytes]] = {}
    ports: dict[str, int] = {}
    try:
        for entry in CAPABILITIES:  # all built before any starts (see kiln_cli.main._serve)
            if service_python(entry.name, settings) == sys.executable:
                services[entry.name] = await entry.create(settings, address="127.0.0.1:0")
                ports[entry.name] = services[entry.name].port
        for entry in CAPABILITIES:
            if entry.name not in services:  # its own environment's Python, as `kiln up` runs it
                ports[entry.name] = free_port()
                children[entry.name] = spawn_service(
                    entry.name,
                    settings,
                    {
                        "KILN_DATA_DIR": str(data_dir),
                        "KILN_MODEL_CACHE_DIR": str(model_cache),
                        "KILN_REGISTRY_PATH": str(registry),
                        entry.address_variable: f"127.0.0.1:{ports[entry.name]}",
                        "KILN_TORCH_THREADS": "1",
                        "KILN_LOG_LEVEL": "WARNING",
                    },
                )
        for service in services.values():
            await service.start()
        settings = settings.with_addresses(**{name: f"127.0.0.1:{port}" for name, port in ports.items()})
        yield Capabilities(settings, ports)
    finally:
        for service in services.values():
            await service.stop(1)
        for child in children.values():
            child.terminate()
            await asyncio.to_thread(child.wait, 30)


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
async def mesh(request: pytest.FixtureRequest, capabilities: Capabilities) -> AsyncIterator[Mesh]:
    """The whole mesh: the capability services with billing and the edge, once on SQLite (the
    embedded default) and once on PostgreSQL (a database made for the session)."""
    from edge.app import start_edge
    from services.billing.server import create_service as create_billing
    from services.billing.store import Database
    from tests.stack import postgres_database

    async with contextlib.AsyncExitStack() as stack:
        settings = capabilities.settings
        if request.param == "postgresql":
            settings = settings.model_copy(update={"database_url": stack.enter_context(postgres_database())})
        billing = await create_billing(settings, address="127.0.0.1:0")
        await billing.start()
        stack.push_async_callback(billing.stop, 1)
        settings = settings.with_addresses(billing=f"127.0.0.1:{billing.port}")
        runner, url = await start_edge(settings, "127.0.0.1", 0)
        stack.push_async_callback(runner.cleanup)
        async with aiohttp.ClientSession() as session:
            for _ in range(600):  # the tiny models build on first start
                async with session.get(f"{url}/readyz") as response:
                    if response.status == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("the mesh did not become ready")
        db = await Database.open(settings.resolved_database_url)
        stack.push_async_callback(db.close)
        fields = {f.name: getattr(capabilities, f.name) for f in dataclasses.fields(Capabilities)}
        yield Mesh(**fields | {"settings": settings}, url=url, ledger=Ledger(db), billing_port=billing.port)


@dataclass
class Customer:
    account_id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.key}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def balance(mesh: Mesh, account_id: str) -> int:
    account = await mesh.ledger.get_account(account_id)
    return int(account.balance)


async def new_customer(mesh: Mesh, credits: str = "100", *, premium: bool = False) -> Customer:
    """A fresh account with an API key and a grant of credits."""
    ledger = mesh.ledger
    account = await ledger.create_account("test", premium=premium)
    if Decimal(credits) > 0:
        await ledger.add_credits(account.id, Decimal(credits), kind="grant")
    _, key = await ledger.create_api_key(account.id)
    return Customer(account.id, key)
