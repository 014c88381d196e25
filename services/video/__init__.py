"""The video service: image-to-video with streamed H.264 encoding (``kiln.video.v1``)."""

from services.common.capability import Capability

CAPABILITY = Capability(
    name="video",
    service="kiln.video.v1.VideoService",
    port=50058,
    server="services.video.server:create_service",
)
