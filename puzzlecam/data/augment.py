"""Training augmentation of the method (docs/method.md) on uint8 images (normalization happens later on the device).

Rescale so that the long side is uniform in [min_long_side, max_long_side] (integers, bicubic),
horizontal flip with probability 1/2, random crop of ``crop_size``. An image smaller than the crop
in a dimension is placed at the TOP-LEFT of a zero canvas (docs/data.md); ``valid`` records the
(height, width) of the image part of the canvas so that ops.prepare_inputs can zero the padding
after normalization, as the reference code does.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


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
    h, w = image.shape[:2]
    long_side = int(rng.integers(min_long_side, max_long_side + 1))
    scale = long_side / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    flip = hflip and bool(rng.integers(0, 2))
    # Offsets are drawn for both axes even when unused so the stream of draws has a fixed shape.
    top = int(rng.integers(0, max(new_h - crop_size, 0) + 1))
    left = int(rng.integers(0, max(new_w - crop_size, 0) + 1))

    pil = Image.fromarray(image)
    if (new_w, new_h) != (w, h):
        pil = pil.resize((new_w, new_h), Image.BICUBIC)
    if flip:
        pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
    valid_h, valid_w = min(crop_size, new_h), min(crop_size, new_w)
    region = np.asarray(pil.crop((left, top, left + valid_w, top + valid_h)))
    canvas = np.zeros((crop_size, crop_size, 3), dtype=np.uint8) if out is None else out
    canvas[:valid_h, :valid_w] = region
    return canvas, (valid_h, valid_w)
