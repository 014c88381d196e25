"""The upscale service: Real-ESRGAN, Swin2SR and Lanczos super-resolution over gRPC (``kiln.upscale.v1``)."""

from services.common.capability import Capability

CAPABILITY = Capability(
    name="upscale",
    service="kiln.upscale.v1.UpscaleService",
    port=50054,
    server="services.upscale.server:create_service",
)
