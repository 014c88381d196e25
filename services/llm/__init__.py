"""The llm service: chat with vision, continuous batching, streamed tokens (``kiln.llm.v1``)."""

from services.common.capability import Capability

CAPABILITY = Capability(
    name="llm", service="kiln.llm.v1.LlmService", port=50055, server="services.llm.server:create_service"
)
