"""``python -m puzzlecam.data synth``: a procedural VOC-format data set with exact masks.

Each class has a body (a shape, rotated, with a hue centred on the class's own but jittered so
neighbouring classes overlap) and a small distinctive part: a square patch of a high-contrast
pattern (stripes, checks or dots) in a class-specific colour pair, about a third of the object's
size. The part identifies the class at a glance, the body only weakly, so a classifier keys on the
part and its CAM covers the object partially: the situation Puzzle-CAM is meant to improve.
Backgrounds are gradients with noise and clutter (including grey pattern decoys). One to three
objects per image; objects never cover an earlier object's part. Masks hold the exact object pixels
with a thin 255 (void) band on every boundary, as VOC's do.

Image i depends only on (seed, i): the output is deterministic for a seed. The folder is written
under a temporary name beside ``out`` and renamed at the end, so ``out`` is complete or absent (a
full or read-only disk is one :class:`~puzzlecam.errors.DiskError`, and an earlier ``out`` stays).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from puzzlecam import VOC_CLASSES, datasets
from puzzlecam.datasets import Dataset
from puzzlecam.errors import UsageError
from puzzlecam.utils.files import TEMP_MARK, commit_temporary, raise_disk_problem, temporary_path
from puzzlecam.utils.labelmap import IGNORE_INDEX, encode_label_png
from puzzlecam.utils.progress import ProgressBar

DEFAULT_CLASSES = ("aeroplane", "bird", "boat", "car", "cat", "dog", "person", "train")
SHAPES = ("ellipse", "rectangle", "triangle", "diamond", "hexagon", "rounded")
PATTERNS = ("hstripes", "vstripes", "checker", "dots")
COLOUR_PAIRS = (
    ((255, 255, 255), (20, 20, 20)),
    ((255, 220, 0), (0, 0, 170)),
    ((255, 0, 0), (0, 230, 230)),
    ((0, 200, 0), (255, 0, 255)),
    ((255, 140, 0), (0, 60, 0)),
)


def class_style(c: int) -> dict:
    """The fixed look of class index c (0..19): every (pattern, colour pair) combination is unique."""
    return {
        "shape": SHAPES[c % len(SHAPES)],
        "hue": (c * 0.61803) % 1.0,
        "pattern": PATTERNS[c % len(PATTERNS)],
        "colours": COLOUR_PAIRS[c // len(PATTERNS)],
    }


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb) * 255.0


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    if shape == "ellipse":
        return u**2 + v**2 <= 1
    if shape == "rectangle":
        return (au <= 0.95) & (av <= 0.8)
    if shape == "triangle":
        return (v <= 0.9) & (au <= (v + 1.0) / 2.0)
    if shape == "diamond":
        return au + av <= 1
    if shape == "hexagon":
        return (av <= 0.866) & (au * 0.866 + av * 0.5 <= 0.866)
    return au**4 + av**4 <= 1  # rounded square


def _pattern(kind: str, size: int, period: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    if kind == "hstripes":
        return (y // period) % 2 == 0
    if kind == "vstripes":
        return (x // period) % 2 == 0
    if kind == "checker":
        return (y // period + x // period) % 2 == 0
    cy, cx = (y % (2 * period)) - period + 0.5, (x % (2 * period)) - period + 0.5
    return cy**2 + cx**2 <= (0.6 * period) ** 2


def _boxes_overlap(a, b) -> float:
    """Intersection area over the smaller box's area; boxes are (y0, x0, y1, x1), exclusive ends."""
    ih = min(a[2], b[2]) - max(a[0], b[0])
    iw = min(a[3], b[3]) - max(a[1], b[1])
    if ih <= 0 or iw <= 0:
        return 0.0
    return ih * iw / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def _background(rng, h, w) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * x / w + np.sin(angle) * y / h + 1) / 2
    c0, c1 = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    for _ in range(int(rng.integers(4, 11))):  # clutter
        s = int(rng.uniform(0.05, 0.2) * min(h, w)) + 2
        y0, x0 = int(rng.integers(0, h - s // 2)), int(rng.integers(0, w - s // 2))
        colour = rng.uniform(0, 255, 3)
        region = img[y0 : y0 + s, x0 : x0 + s]
        kind = rng.integers(0, 4)
        if kind == 0:
            img[y0 : y0 + s, x0 : x0 + s] = colour
        elif kind == 1:
            yy, xx = np.mgrid[0 : region.shape[0], 0 : region.shape[1]]
            region[(yy - s / 2) ** 2 + (xx - s / 2) ** 2 <= (s / 2) ** 2] = colour
        elif kind == 2:
            img[y0 : y0 + max(1, s // 8), x0 : x0 + s * 2] = colour
        else:  # a grey pattern decoy: patterns alone do not mean "object"
            grey = rng.uniform(60, 200)
            patch = _pattern(PATTERNS[int(rng.integers(0, 4))], s, max(2, s // 5))[: region.shape[0], : region.shape[1]]
            region[patch] = grey
    return img


def _void_border(label: np.ndarray, width: int) -> np.ndarray:
    """255 on every pixel within ``width`` of a boundary between different labels (VOC style)."""
    edge = np.zeros(label.shape, dtype=bool)
    edge[1:, :] |= label[1:, :] != label[:-1, :]
    edge[:-1, :] |= label[1:, :] != label[:-1, :]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[:, :-1] |= label[:, 1:] != label[:, :-1]
    for _ in range(width - 1):
        grown = edge.copy()
        grown[1:, :] |= edge[:-1, :]
        grown[:-1, :] |= edge[1:, :]
        grown[:, 1:] |= edge[:, :-1]
        grown[:, :-1] |= edge[:, 1:]
        edge = grown
    out = label.copy()
    out[edge] = IGNORE_INDEX
    return out


@dataclass(frozen=True)
class Layout:
    """How a scene is laid out: how many objects (uniform in [min_objects, max_objects]) and how large (each
    side a uniform fraction in [min_scale, max_scale] of the image's short side, jittered by 0.8-1.2)."""

    min_objects: int = 1
    max_objects: int = 3
    min_scale: float = 0.3
    max_scale: float = 0.6


DEFAULT_LAYOUT = Layout()


def parse_layout(text: str) -> Layout:
    """``--layout OBJECTS:SCALE``, e.g. ``2-5:0.2-0.45`` -> Layout (the default is ``1-3:0.3-0.6``)."""
    try:
        objects, scale = text.split(":")
        lo_n, hi_n = (int(v) for v in objects.split("-"))
        lo_s, hi_s = (float(v) for v in scale.split("-"))
    except ValueError:
        raise UsageError(
            f"--layout must look like MIN-MAX:MINSCALE-MAXSCALE (e.g. 1-3:0.3-0.6), got {text!r}"
        ) from None
    if not (1 <= lo_n <= hi_n <= 8 and 0.1 <= lo_s <= hi_s <= 0.9):
        raise UsageError(
            f"--layout {text!r}: objects must satisfy 1 <= MIN <= MAX <= 8 and scales 0.1 <= MIN <= MAX <= 0.9"
        )
    return Layout(lo_n, hi_n, lo_s, hi_s)


def make_scene(seed: int, index: int, size: int, classes: list[int], layout: Layout = DEFAULT_LAYOUT):
    """Image ``index`` of the set: (rgb uint8 (H, W, 3), mask uint8 (H, W), objects [(class, box)])."""
    rng = np.random.default_rng([seed, index])
    short = int(rng.integers(int(0.75 * size), size + 1))
    h, w = (size, short) if rng.integers(0, 2) else (short, size)
    img = _background(rng, h, w)
    label = np.zeros((h, w), dtype=np.uint8)
    boxes, part_boxes, objects = [], [], []
    for _ in range(int(rng.integers(layout.min_objects, layout.max_objects + 1))):
        for _ in range(30):
            oh = int(rng.uniform(layout.min_scale, layout.max_scale) * min(h, w) * rng.uniform(0.8, 1.2))
            ow = int(rng.uniform(layout.min_scale, layout.max_scale) * min(h, w) * rng.uniform(0.8, 1.2))
            oh, ow = max(12, min(oh, h)), max(12, min(ow, w))
            y0, x0 = int(rng.integers(0, h - oh + 1)), int(rng.integers(0, w - ow + 1))
            box = (y0, x0, y0 + oh, x0 + ow)
            if all(_boxes_overlap(box, b) <= 0.25 for b in boxes) and all(
                _boxes_overlap(box, p) == 0 for p in part_boxes
            ):
                break
        else:
            continue
        c = classes[int(rng.integers(0, len(classes)))]
        style = class_style(c)
        yy, xx = np.mgrid[y0 : y0 + oh, x0 : x0 + ow].astype(np.float32)
        u, v = (xx - x0 - ow / 2 + 0.5) / (ow / 2), (yy - y0 - oh / 2 + 0.5) / (oh / 2)
        theta = rng.uniform(-0.5, 0.5)
        ur, vr = np.cos(theta) * u + np.sin(theta) * v, -np.sin(theta) * u + np.cos(theta) * v
        shape = _shape_mask(style["shape"], ur, vr)
        if shape.sum() < 40:
            continue
        # Body: class hue jittered enough that neighbouring classes overlap, plus a soft texture.
        hue = (style["hue"] + rng.uniform(-0.08, 0.08)) % 1.0
        colour = _hsv_to_rgb(hue, rng.uniform(0.4, 0.9), rng.uniform(0.5, 0.95))
        freq = rng.uniform(0.1, 0.3)
        texture = 18 * np.sin(freq * xx + rng.uniform(0, 6)) * np.cos(freq * yy + rng.uniform(0, 6))
        region = img[y0 : y0 + oh, x0 : x0 + ow]
        region[shape] = (colour + texture[..., None])[shape]
        # Part: a pattern square inside the body, about a third of the object's smaller side.
        ps = max(8, int(min(oh, ow) * rng.uniform(0.28, 0.36)))
        ys, xs = np.nonzero(shape)
        py, px = int(ys.mean()) - ps // 2, int(xs.mean()) - ps // 2
        for _ in range(20):
            ty, tx = int(rng.integers(0, max(1, oh - ps + 1))), int(rng.integers(0, max(1, ow - ps + 1)))
            if shape[ty : ty + ps, tx : tx + ps].all() and shape[ty : ty + ps, tx : tx + ps].shape == (ps, ps):
                py, px = ty, tx
                break
        py, px = max(0, min(py, oh - ps)), max(0, min(px, ow - ps))
        pattern = _pattern(style["pattern"], ps, max(2, ps // 5))
        inside = shape[py : py + ps, px : px + ps]
        pa, pb = np.array(style["colours"][0], float), np.array(style["colours"][1], float)
        part = np.where(pattern[: inside.shape[0], : inside.shape[1], None], pa, pb)
        preg = region[py : py + ps, px : px + ps]
        preg[inside] = part[inside]
        label[y0 : y0 + oh, x0 : x0 + ow][shape] = c + 1
        boxes.append(box)
        part_boxes.append((y0 + py, x0 + px, y0 + py + ps, x0 + px + ps))
        objects.append(c)
    img += rng.normal(0, 10, img.shape)
    rgb = np.clip(img, 0, 255).astype(np.uint8)
    found = []
    for k, c in enumerate(objects):  # boxes of the visible pixels of each object, for the XML
        y0, x0, y1, x1 = boxes[k]
        ys, xs = np.nonzero(label[y0:y1, x0:x1] == c + 1)
        if ys.size:
            found.append((c, (x0 + xs.min() + 1, y0 + ys.min() + 1, x0 + xs.max() + 1, y0 + ys.max() + 1)))
    mask = _void_border(label, max(1, round(size / 160)))
    return rgb, mask, found


def annotation_xml(image_id: str, h: int, w: int, objects) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2012"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    s = ET.SubElement(root, "size")
    for tag, val in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(s, tag).text = str(val)
    ET.SubElement(root, "segmented").text = "1"
    for c, (x0, y0, x1, y1) in objects:
        o = ET.SubElement(root, "object")
        ET.SubElement(o, "name").text = VOC_CLASSES[c]
        ET.SubElement(o, "pose").text = "Unspecified"
        ET.SubElement(o, "truncated").text = "0"
        ET.SubElement(o, "difficult").text = "0"
        b = ET.SubElement(o, "bndbox")
        for tag, val in (("xmin", x0), ("ymin", y0), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(b, tag).text = str(int(val))
        if VOC_CLASSES[c] == "person":  # VOC's person layout parts: never an image label
            p = ET.SubElement(o, "part")
            ET.SubElement(p, "name").text = "head"
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8") + b"\n"


@dataclass
class SynthResult:
    """What :func:`synthesize` wrote: the folder and the ids of each ImageSets/Segmentation list."""

    out: Path
    classes: list[int]
    splits: dict[str, list[str]]


def check_arguments(
    classes, num_images: int, size: int, val_fraction: float, dataset: Dataset = datasets.VOC
) -> list[int]:
    """The synthetic sets' argument checks (UsageErrors naming the flag); returns the classes' sorted indices
    in ``dataset``'s class list."""
    index = {name: i for i, name in enumerate(dataset.classes)}
    bad = [c for c in classes if c not in index]
    if bad:
        which = "" if dataset is datasets.DEFAULT else f"{dataset.name.upper()} "
        raise UsageError(f"--classes: unknown {which}class(es) {bad}; choose from {', '.join(dataset.classes)}")
    if not classes:
        raise UsageError("--classes: give at least one class")
    if num_images < 1:
        raise UsageError(f"--num-images must be >= 1, got {num_images}")
    if size < 32:
        raise UsageError(f"--size must be >= 32, got {size}")
    if not 0 <= val_fraction < 1:
        raise UsageError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    return sorted({index[c] for c in classes})


def synthesize(
    out,
    *,
    num_images: int,
    size: int,
    seed: int,
    classes=DEFAULT_CLASSES,
    val_fraction: float = 0.25,
    overwrite: bool = False,
    layout: Layout = DEFAULT_LAYOUT,
) -> SynthResult:
    """Write ``out``/{JPEGImages, Annotations, SegmentationClass, ImageSets/Segmentation}; returns what it wrote.

    Bad arguments or an existing ``out`` without ``overwrite`` raise :class:`~puzzlecam.errors.UsageError`.
    """
    class_ids = check_arguments(classes, num_images, size, val_fraction)
    out = Path(out)
    ids = [f"synth_{i:06d}" for i in range(num_images)]
    with building_folder(out, overwrite) as tmp:
        dirs = {k: tmp / k for k in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Segmentation")}
        for d in dirs.values():
            d.mkdir(parents=True)
        with ProgressBar("synthesizing", total=num_images, transient=True) as bar:
            for i, image_id in enumerate(ids):
                rgb, mask, objects = make_scene(seed, i, size, class_ids, layout)
                buf = io.BytesIO()
                Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
                (dirs["JPEGImages"] / f"{image_id}.jpg").write_bytes(buf.getvalue())
                (dirs["Annotations"] / f"{image_id}.xml").write_bytes(annotation_xml(image_id, *rgb.shape[:2], objects))
                (dirs["SegmentationClass"] / f"{image_id}.png").write_bytes(encode_label_png(mask))
                bar.advance()
        n_val = int(round(num_images * val_fraction))
        splits = {"train": ids[: num_images - n_val], "val": ids[num_images - n_val :], "trainval": ids}
        for name, members in splits.items():
            (dirs["ImageSets/Segmentation"] / f"{name}.txt").write_text("".join(f"{m}\n" for m in members))
    return SynthResult(out=out, classes=class_ids, splits=splits)


@contextlib.contextmanager
def building_folder(out: Path, overwrite: bool):
    """A temporary folder beside ``out`` to build a dataset in, which replaces ``out`` when the block ends
    (an existing ``out`` without ``overwrite`` is a UsageError); on an error it is removed (a full disk named)."""
    if out.exists() and not overwrite:
        raise UsageError(f"--out {out} exists; pass --overwrite to replace it")
    tmp = temporary_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        _replace_folder(tmp, out)
    except BaseException as exc:
        try:
            raise_disk_problem(out, exc)  # before the clean-up, so that a full disk still looks full
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_folder(new: Path, out: Path) -> None:
    """Rename the finished folder ``new`` to ``out``; an existing ``out`` is moved aside first and removed
    only once the new one is in place (renames take no room, so a full disk cannot stop half-way)."""
    old = out.with_name(f".{out.name}.old{TEMP_MARK}{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    commit_temporary(new, out)
    shutil.rmtree(old, ignore_errors=True)
