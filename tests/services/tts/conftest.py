"""Fixtures for tts: the shipped registry's speech models on the real Piper voice."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.common.engine import EnginePool
from services.common.registry import Registry, load_registry
from services.common.settings import DEFAULT_REGISTRY
from services.tts.engines import build_speech_pool

#: Three sentences: Piper speaks them as three chunks.
SENTENCES = "The kiln is hot. The clay is ready. We fire at dawn."


@pytest.fixture(scope="session")
def tts_registry() -> Registry:
    return load_registry(Path(DEFAULT_REGISTRY))


@pytest.fixture(scope="session")
async def speech_pool(
    tts_registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[EnginePool]:
    """A loaded pool outside any server (engine-level tests), with a 200-character limit."""
    pool = build_speech_pool(tts_registry, cache_dir=tmp_path_factory.mktemp("tts-models"), max_chars=200)
    await pool.load()
    try:
        yield pool
    finally:
        await pool.close()
