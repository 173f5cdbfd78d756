"""The PASCAL VOC colour palette (index 0 background black, 1..20 classes, 255 void cream).

`VOC_PALETTE` is the flat list of 768 ints that `PIL.Image.putpalette` takes; `voc_colormap()`
is the same table as a (256, 3) uint8 array for indexing label maps with numpy.
"""

from __future__ import annotations

import numpy as np


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
