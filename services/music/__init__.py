"""The music service: ACE-Step 1.5 text-to-music, covers and repaints over gRPC (``kiln.music.v1``)."""

from services.common.capability import Capability

CAPABILITY = Capability(
    name="music",
    service="kiln.music.v1.MusicService",
    port=50057,
    server="services.music.server:create_service",
)
