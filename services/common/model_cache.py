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


def safe_model_name(model_id: str) -> str:
    """A model id as a file name: ids made only of letters, digits, ``-``, ``_`` and ``.`` are
    used as they are; others (``owner/name``) get their unsafe characters replaced and a short
    hash of the id appended, so two ids never share a name."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id).lstrip(".")
    if safe != model_id:
        safe = f"{safe}-{hashlib.sha256(model_id.encode()).hexdigest()[:8]}"
    return safe


def tiny_model_directory(cache_dir: Path, model_id: str, *, version: int) -> Path:
    """Where the tiny random-weight build of a model lives: ``<cache>/<safe id>-tiny-v<version>``."""
    return cache_dir / f"{safe_model_name(model_id)}-tiny-v{version}"


def derived_file_name(model_id: str, path: Path, kind: str) -> str:
    """The cache entry's name for what is made from a weights file (a conversion): keyed by the
    file's path, size and modification time, so an upgraded package converts again."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{safe_model_name(model_id)}-{kind}-{key}"


def ensure_tiny_model_directory(
    cache_dir: Path, model_id: str, build: Callable[[Path], None], *, version: int
) -> Path:
    """The tiny model's directory, built first by ``build(staging_dir)`` when missing (blocking).
    Call it while holding :data:`MODEL_LOAD_LOCK`."""
    target = tiny_model_directory(cache_dir, model_id, version=version)
    return build_directory_once(target, build, f"tiny random-weight model {model_id}")


def build_directory_once(target: Path, build: Callable[[Path], None], what: str) -> Path:
    """``target``, built first by ``build(staging_dir)`` when it does not exist yet (blocking).

    The build happens in a temporary directory next to it, renamed into place at
    the end, so a crash never leaves half a model behind and concurrent builders
    agree. Call it while holding :data:`MODEL_LOAD_LOCK`.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        log.info("building %s in %s, once", what, target)
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
