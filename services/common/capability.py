"""What a Kiln service package declares about itself: :class:`Capability`.

Each package under ``services/`` declares one ``CAPABILITY`` in its
``__init__.py`` (strings and numbers only, so reading the catalog imports no
model code), and :mod:`services.catalog` lists the packages. Everything that
wires the mesh (the ``kiln`` command, the Envoy config, the edge's upstream
channels, ``/readyz``, the test and bench meshes) iterates the catalog.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

if TYPE_CHECKING:
    from services.common.grpc_server import GrpcService
    from services.common.settings import Settings


@dataclass(frozen=True)
class Capability:
    """A gRPC service of the mesh."""

    #: The package name under ``services/`` and the service's name everywhere else:
    #: ``kiln serve <name>``, ``KILN_<NAME>_ADDRESS``, the Envoy cluster, ``/readyz``.
    name: str
    #: The full name of its gRPC service (``kiln.image.v1.ImageService``).
    service: str
    #: The port of its default address (``127.0.0.1:<port>``).
    port: int
    #: ``module:function`` of its ``create_service(settings, *, address=None)``.
    server: str
    #: The Python environment it runs in: ``main`` (``.venv``) or ``tts`` (``.venv-tts``,
    #: whose qwen-tts pins another transformers): such a service always runs as a child
    #: process on that environment's Python.
    environment: Literal["main", "tts"] = "main"
    #: Money moves through it: started first, stopped last, never exposed by Envoy by default.
    billing: bool = False

    @property
    def address_variable(self) -> str:
        """The environment variable of its dial address."""
        return f"KILN_{self.name.upper()}_ADDRESS"

    @property
    def default_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def create(self, settings: Settings, **kwargs: Any) -> GrpcService:
        """Builds (binds, does not start) the service: imports its server module now."""
        module, _, function = self.server.partition(":")
        create = cast(
            Callable[..., Awaitable["GrpcService"]], getattr(importlib.import_module(module), function)
        )
        return await create(settings, **kwargs)
