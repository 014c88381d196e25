"""Optimized backends: ONNX export once into the model cache, ONNX Runtime sessions, the backend choice."""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from services.common.engine import EngineUnavailable

log = logging.getLogger(__name__)


#: ONNX Runtime execution providers, fastest first; a session gets those the host has.
ONNX_PROVIDER_PREFERENCE: tuple[str, ...] = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
#: The ONNX opset networks are exported with.
ONNX_OPSET = 17


def onnx_providers(available: Sequence[str] | None = None) -> list[str]:
    """The execution providers to ask for, in :data:`ONNX_PROVIDER_PREFERENCE` order, among
    ``available`` (default: what ``onnxruntime.get_available_providers()`` lists)."""
    if available is None:
        import onnxruntime

        available = onnxruntime.get_available_providers()
    chosen = [name for name in ONNX_PROVIDER_PREFERENCE if name in available]
    return chosen or ["CPUExecutionProvider"]


def resolve_engine_backend(setting: str) -> str:
    """``"onnxruntime"`` or ``"torch"`` for the ``engine_backend`` setting.

    ``auto`` is onnxruntime when it is importable, else torch; asking for
    onnxruntime on a host without it raises :class:`EngineUnavailable`.
    """
    has_ort = importlib.util.find_spec("onnxruntime") is not None
    if setting == "auto":
        return "onnxruntime" if has_ort else "torch"
    if setting == "onnxruntime" and not has_ort:
        raise EngineUnavailable("engine_backend is onnxruntime, but onnxruntime is not installed")
    if setting not in ("onnxruntime", "torch"):
        raise EngineUnavailable(f"unknown engine_backend '{setting}' (auto, onnxruntime or torch)")
    return setting


def onnx_cache_path(cache_dir: Path, name: str, weights_digest: str, *, opset: int = ONNX_OPSET) -> Path:
    """Where the ONNX export of a network lives: keyed by its weights' hash and the opset."""
    return cache_dir / "onnx" / f"{name}-{weights_digest[:16]}-opset{opset}.onnx"


def ensure_onnx_export(
    module: Any,
    example: Any,
    path: Path,
    *,
    opset: int = ONNX_OPSET,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
) -> Path:
    """Exports a torch module (one input ``x``, one output ``y``) to ``path`` unless it is there.

    TorchScript-based export (``dynamo=False``); ``dynamic_axes`` defaults to
    dynamic batch, height and width. Written to a temporary file and renamed
    into place, so a crash never leaves half a model. Blocking; hold
    :data:`MODEL_LOAD_LOCK`.
    """
    import torch

    if path.is_file():
        return path
    axes = dynamic_axes or {"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 2: "oh", 3: "ow"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        log.info("exporting %s to ONNX (opset %d)", path.name, opset)
        with torch.no_grad():
            torch.onnx.export(
                module,
                (example,),
                staging,
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={k: dict(v) for k, v in axes.items()},
                opset_version=opset,
                dynamo=False,
            )
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return path


def onnx_session(path: Path, *, threads: int | None = None, providers: Sequence[str] | None = None) -> Any:
    """An ONNX Runtime session on the best providers the host has (full graph optimisation,
    denormals as zero, no spinning threads)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Denormals flushed to zero (as torch engines do with ``set_flush_denormal``), and no
    # busy-waiting intra-op threads stealing the CPU from other engines between runs.
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(
        str(path), sess_options=options, providers=list(providers or onnx_providers())
    )
