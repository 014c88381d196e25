"""The llm gRPC server: bootstrap, model loading, shutdown.

``create_service`` builds the server (standard interceptors, health,
reflection) around :class:`LlmServicer`; once started, a background task
loads the chat engines on their worker threads, the default chat model
(:data:`~services.common.registry.DEFAULT_CHAT_MODEL`, the tiny Qwen3.5 by
default) first. Health turns SERVING as soon as the default model can serve;
the others keep loading in the background (SmolLM2's first start dequantises
its GGUF file, some 15-25 s, and is cached after that), and a request for a
model still loading gets ``maintenance_mode`` (UNAVAILABLE) until it is ready.

The address is ``address`` when given, else the ``KILN_LLM_ADDRESS`` setting;
``batch_max_size`` is the most requests one engine generates together; 0 (auto)
means 8: continuous batching pays off even on a CPU (3.3x the tokens/s of one
stream with 8 on this 2-core host), unlike the upscalers' convolutions.
"""

from __future__ import annotations

from kiln.llm.v1 import llm_service_pb2_grpc as pb_grpc
from services.common.grpc_server import EngineService
from services.common.registry import DEFAULT_CHAT_MODEL
from services.llm import CAPABILITY
from services.llm.engines import build_engine_pool
from services.llm.servicer import LlmServicer

#: Requests generating together when ``batch_max_size`` is 0 (auto).
AUTO_CHAT_BATCH = 8


#: The llm capability's server: its catalog entry, its engines and its servicer.
SERVICE = EngineService(
    capability=CAPABILITY,
    add_to_server=pb_grpc.add_LlmServiceServicer_to_server,
    build_pool=build_engine_pool,
    default_model=DEFAULT_CHAT_MODEL,
    pool_options=lambda settings: {"max_batch": settings.batch_max_size or AUTO_CHAT_BATCH},
    servicer=LlmServicer,
)


#: ``create_service(settings, *, address=None, registry=None, pool=None)``: see :meth:`EngineService.create`.
create_service = SERVICE.create
