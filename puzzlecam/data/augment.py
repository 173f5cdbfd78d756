"""Training augmentation of the method (docs/method.md) on uint8 images (normalization happens later on the device).

Rescale so that the long side is uniform in [min_long_side, max_long_side] (integers, bicubic),
horizontal flip with probability 1/2, random crop of ``crop_size``. An image smaller than the crop
in a dimension is placed at the TOP-LEFT of a zero canvas (docs/data.md); ``valid`` records the
(height, width) of the image part of the canvas so that ops.prepare_inputs can zero the padding
after normalization, as the reference code does.

A label map of the image (stages 2 and 3) gets exactly the same geometry (:func:`draw_geometry` once,
:func:`apply_geometry` to both) with nearest-neighbour resizing, on a canvas of 255 (ignored).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Geometry:
    """One draw of the augmentation: resize to (height, width), flip, then crop at (top, left)."""

    height: int
    width: int
    flip: bool
    top: int
    left: int
    crop_size: int

    @property
    def valid(self) -> tuple[int, int]:
        """(valid_h, valid_w): the part of the crop canvas the image covers (from the top-left)."""
        return min(self.crop_size, self.height), min(self.crop_size, self.width)


def draw_geometry(
    size: tuple[int, int], rng: np.random.Generator, crop_size: int, min_long_side: int, max_long_side: int, hflip: bool
) -> Geometry:
    """The random geometry for an image of ``size`` (H, W). All randomness from ``rng``, always the same draws."""
    h, w = size
    long_side = int(rng.integers(min_long_side, max_long_side + 1))
    scale = long_side / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    flip = hflip and bool(rng.integers(0, 2))
    # Offsets are drawn for both axes even when unused so the stream of draws has a fixed shape.
    top = int(rng.integers(0, max(new_h - crop_size, 0) + 1))
    left = int(rng.integers(0, max(new_w - crop_size, 0) + 1))
    return Geometry(new_h, new_w, flip, top, left, crop_size)


def apply_geometry(array: np.ndarray, geometry: Geometry, resample: int, canvas: np.ndarray) -> None:
    """Resize (``resample``: a PIL filter), flip and crop ``array`` (H, W[, C]) into the top-left of ``canvas``
    (crop, crop[, C]), whose other pixels are left as they are (the padding value)."""
    pil = Image.fromarray(array)
    if (geometry.width, geometry.height) != pil.size:
        pil = pil.resize((geometry.width, geometry.height), resample)
    if geometry.flip:
        pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
    valid_h, valid_w = geometry.valid
    canvas[:valid_h, :valid_w] = np.asarray(
        pil.crop((geometry.left, geometry.top, geometry.left + valid_w, geometry.top + valid_h))
    )


def augment(
    image: np.ndarray,
    rng: np.random.Generator,
    crop_size: int,
    min_long_side: int,
    max_long_side: int,
    hflip: bool,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """(H, W, 3) uint8 -> ((crop, crop, 3) uint8 canvas, (valid_h, valid_w)). All randomness from ``rng``.

    ``out``: a zeroed (crop, crop, 3) uint8 array to write into (e.g. a slice of the batch array).
    """
    geometry = draw_geometry(image.shape[:2], rng, crop_size, min_long_side, max_long_side, hflip)
    canvas = np.zeros((crop_size, crop_size, 3), dtype=np.uint8) if out is None else out
    apply_geometry(image, geometry, Image.BICUBIC, canvas)
    return canvas, geometry.valid
