"""The tts gRPC server: bootstrap, voice loading, shutdown.

``create_service`` builds the standard server (interceptors, health,
reflection) around :class:`TtsServicer`; once started, a background task loads
the voices on their worker threads, and health turns SERVING as soon as the
default voice (``piper-joe``) can speak.

Settings used: ``KILN_TTS_ADDRESS`` (unless ``address`` is given),
``registry_path``, ``resolved_model_cache_dir``, ``max_speech_chars``,
``max_reference_audio_seconds``, ``max_reference_audio_bytes``, ``torch_threads``
and ``grpc_max_message_bytes``. The service runs in its own environment
(``.venv-tts``: qwen-tts pins transformers 4.57.3); ``kiln up`` starts it there.
"""

from __future__ import annotations

from kiln.tts.v1 import tts_service_pb2_grpc as pb_grpc
from services.common.grpc_server import EngineService
from services.tts import CAPABILITY
from services.tts.engines import DEFAULT_SPEECH_MODEL, build_speech_pool
from services.tts.servicer import TtsServicer

#: The tts capability's server: its catalog entry, its engines and its servicer.
SERVICE = EngineService(
    capability=CAPABILITY,
    add_to_server=pb_grpc.add_TtsServiceServicer_to_server,
    build_pool=build_speech_pool,
    default_model=DEFAULT_SPEECH_MODEL,
    pool_options=lambda settings: {"max_chars": settings.max_speech_chars},
    servicer=TtsServicer,
)


#: ``create_service(settings, *, address=None, registry=None, pool=None)``: see :meth:`EngineService.create`.
create_service = SERVICE.create
