"""Label maps: the ignore index, the PASCAL VOC colour palette and palette-PNG encoding.

A label map is a (H, W) uint8 array of class indices: 0 background, 1..C classes and
:data:`IGNORE_INDEX` (255) for void / ignored pixels. On disk it is a palette ("P") PNG whose pixel
values are the indices and whose palette is the VOC colour map (index 0 black, 255 cream).
:data:`VOC_PALETTE` is the flat list of 768 ints that ``PIL.Image.putpalette`` takes;
:func:`voc_colormap` is the same table as a (256, 3) uint8 array for colouring label maps with numpy.

Decoding checks the size a PNG's header declares against the pixel bound of
:mod:`puzzlecam.utils.limits` before any pixel is decoded: a few bytes can declare gigabytes.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

from puzzlecam.utils.limits import image_size_problem

IGNORE_INDEX = 255
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _voc_color(index: int) -> tuple[int, int, int]:
    # VOC devkit's bit interleaving: bits 0,1,2 of the index go, from the top bit down, into R,G,B.
    r = g = b = 0
    for shift in range(7, -1, -1):
        r |= ((index >> 0) & 1) << shift
        g |= ((index >> 1) & 1) << shift
        b |= ((index >> 2) & 1) << shift
        index >>= 3
    return r, g, b


VOC_PALETTE: list[int] = [channel for i in range(256) for channel in _voc_color(i)]


def voc_colormap() -> np.ndarray:
    """(256, 3) uint8 RGB colours of label indices 0..255 (255 = void)."""
    return np.asarray(VOC_PALETTE, dtype=np.uint8).reshape(256, 3)


def encode_label_png(labels: np.ndarray) -> bytes:
    """A (H, W) uint8 label map as a palette PNG with the VOC palette (the same input gives the same bytes)."""
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    if labels.ndim != 2:
        raise ValueError(f"a label map must be (H, W), got shape {labels.shape}")
    image = Image.fromarray(labels)
    image.putpalette(VOC_PALETTE)  # an "L" image becomes "P" with these colours
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def png_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) that a PNG's IHDR chunk declares, read without decoding; None if ``data`` is no PNG."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return height, width


def decode_label_png(data: bytes) -> np.ndarray:
    """The indices of a palette ("P") or index ("L") PNG as (H, W) uint8; any other mode is a ValueError.

    A PNG that declares more pixels than the bound (:func:`puzzlecam.utils.limits.image_size_problem`)
    is a ValueError before anything is decoded.
    """
    size = png_size(data)
    if size is not None and (problem := image_size_problem(*size)) is not None:
        raise ValueError(f"label map refused before decoding: {problem}")
    with Image.open(io.BytesIO(data)) as image:
        if image.format != "PNG" or image.mode not in ("P", "L"):
            raise ValueError(
                f"label map is a {image.format} of mode {image.mode!r}; expected a palette ('P') or index ('L') PNG"
            )
        return np.array(image, dtype=np.uint8)
