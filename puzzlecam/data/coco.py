"""``python -m puzzlecam.data shard --coco-images DIR --coco-annotations FILE``: MS COCO -> tar shards + manifest.

The semantics are design.md §11's (docs/data.md, "MS COCO"):

* classes: the 80 categories of ``FILE`` in the order of their ids (1..90 with gaps) -> labels 0..79; their
  names must be :data:`puzzlecam.datasets.COCO`'s, so label c always means ``COCO.classes[c]``;
* image labels: every category with an annotation in the image, crowd included;
* masks: 0 background, c + 1 for label c, painted in the order of the annotations in ``FILE`` (a later
  annotation covers an earlier one) as pycocotools renders them (``frPyObjects`` + ``merge`` for
  polygons, ``frPyObjects`` for uncompressed RLE, compressed RLE as it is: ``COCO.annToRLE``), then
  every crowd region set to 255 (ignored);
* images without annotations are left out (and counted); the others are sorted by their id, the file
  name without its extension (``COCO_train2014_000000000009``).

Per sample the shard holds ``jpg`` (the file's bytes, never re-encoded), ``json`` ({dataset: "coco", id,
labels, height, width}) and ``seg.png`` (the mask, VOC palette), with the tar layout, manifest rows and
atomic, deterministic writing of the VOC shards (:mod:`puzzlecam.data.shard`).

Two passes: pass 1 reads ``FILE`` and checks what it says (categories, image entries, every annotation's
image and category, every image file present); pass 2 checks each annotation's geometry against its
image, decodes the JPEG fully and renders the mask, in ``workers`` processes when asked; one writer
takes their results in id order, so the shards are byte-identical for any number of workers.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from puzzlecam.data.parallel import OrderedPool
from puzzlecam.data.shard import (
    Problem,
    ShardResult,
    SplitOutput,
    check_shard_flags,
    problem_listing,
)
from puzzlecam.data.shards import ImageTooLarge, open_image
from puzzlecam.datasets import COCO
from puzzlecam.errors import DataError, UsageError
from puzzlecam.utils.labelmap import IGNORE_INDEX, encode_label_png
from puzzlecam.utils.limits import image_size_problem
from puzzlecam.utils.progress import ProgressBar

log = logging.getLogger(__name__)

# The ids of COCO's 80 categories (1..90 without 12, 26, 29, 30, 45, 66, 68, 69, 71, 83), in label order:
# the ids of the class names of puzzlecam.datasets.COCO.
CATEGORY_GAPS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in CATEGORY_GAPS)
assert len(CATEGORY_IDS) == COCO.num_classes
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")
# Characters of a compressed RLE string (pycocotools' rleToString: 6 bits per character from '0').
_RLE_CHARS = re.compile(r"[0-o]*")


@dataclass(frozen=True)
class CocoAnnotation:
    """One annotation of an image: its id (for messages), label 0..79, crowd flag and segmentation as in the JSON."""

    ann_id: object
    label: int
    iscrowd: bool
    segmentation: object


@dataclass
class CocoImage:
    """One image to convert: its key (the file name without extension), file, declared size and annotations
    in the order of the annotation file."""

    key: str
    coco_id: int
    path: Path
    height: int
    width: int
    annotations: list[CocoAnnotation] = field(default_factory=list)


@dataclass
class CocoShardResult(ShardResult):
    """:class:`ShardResult` of a COCO split, with the images left out for having no annotation and the number
    of images left out for bad input (``skipped`` lists the problems, several per image possible)."""

    without_annotations: list[str] = field(default_factory=list)
    skipped_images: int = 0
    dataset: str = "coco"


# ---------------------------------------------------------------------------------------------
# Pass 1: the annotation file


def read_annotation_file(path: Path) -> dict:
    """The parsed annotation file; a :class:`DataError` naming it when it is missing, no JSON, or not a COCO
    instances file (an object with the lists ``images``, ``annotations`` and ``categories``)."""
    if not path.is_file():
        raise DataError(f"--coco-annotations {path}: no such file")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"--coco-annotations {path}: malformed JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise DataError(f"--coco-annotations {path}: malformed JSON: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"--coco-annotations {path}: expected a JSON object, got a {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            what = "missing" if key not in data else f"a {type(data[key]).__name__}, not a list"
            raise DataError(f"--coco-annotations {path}: {key!r} is {what} (not a COCO instances file)")
    return data


def category_labels(categories: list, path: Path) -> dict[int, int]:
    """Category id -> label 0..79 (the ids in increasing order); a :class:`DataError` unless the categories are
    COCO's 80, their names in id order those of :data:`puzzlecam.datasets.COCO`."""
    ids, names = [], {}
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise DataError(f"--coco-annotations {path}: categories[{i}] needs an integer 'id' and a string 'name'")
        if cat["id"] in names:
            raise DataError(f"--coco-annotations {path}: category id {cat['id']} is listed twice")
        ids.append(cat["id"])
        names[cat["id"]] = cat["name"]
    ordered = [names[i] for i in sorted(ids)]
    if tuple(ordered) != COCO.classes:
        diff = [
            f"label {k}: {got!r} (expected {want!r})"
            for k, (got, want) in enumerate(zip(ordered, COCO.classes, strict=False))
            if got != want
        ]
        raise DataError(
            f"--coco-annotations {path}: its {len(ordered)} categories in id order are not COCO's "
            f"{COCO.num_classes}" + (f": {'; '.join(diff[:5])}" if diff else "")
        )
    return {cat_id: label for label, cat_id in enumerate(sorted(ids))}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _image_entry(entry, index: int, images_dir: Path, path: Path) -> tuple[CocoImage | None, Problem | None]:
    """A :class:`CocoImage` (without annotations) from ``images[index]``, or the problem with it."""
    if not isinstance(entry, dict) or not _is_int(entry.get("id")):
        return None, Problem(f"images[{index}]", path, "needs an integer 'id'")
    name = entry.get("file_name")
    if not isinstance(name, str) or not name:
        return None, Problem(f"image {entry['id']}", path, "needs a string 'file_name'")
    parts = PurePosixPath(name)
    if parts.is_absolute() or ".." in parts.parts or "\\" in name:
        return None, Problem(f"image {entry['id']}", path, f"file_name {name!r} leaves --coco-images")
    key = parts.stem
    if not key or "." in key or not key.isprintable() or any(c.isspace() for c in key):
        return None, Problem(
            f"image {entry['id']}",
            path,
            f"file_name {name!r}: the id {key!r} must be non-empty, printable, "
            "without dots or spaces (it names the sample in the shards)",
        )
    height, width = entry.get("height"), entry.get("width")
    if not (_is_int(height) and _is_int(width)):
        return None, Problem(key, path, f"image {entry['id']} needs integer 'height' and 'width'")
    if (problem := image_size_problem(height, width)) is not None:
        return None, Problem(key, path, f"image {entry['id']}: {problem}")
    return CocoImage(key, entry["id"], images_dir / parts, height, width), None


@dataclass
class CocoPlan:
    """Pass 1's outcome: the images to convert (sorted by key), the keys of the images without annotations, the
    problems (per refused image, then the annotations of unknown images) and the refused images' names."""

    images: list[CocoImage]
    without_annotations: list[str]
    problems: list[Problem]
    refused: set[str]


def plan_images(data: dict, images_dir: Path, path: Path) -> CocoPlan:
    """Pass 1 over the parsed annotation file.

    An image with any problem is not converted; an annotation of an unknown image is a problem of its own.
    """
    labels = category_labels(data["categories"], path)
    problems: dict[str, list[Problem]] = {}  # per image key (or entry name), in file order
    by_id: dict[int, CocoImage] = {}
    bad_ids: set[int] = set()
    keys: dict[str, int] = {}
    for index, entry in enumerate(data["images"]):
        image, problem = _image_entry(entry, index, images_dir, path)
        if problem is not None:
            problems.setdefault(problem.image_id, []).append(problem)
            if isinstance(entry, dict) and _is_int(entry.get("id")):
                bad_ids.add(entry["id"])
            continue
        if image.coco_id in by_id or image.coco_id in bad_ids:
            twice = [image] + ([by_id.pop(image.coco_id)] if image.coco_id in by_id else [])
            for im in twice:
                problems.setdefault(im.key, []).append(Problem(im.key, path, f"image id {im.coco_id} is listed twice"))
            bad_ids.add(image.coco_id)
            continue
        if image.key in keys:
            problems.setdefault(image.key, []).append(
                Problem(image.key, path, f"images {keys[image.key]} and {image.coco_id} have the same id {image.key!r}")
            )
            bad_ids.update((image.coco_id, keys[image.key]))
            continue
        keys[image.key] = image.coco_id
        by_id[image.coco_id] = image
    orphans: list[Problem] = []
    for index, ann in enumerate(data["annotations"]):
        name = f"annotation {ann['id']}" if isinstance(ann, dict) and "id" in ann else f"annotations[{index}]"
        if not isinstance(ann, dict):
            orphans.append(Problem(name, path, "not a JSON object"))
            continue
        image_id = ann.get("image_id")
        if image_id in bad_ids:
            continue  # its image is already refused
        image = by_id.get(image_id) if _is_int(image_id) else None
        if image is None:
            orphans.append(Problem(name, path, f"its image_id {image_id!r} is not one of the images"))
            continue
        problem = None
        category = ann.get("category_id")
        iscrowd = ann.get("iscrowd", 0)
        if not _is_int(category) or category not in labels:
            problem = f"category_id {category!r} is not one of the categories"
        elif iscrowd not in (0, 1) or isinstance(iscrowd, float):
            problem = f"iscrowd {iscrowd!r} is not 0 or 1"
        elif "segmentation" not in ann:
            problem = "no 'segmentation'"
        if problem is not None:
            problems.setdefault(image.key, []).append(Problem(image.key, path, f"{name}: {problem}"))
            continue
        image.annotations.append(CocoAnnotation(ann.get("id"), labels[category], bool(iscrowd), ann["segmentation"]))
    for image in by_id.values():  # pass 1 also finds the missing image files
        if not image.path.is_file():
            problems.setdefault(image.key, []).append(Problem(image.key, image.path, "image file missing"))
    good = sorted((im for im in by_id.values() if im.key not in problems), key=lambda im: im.key)
    return CocoPlan(
        images=[im for im in good if im.annotations],
        without_annotations=[im.key for im in good if not im.annotations],
        problems=[p for key in sorted(problems) for p in problems[key]] + orphans,
        refused=set(problems),
    )


# ---------------------------------------------------------------------------------------------
# Pass 2: one image (runs in the workers)


def _number(v) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and math.isfinite(v))


def rle_string_counts(counts: str) -> list[int]:
    """The run lengths of a compressed RLE string (pycocotools' ``rleFrString``), for checking before decoding."""
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(counts):
                raise ValueError("the string ends inside a number")
            c = ord(counts[pos]) - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def segmentation_problem(segm, height: int, width: int, clip_outside: bool = False) -> str | None:
    """Why pycocotools cannot render ``segm`` as a mask of this image (or would clip it silently), else None.

    Polygons: a non-empty list of polygons, each an even number (>= 6) of finite coordinates, every point in
    [0, width] x [0, height] (unless ``clip_outside``: pycocotools clips them). RLE: ``size`` the image's
    [height, width] and run lengths (a list, or pycocotools' string) that cover it exactly.
    """
    if isinstance(segm, list):
        if not segm:
            return "empty segmentation (no polygon)"
        for k, poly in enumerate(segm):
            if not isinstance(poly, list) or not all(_number(v) for v in poly):
                return f"polygon {k} is not a list of numbers"
            if len(poly) % 2 or len(poly) < 6:
                return f"polygon {k} has {len(poly)} coordinates; a polygon needs an even number, at least 6 (3 points)"
            if not clip_outside:
                xs, ys = np.asarray(poly[0::2], dtype=np.float64), np.asarray(poly[1::2], dtype=np.float64)
                outside = (xs < 0) | (xs > width) | (ys < 0) | (ys > height)
                if outside.any():
                    j = int(np.argmax(outside))
                    return (
                        f"polygon {k} has the point ({poly[2 * j]}, {poly[2 * j + 1]}) outside the image "
                        f"[0, {width}] x [0, {height}] (--clip-outside renders it clipped, as pycocotools does)"
                    )
        return None
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        size, counts = segm["size"], segm["counts"]
        if size != [height, width] or not all(_is_int(v) for v in size):
            return f"RLE size {size!r} is not the image's [height, width] = [{height}, {width}]"
        if isinstance(counts, list):
            if not all(_is_int(v) and v >= 0 for v in counts):
                return "RLE counts are not non-negative integers"
        elif isinstance(counts, str):
            if not _RLE_CHARS.fullmatch(counts):
                return "compressed RLE counts hold characters outside '0'..'o'"
            try:
                counts = rle_string_counts(counts)
            except ValueError as e:
                return f"compressed RLE counts are malformed: {e}"
            if any(v < 0 for v in counts):
                return "compressed RLE counts decode to negative run lengths"
        else:
            return f"RLE counts are a {type(counts).__name__}, not a list or a string"
        if sum(counts) != height * width:
            return f"RLE runs cover {sum(counts)} pixels, not the image's {height} x {width} = {height * width}"
        return None
    return "segmentation is neither a list of polygons nor an RLE {counts, size}"


def render_mask(height: int, width: int, annotations: list[CocoAnnotation]) -> np.ndarray:
    """The (H, W) uint8 mask: each annotation painted with its label + 1 in order as pycocotools renders it
    (``COCO.annToRLE``), then every crowd region 255."""
    from pycocotools import mask as mask_utils

    out = np.zeros((height, width), dtype=np.uint8)
    crowd = np.zeros((height, width), dtype=bool)
    for ann in annotations:
        segm = ann.segmentation
        if isinstance(segm, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
        elif isinstance(segm["counts"], list):
            rle = mask_utils.frPyObjects(segm, height, width)
        else:
            rle = segm
        pixels = mask_utils.decode(rle).astype(bool)
        out[pixels] = ann.label + 1
        if ann.iscrowd:
            crowd |= pixels
    out[crowd] = IGNORE_INDEX
    return out


def convert_image(image: CocoImage, clip_outside: bool = False) -> tuple[dict[str, bytes], dict] | list[Problem]:
    """Pass 2 for one image: (members, meta) for the shard, or its problems (each naming the image)."""
    try:
        jpg = image.path.read_bytes()
        with open_image(jpg) as img:
            if img.format != "JPEG":
                raise ValueError(f"not a JPEG file ({img.format})")
            img.load()  # a full decode catches truncated files
            width, height = img.size
    except ImageTooLarge as e:
        return [Problem(image.key, image.path, str(e))]
    except Exception as e:
        return [Problem(image.key, image.path, f"unreadable: {type(e).__name__}: {e}")]
    if (width, height) != (image.width, image.height):
        return [
            Problem(
                image.key,
                image.path,
                f"the JPEG is {width}x{height} but the annotations say {image.width}x{image.height} (width x height)",
            )
        ]
    problems = []
    for ann in image.annotations:
        what = segmentation_problem(ann.segmentation, image.height, image.width, clip_outside)
        if what is not None:
            problems.append(Problem(image.key, None, f"annotation {ann.ann_id}: {what}"))
    if problems:
        return problems
    try:
        mask = render_mask(height, width, image.annotations)
    except Exception as e:  # pycocotools refused a segmentation the checks let through
        return [Problem(image.key, None, f"pycocotools cannot render its annotations: {type(e).__name__}: {e}")]
    labels = sorted({ann.label for ann in image.annotations})
    meta = {"dataset": "coco", "id": image.key, "labels": labels, "height": height, "width": width}
    members = {
        "jpg": jpg,
        "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
        "seg.png": encode_label_png(mask),
    }
    return members, meta


# ---------------------------------------------------------------------------------------------
# The command


def split_name(annotations: str, split: str | None) -> str:
    """``--split`` or, without it, the annotation file's stem without ``instances_`` (instances_train2014.json
    -> train2014); a :class:`UsageError` unless it is letters, digits and '_'."""
    if split is None:
        stem = Path(annotations).stem
        split = stem.removeprefix("instances_")
    if not _SPLIT_NAME.fullmatch(split):
        raise UsageError(
            f"split name {split!r} may hold only letters, digits and '_' (it names the shards); pass --split NAME"
        )
    return split


def shard_coco(
    images,
    annotations,
    *,
    out,
    split: str | None = None,
    shard_size: int = 1000,
    overwrite: bool = False,
    on_error: str = "fail",
    workers: int = 1,
    clip_outside: bool = False,
) -> CocoShardResult:
    """Write the shards of one COCO split and its manifest rows into ``out``; returns what was written.

    ``annotations`` may hold ``{split}`` (``instances_{split}.json``). Bad flags, input or refused output raise
    :class:`~puzzlecam.errors.UsageError` (a :class:`~puzzlecam.errors.DataError` for input files) before
    anything final is written.
    """
    check_shard_flags(shard_size, on_error, workers)
    annotations = str(annotations)
    if "{split}" in annotations:
        if split is None:
            raise UsageError(f"--coco-annotations {annotations} holds {{split}}: pass --split NAME")
        annotations = annotations.replace("{split}", split)
    split = split_name(annotations, split)
    images_dir, ann_path, out = Path(images), Path(annotations), Path(out)
    if not images_dir.is_dir():
        raise DataError(f"--coco-images {images_dir}: not a folder")
    data = read_annotation_file(ann_path)
    plan = plan_images(data, images_dir, ann_path)
    del data
    plans, without, problems, skipped_keys = plan.images, plan.without_annotations, plan.problems, plan.refused
    output = SplitOutput(out, split, shard_size, overwrite)
    if problems and on_error == "fail":
        raise DataError(
            f"{len(problems)} bad annotation(s) or missing image file(s) in {ann_path}; nothing was written "
            "(--on-error skip leaves these images out):\n" + problem_listing(problems)
        )
    for problem in problems:
        log.warning("skipping %s", problem)

    with output:
        with (
            OrderedPool(workers, functools.partial(convert_image, clip_outside=clip_outside)) as pool,
            ProgressBar(f"sharding {split}", total=len(plans), transient=True) as bar,
        ):
            for image, result in zip(plans, pool.results(plans), strict=True):
                if isinstance(result, list):
                    problems += result
                    skipped_keys.add(image.key)
                    if on_error == "skip":
                        for problem in result:
                            log.warning("skipping %s", problem)
                else:
                    members, meta = result
                    output.add(image.key, members, meta)
                bar.advance()
        if problems and on_error == "fail":
            raise DataError(
                f"{len(problems)} bad input(s); nothing was written (--on-error skip leaves these images out):\n"
                + problem_listing(problems)
            )
        if not output.rows:
            reason = f"{len(without)} image(s) without annotations, {len(skipped_keys)} with bad input"
            raise DataError(
                f"no image of split {split!r} could be converted ({reason})"
                + (":\n" + problem_listing(problems) if problems else "")
            )
        shards = output.commit()
    if problems:
        log.warning("skipped %d image(s) with bad input (listed above)", len(skipped_keys))
    return CocoShardResult(
        out=out,
        split=split,
        shards=shards,
        rows=output.rows,
        skipped=problems,
        without_annotations=without,
        skipped_images=len(skipped_keys),
    )
