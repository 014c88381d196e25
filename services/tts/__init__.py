"""The tts service: speech synthesis (Piper) streamed over gRPC."""

from services.common.capability import Capability

CAPABILITY = Capability(
    name="tts",
    service="kiln.tts.v1.TtsService",
    port=50056,
    server="services.tts.server:create_service",
    environment="tts",
)
