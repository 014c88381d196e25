"""The segmentation service: SAM3 segmentation and background removal for images and videos (``kiln.segmentation.v1``)."""

from services.common.capability import Capability

CAPABILITY = Capability(
    name="segmentation",
    service="kiln.segmentation.v1.SegmentationService",
    port=50053,
    server="services.segmentation.server:create_service",
)
