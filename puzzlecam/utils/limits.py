"""Bounds on what a file may make us allocate: a small file must not exhaust memory.

An image, mask, label map or CAM file declares its size in a header that costs nothing to forge (a
1.7 MB npz can declare a 30000 x 30000 map). Readers check the declared size against these bounds
before they decode or allocate, and refuse with a message naming the file.

* :func:`max_image_pixels`: height x width of any decoded image or map; PIL's own warning level
  (89,478,485 pixels, about 9459 x 9459) unless ``$PUZZLECAM_MAX_IMAGE_PIXELS`` says otherwise.
"""

from __future__ import annotations

import os

from puzzlecam.errors import UsageError

MAX_IMAGE_PIXELS_ENV = "PUZZLECAM_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS: the level where PIL warns of a decompression bomb


def max_image_pixels() -> int:
    """The largest height x width a reader accepts (``$PUZZLECAM_MAX_IMAGE_PIXELS``, default PIL's level)."""
    raw = os.environ.get(MAX_IMAGE_PIXELS_ENV, "")
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"${MAX_IMAGE_PIXELS_ENV}={raw!r}: expected a positive number of pixels")
    return value


def image_size_problem(height: int, width: int) -> str | None:
    """Why an image or map of ``height x width`` is refused (non-positive or above the bound), else None."""
    if height < 1 or width < 1:
        return f"its size {height}x{width} is empty or negative"
    limit = max_image_pixels()
    if height * width > limit:
        return (
            f"its size {height}x{width} = {height * width:,} pixels exceeds the bound of {limit:,} "
            f"(${MAX_IMAGE_PIXELS_ENV} raises it)"
        )
    return None
