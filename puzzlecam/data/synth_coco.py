"""``python -m puzzlecam.data synth --format coco``: a procedural MS COCO-format data set.

The folder looks like COCO 2014's::

    OUT/train2014/COCO_train2014_000000000001.jpg ...
    OUT/val2014/COCO_val2014_000000000301.jpg ...
    OUT/annotations/instances_train2014.json, instances_val2014.json

Each instances file holds ``info``, ``licenses``, ``images`` (id, file_name, height, width), all 80
``categories`` with COCO's ids (1..90 with the real gaps, names from :data:`puzzlecam.datasets.COCO`) and
``annotations`` (id, image_id, category_id, segmentation, area, bbox, iscrowd) with every kind of
segmentation the converter has to handle: polygons (one or several per object), uncompressed RLE,
compressed RLE (pycocotools' string), and crowd regions (``iscrowd`` 1, RLE like COCO's). Every tenth
image (index 3, 13, 23, ...) has no annotation. Objects overlap, and each image is painted in its
annotations' order, so a later annotation covers an earlier one in the picture as in the mask. The
annotations of a file are interleaved across images and their ids are not in file order, so nothing may
rely on either.

Image i depends only on (seed, i); the whole folder is deterministic for a seed, and is written under a
temporary name beside ``out`` and renamed at the end, as ``synth`` (VOC) does.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from puzzlecam.data.coco import CATEGORY_IDS
from puzzlecam.data.synth import _background, _hsv_to_rgb, building_folder, check_arguments
from puzzlecam.datasets import COCO
from puzzlecam.utils.progress import ProgressBar

SPLITS = ("train2014", "val2014")
EMPTY_EVERY, EMPTY_AT = 10, 3  # image i has no annotation when i % 10 == 3
KINDS = ("polygon", "polygons", "rle", "rle_compressed", "crowd", "crowd_compressed")


@dataclass
class SynthCocoResult:
    """What :func:`synthesize_coco` wrote: the folder, the labels used, the image keys of each split and the keys
    of the images without annotations."""

    out: Path
    classes: list[int]
    splits: dict[str, list[str]]
    without_annotations: list[str]


def _fortran_runs(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts of a binary mask: run lengths in column-major order, zeros first."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat.size and flat[0] else runs


def _polygon(rng, cx: float, cy: float, radius: float, h: int, w: int) -> list[float]:
    """A star-shaped polygon around (cx, cy) with its points clamped into [0, w] x [0, h], 2 decimals."""
    n = int(rng.integers(5, 13))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = radius * rng.uniform(0.55, 1.0, n)
    xs = np.clip(cx + radii * np.cos(angles), 0, w)
    ys = np.clip(cy + radii * np.sin(angles), 0, h)
    return [round(float(v), 2) for xy in zip(xs, ys, strict=True) for v in xy]


def _blob(rng, h: int, w: int, cx: float, cy: float, radius: float, crowd: bool) -> np.ndarray:
    """A binary (H, W) region: a noisy ellipse, or for a crowd several small ones."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros((h, w), dtype=bool)
    for _ in range(int(rng.integers(3, 7)) if crowd else 1):
        r = radius * (rng.uniform(0.3, 0.5) if crowd else 1.0)
        ox, oy = (rng.uniform(-radius, radius), rng.uniform(-radius, radius)) if crowd else (0.0, 0.0)
        ax, ay = r * rng.uniform(0.6, 1.0), r * rng.uniform(0.6, 1.0)
        wobble = 1 + 0.15 * np.sin(rng.uniform(2, 5) * np.arctan2(yy - cy - oy, xx - cx - ox) + rng.uniform(0, 6))
        out |= ((xx - cx - ox) / ax) ** 2 + ((yy - cy - oy) / ay) ** 2 <= wobble**2
    return out


def _kinds(rng, index: int, n: int) -> list[str]:
    """Segmentation kinds of an image's n objects: mostly polygons, the first one cycling through every kind
    (index % 5) so that any five consecutive images hold each kind."""
    kinds = [("polygon", "polygons")[int(rng.random() < 0.3)] for _ in range(n)]
    kinds[0] = ("rle", "rle_compressed", "crowd", "polygons", "crowd_compressed")[index % 5]
    return kinds


def make_coco_scene(seed: int, index: int, size: int, labels: list[int]):
    """Image ``index``: (rgb uint8 (H, W, 3), annotations [{label, iscrowd, segmentation}] in painting order)."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng([seed, index, 2014])
    short = int(rng.integers(int(0.75 * size), size + 1))
    h, w = (size, short) if rng.integers(0, 2) else (short, size)
    img = _background(rng, h, w)
    annotations = []
    n = 0 if index % EMPTY_EVERY == EMPTY_AT else int(rng.integers(1, 5))
    for kind in _kinds(rng, index, n) if n else []:
        label = labels[int(rng.integers(0, len(labels)))]
        radius = rng.uniform(0.15, 0.35) * min(h, w)
        cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
        crowd = kind.startswith("crowd")
        if kind in ("polygon", "polygons"):
            parts = 1 if kind == "polygon" else 2
            segmentation = [
                _polygon(rng, cx + k * radius * 0.9, cy - k * radius * 0.4, radius / parts, h, w) for k in range(parts)
            ]
            pixels = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))).astype(bool)
        else:
            pixels = _blob(rng, h, w, cx, cy, radius, crowd)
            if not pixels.any():
                continue
            if kind in ("rle", "crowd"):
                segmentation = {"counts": _fortran_runs(pixels), "size": [h, w]}
            else:
                rle = mask_utils.encode(np.asfortranarray(pixels.astype(np.uint8)))
                segmentation = {"counts": rle["counts"].decode("ascii"), "size": [h, w]}
        hue = (label * 0.61803) % 1.0
        colour = _hsv_to_rgb(hue, rng.uniform(0.5, 0.9), rng.uniform(0.5, 0.95))
        yy, xx = np.nonzero(pixels)
        texture = 15 * np.sin(0.3 * xx + label)[:, None]
        img[yy, xx] = colour + texture
        annotations.append({"label": label, "iscrowd": int(crowd), "segmentation": segmentation})
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), annotations


def _annotation_fields(segmentation, h: int, w: int) -> tuple[float, list[float]]:
    """(area, bbox) as COCO gives them, from pycocotools."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, h, w)
    else:
        rle = segmentation
    area = float(mask_utils.area(rle))
    bbox = [round(float(v), 2) for v in mask_utils.toBbox(rle)]
    return area, bbox


def _instances(split: str, entries, annotations, seed: int) -> dict:
    """The instances file of one split: annotations interleaved across images (each image's own order kept)
    and numbered by a permutation, so neither their file order nor their ids follow the images."""
    rng = np.random.default_rng([seed, SPLITS.index(split), 90])
    owners = [k for k, anns in enumerate(annotations) for _ in anns]
    order = rng.permutation(len(owners))
    ann_ids = (rng.permutation(len(owners)) + 1).tolist()
    taken = [0] * len(annotations)
    listed = []
    for slot, position in enumerate(order):
        k = owners[position]
        ann = annotations[k][taken[k]]
        taken[k] += 1
        entry = entries[k]
        area, bbox = _annotation_fields(ann["segmentation"], entry["height"], entry["width"])
        listed.append(
            {
                "id": ann_ids[slot],
                "image_id": entry["id"],
                "category_id": CATEGORY_IDS[ann["label"]],
                "segmentation": ann["segmentation"],
                "area": area,
                "bbox": bbox,
                "iscrowd": ann["iscrowd"],
            }
        )
    categories = [
        {"supercategory": "synthetic", "id": cat_id, "name": name}
        for cat_id, name in zip(CATEGORY_IDS, COCO.classes, strict=True)
    ]
    return {
        "info": {"description": f"puzzlecam synthetic COCO-format set, seed {seed}", "version": "1.0"},
        "licenses": [],
        "images": entries,
        "annotations": listed,
        "categories": categories,
    }


def synthesize_coco(
    out,
    *,
    num_images: int,
    size: int = 160,
    seed: int = 0,
    classes=COCO.classes,
    val_fraction: float = 0.25,
    overwrite: bool = False,
) -> SynthCocoResult:
    """Write a COCO-format folder (``train2014/``, ``val2014/``, ``annotations/instances_*.json``) of
    ``num_images`` images, the last ``round(num_images * val_fraction)`` of them in val2014; returns what it wrote.

    Bad arguments or an existing ``out`` without ``overwrite`` raise :class:`~puzzlecam.errors.UsageError`.
    """
    labels = check_arguments(list(classes), num_images, size, val_fraction, COCO)
    out = Path(out)
    n_val = int(round(num_images * val_fraction))
    split_of = [SPLITS[int(i >= num_images - n_val)] for i in range(num_images)]
    entries = {s: [] for s in SPLITS}
    annotations = {s: [] for s in SPLITS}
    keys = {s: [] for s in SPLITS}
    without = []
    with building_folder(out, overwrite) as tmp:
        for d in (*SPLITS, "annotations"):
            (tmp / d).mkdir(parents=True)
        with ProgressBar("synthesizing COCO", total=num_images, transient=True) as bar:
            for i in range(num_images):
                split = split_of[i]
                rgb, anns = make_coco_scene(seed, i, size, labels)
                key = f"COCO_{split}_{i + 1:012d}"
                buf = io.BytesIO()
                Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
                (tmp / split / f"{key}.jpg").write_bytes(buf.getvalue())
                h, w = rgb.shape[:2]
                entries[split].append({"id": i + 1, "file_name": f"{key}.jpg", "height": h, "width": w})
                annotations[split].append(anns)
                keys[split].append(key)
                if not anns:
                    without.append(key)
                bar.advance()
        for split in SPLITS:
            instances = _instances(split, entries[split], annotations[split], seed)
            (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(instances))
    return SynthCocoResult(out=out, classes=labels, splits=keys, without_annotations=without)
