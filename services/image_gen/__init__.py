"""The image_gen service: text-to-image and image editing on diffusers over gRPC (``kiln.image.v1``)."""

from services.common.capability import Capability

CAPABILITY = Capability(
    name="image_gen",
    service="kiln.image.v1.ImageService",
    port=50052,
    server="services.image_gen.server:create_service",
)
