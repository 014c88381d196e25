"""The model cache: tiny random-weight builds made once, and the lock every model load holds.

:func:`ensure_tiny_model_directory` builds a tiny random-weight model once
into the model cache (under a safe directory name, renamed into place when
complete), for engines that have no registry weights directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


#: Held while any engine builds or loads a model. Loading patches torch for the
#: whole process (accelerate's ``init_empty_weights`` swaps
#: ``nn.Module.register_parameter`` globally), so a model constructed on another
#: thread at the same time would get meta tensors with no data. Loads are rare;
#: inference never takes this lock.
MODEL_LOAD_LOCK = threading.Lock()


def tiny_model_directory(cache_dir: Path, model_id: str, *, version: int) -> Path:
    """Where the tiny random-weight build of a model lives: ``<cache>/<safe id>-tiny-v<version>``.

    Ids made only of letters, digits, ``-``, ``_`` and ``.`` are used as they
    are; others (``owner/name``) get their unsafe characters replaced and a
    short hash of the id appended, so two ids never share a directory.
    """
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id).lstrip(".")
    if safe != model_id:
        safe = f"{safe}-{hashlib.sha256(model_id.encode()).hexdigest()[:8]}"
    return cache_dir / f"{safe}-tiny-v{version}"


def ensure_tiny_model_directory(
    cache_dir: Path, model_id: str, build: Callable[[Path], None], *, version: int
) -> Path:
    """The tiny model's directory, built first by ``build(staging_dir)`` when missing (blocking).

    The build happens in a temporary directory renamed into place at the end,
    so a crash never leaves half a model behind and concurrent builders agree.
    Call it while holding :data:`MODEL_LOAD_LOCK`.
    """
    target = tiny_model_directory(cache_dir, model_id, version=version)
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_dir))
    try:
        log.info("building tiny random-weight model %s in %s", model_id, target)
        build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():  # not a concurrent builder that won the race
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
