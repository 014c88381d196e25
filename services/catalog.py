"""The catalog: every gRPC service of the mesh, in start order (billing first).

Adding a capability is adding its package name here (see the README, "Adding a
capability"); each package declares its :class:`~services.common.capability.Capability`
as ``CAPABILITY`` in its ``__init__.py``.
"""

from __future__ import annotations

import importlib

from services.common.capability import Capability

PACKAGES = ("billing", "image_gen", "segmentation", "upscale", "llm", "tts", "music", "video")

CATALOG: tuple[Capability, ...] = tuple(
    importlib.import_module(f"services.{package}").CAPABILITY for package in PACKAGES
)
#: The capability services (everything but billing).
CAPABILITIES: tuple[Capability, ...] = tuple(c for c in CATALOG if not c.billing)
BILLING: Capability = next(c for c in CATALOG if c.billing)


def capability(name: str) -> Capability:
    """The catalog entry called ``name``."""
    for entry in CATALOG:
        if entry.name == name:
            return entry
    raise KeyError(f"no service called {name!r} in the catalog ({', '.join(c.name for c in CATALOG)})")
