"""The music gRPC server: bootstrap, model loading, shutdown.

``create_service`` builds the standard server (interceptors, health,
reflection) around :class:`MusicServicer`; once started, a background task
loads the music models on their worker threads (building the tiny ACE-Step
on first use), and health turns SERVING as soon as the default model
(``ace-step-v1.5``) can serve.

Settings used: ``KILN_MUSIC_ADDRESS`` (unless ``address`` is given),
``registry_path``, ``resolved_model_cache_dir``, ``torch_threads``,
``max_prompt_chars``, ``max_input_audio_bytes`` and
``grpc_max_message_bytes``.
"""

from __future__ import annotations

from kiln.music.v1 import music_service_pb2_grpc as pb_grpc
from services.common.grpc_server import EngineService
from services.common.registry import DEFAULT_MUSIC_MODEL
from services.music import CAPABILITY
from services.music.engines import build_music_pool
from services.music.servicer import MusicServicer

#: The music capability's server: its catalog entry, its engines and its servicer.
SERVICE = EngineService(
    capability=CAPABILITY,
    add_to_server=pb_grpc.add_MusicServiceServicer_to_server,
    build_pool=build_music_pool,
    default_model=DEFAULT_MUSIC_MODEL,
    servicer=MusicServicer,
)


#: ``create_service(settings, *, address=None, registry=None, pool=None)``: see :meth:`EngineService.create`.
create_service = SERVICE.create
