"""The image_gen gRPC server: bootstrap, model loading, shutdown.

``create_service`` builds the server (standard interceptors, health,
reflection) around :class:`ImageServiceServicer`; once started, a background
task loads the engines on their worker threads, and health turns SERVING as
soon as the default model (z-image-turbo) can serve. Health keeps answering
while models load and while they generate, because all model work happens off
the event loop. ``kiln serve image_gen`` runs it alone, as a container does.
"""

from __future__ import annotations

import logging

from kiln.image.v1 import image_service_pb2_grpc as pb_grpc
from services.common.grpc_server import EngineService
from services.common.registry import DEFAULT_IMAGE_MODEL
from services.image_gen import CAPABILITY
from services.image_gen.engines import build_engine_pool
from services.image_gen.servicer import ImageServiceServicer

log = logging.getLogger(__name__)


#: The image_gen capability's server: its catalog entry, its engines and its servicer.
SERVICE = EngineService(
    capability=CAPABILITY,
    add_to_server=pb_grpc.add_ImageServiceServicer_to_server,
    build_pool=build_engine_pool,
    default_model=DEFAULT_IMAGE_MODEL,
    servicer=ImageServiceServicer,
)


#: ``create_service(settings, *, address=None, registry=None, pool=None)``: see :meth:`EngineService.create`.
create_service = SERVICE.create
