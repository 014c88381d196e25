"""A tiny random-weight Swin2SR of the real architecture, for hosts without the weights.

An upscale model whose registry entry says ``weights = "tiny"`` (the
``swin2sr`` engine) is built here on first use: transformers'
``Swin2SRForImageSuperResolution`` (x2, pixelshuffle upsampler, window 8) in
a configuration small enough for a CPU, with weights drawn from a fixed
seed. It is saved with ``save_pretrained`` into
``<model cache>/<model id>-tiny-v<N>`` and from then on loaded exactly like
real weights, with ``from_pretrained``. Real-ESRGAN needs no tiny build: its
real weights ship in a package (:mod:`services.upscale.networks`).

Bump :data:`TINY_VERSION` when the configuration changes; old builds
are then ignored.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_VERSION = 1
#: The seed the tiny model's weights are drawn from.
TINY_SEED = 0


def build_tiny_swin2sr(directory: Path) -> None:
    """Saves a tiny random-weight ``Swin2SRForImageSuperResolution`` (x2, pixelshuffle) in ``directory``."""
    from transformers import Swin2SRConfig, Swin2SRForImageSuperResolution

    torch.manual_seed(TINY_SEED)
    config = Swin2SRConfig(
        image_size=64,
        num_channels=3,
        embed_dim=16,
        depths=[1, 2],
        num_heads=[2, 2],
        window_size=8,
        upscale=2,
        upsampler="pixelshuffle",
        img_range=1.0,
    )
    Swin2SRForImageSuperResolution(config).eval().save_pretrained(directory)
