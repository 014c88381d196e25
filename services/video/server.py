"""The video gRPC server: bootstrap, model loading, shutdown.

``create_service`` builds the standard server (interceptors, health,
reflection) around :class:`VideoServiceServicer`; once started, a background
task loads the engines on their worker threads, and health turns SERVING as
soon as the default model (``turbodiffusion-wan2.2-i2v``) can serve. Health
keeps answering while the model loads and generates: all model work happens
off the event loop.

Settings used: ``KILN_VIDEO_ADDRESS`` (unless ``address`` is given),
``registry_path``, ``resolved_model_cache_dir``, ``torch_threads``,
``max_prompt_chars``, ``max_input_image_pixels``, ``max_input_image_bytes``
and ``grpc_max_message_bytes``.
"""

from __future__ import annotations

from kiln.video.v1 import video_service_pb2_grpc as pb_grpc
from services.common.grpc_server import EngineService
from services.common.registry import DEFAULT_VIDEO_MODEL
from services.video import CAPABILITY
from services.video.engines import build_engine_pool
from services.video.servicer import VideoServiceServicer

#: The video capability's server: its catalog entry, its engines and its servicer.
SERVICE = EngineService(
    capability=CAPABILITY,
    add_to_server=pb_grpc.add_VideoServiceServicer_to_server,
    build_pool=build_engine_pool,
    default_model=DEFAULT_VIDEO_MODEL,
    servicer=VideoServiceServicer,
)


#: ``create_service(settings, *, address=None, registry=None, pool=None)``: see :meth:`EngineService.create`.
create_service = SERVICE.create
