"""The segmentation gRPC server: bootstrap, model loading, shutdown.

``create_service`` builds the server (standard interceptors, health,
reflection) around :class:`SegmentationServicer`; once started, a background
task loads the SAM3 engines on their worker threads, and health turns SERVING
as soon as the default model (sam3) can serve.

The address is ``address`` when given, else the ``KILN_SEGMENTATION_ADDRESS``
setting; the largest video upload is the ``max_video_bytes`` setting.
"""

from __future__ import annotations

import logging

from kiln.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc
from services.common.grpc_server import EngineService
from services.common.registry import DEFAULT_SEGMENTATION_MODEL
from services.segmentation import CAPABILITY
from services.segmentation.engines import build_engine_pool
from services.segmentation.servicer import SegmentationServicer

log = logging.getLogger(__name__)

#: Where the service listens when neither ``address`` nor a setting says otherwise.


#: The segmentation capability's server: its catalog entry, its engines and its servicer.
SERVICE = EngineService(
    capability=CAPABILITY,
    add_to_server=pb_grpc.add_SegmentationServiceServicer_to_server,
    build_pool=build_engine_pool,
    default_model=DEFAULT_SEGMENTATION_MODEL,
    servicer=SegmentationServicer,
)


#: ``create_service(settings, *, address=None, registry=None, pool=None)``: see :meth:`EngineService.create`.
create_service = SERVICE.create
