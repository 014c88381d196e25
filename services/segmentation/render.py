"""What a segmentation's PNG shows: the object on transparency (cutout) or a grey mask.

* **Cutout** (the default): the input image, same size, as RGBA; pixels
  outside the mask get alpha 0 (an input's own transparency is kept inside
  the mask). This is also what background removal returns.
* **Mask**: a greyscale (``L``) image of the input's size, 255 inside the
  mask and 0 outside.

With several candidate masks (``multimask_output``) each candidate is its own
PNG of the same kind, best first, with its score and coverage.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CUTOUT = "cutout"
MASK = "mask"


def cutout(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The image as RGBA with alpha 0 outside ``mask`` (a bool array of the image's height x width)."""
    rgba = np.array(image.convert("RGBA"))
    rgba[..., 3] = np.where(mask, rgba[..., 3], 0)
    return Image.fromarray(rgba)


def mask_image(mask: np.ndarray) -> Image.Image:
    """A grey ``L`` image: 255 inside the mask, 0 outside."""
    return Image.fromarray(np.where(mask, 255, 0).astype(np.uint8))


def render(image: Image.Image, mask: np.ndarray, kind: str) -> Image.Image:
    """:func:`cutout` or :func:`mask_image`, by ``kind``."""
    return mask_image(mask) if kind == MASK else cutout(image, mask)
