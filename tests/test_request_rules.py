"""The request rules of every capability stay torch-free, so the edge checks requests with them.

Each rules module is imported in a fresh interpreter (this one may already hold
torch), which then must hold none of the model libraries.
"""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest

#: Every capability's request rules module (one line each).
RULE_MODULES = [
    "services.image_gen.rules",
    "services.upscale.rules",
    "services.video.rules",
    "services.llm.rules",
    "services.music.rules",
    "services.segmentation.rules",
    "services.tts.rules",
]
#: Libraries a rules module must not import, directly or through its imports.
MODEL_LIBRARIES = ("torch", "diffusers", "transformers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", RULE_MODULES)
def test_rules_import_no_model_library(module: str) -> None:
    script = (
        "import importlib, sys\n"
        f"importlib.import_module({module!r})\n"
        f"print(' '.join(name for name in {MODEL_LIBRARIES!r} if name in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"{module} imports {done.stdout.strip()}"


def test_the_edges_choices_are_the_rules_own() -> None:
    """Where the edge's request models list choices (they become the OpenAPI enums and
    pydantic's messages), the lists are the rules' own."""
    from edge.schemas import ImageOptions, ImageToVideoForm, UpscaleRequest
    from services.common.proto_enums import IMAGE_FORMATS
    from services.image_gen.rules import OUTPUT_FORMATS
    from services.video.rules import DEFAULT_RESOLUTION, VIDEO_RESOLUTIONS

    def choices(model: type, field: str) -> tuple[str, ...]:
        args = typing.get_args(model.model_fields[field].annotation)
        literal = next((arg for arg in args if typing.get_origin(arg) is typing.Literal), None)
        return typing.get_args(literal if literal is not None else model.model_fields[field].annotation)

    assert choices(ImageOptions, "format") == OUTPUT_FORMATS
    assert choices(ImageOptions, "output_format") == OUTPUT_FORMATS
    assert choices(UpscaleRequest, "format") == tuple(IMAGE_FORMATS)
    assert choices(ImageToVideoForm, "resolution") == tuple(VIDEO_RESOLUTIONS)
    assert ImageToVideoForm.model_fields["resolution"].default == DEFAULT_RESOLUTION
