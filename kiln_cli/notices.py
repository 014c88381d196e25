"""Third-party notices that ``kiln`` keeps off the console.

Each one is expected on every Kiln host and says nothing a user can act on; left
in, they scroll by during ``make run`` and look like trouble. Applied once, at
the entry point (:func:`kiln_cli.main.main`), for ``kiln up`` and ``kiln serve``
alike. Everything else a library logs or warns still shows.
"""

from __future__ import annotations

import logging
import warnings

#: Log records dropped: (logger, how the message starts, why).
DROPPED_RECORDS: tuple[tuple[str, str, str], ...] = (
    (
        "transformers.utils.import_utils",
        "`CLIPImageProcessor` requires torchvision",
        "diffusers' Wan pipelines import CLIPImageProcessor; torchvision does not import beside "
        "the CPU torch, and Kiln uses the PIL processor transformers falls back to",
    ),
    (
        "diffusers.pipelines.pipeline_utils",
        "self.text_processor=None ",
        "the tiny LongCat build leaves its text processor out on purpose (services/image_gen/tiny.py)",
    ),
)

#: Loggers shown from WARNING up only: (logger, why).
QUIET_LOGGERS: tuple[tuple[str, str], ...] = (
    (
        "qwen_tts",
        "Qwen3-TTS logs at INFO each sub-config it fills with defaults, some twenty lines per load",
    ),
)

#: Python warnings ignored: (category, message regex, module regex, why).
IGNORED_WARNINGS: tuple[tuple[type[Warning], str, str, str], ...] = (
    (
        FutureWarning,
        r"`torch\.nn\.utils\.weight_norm` is deprecated",
        r"torch\.nn\.utils\.weight_norm",
        "diffusers' audio autoencoders (the music service) still build with the old weight_norm",
    ),
    (
        Warning,  # torch.jit.TracerWarning, named without importing torch
        r"Converting a tensor to a Python boolean might cause the trace to be incorrect",
        r"transformers\.models\.swin2sr\.",
        "Swin2SR's own window padding, traced once for ONNX; the upscale engine pads inputs to the "
        "window itself, so that branch is always the one traced",
    ),
)


class _DropStartingWith(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def quiet_expected_notices() -> None:
    """Installs the filters above (once per process: the entry point calls it)."""
    for logger, start, _why in DROPPED_RECORDS:
        logging.getLogger(logger).addFilter(_DropStartingWith(start))
    for logger, _why in QUIET_LOGGERS:
        logging.getLogger(logger).setLevel(logging.WARNING)
    for category, message, module, _why in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
