"""Pseudo-labels from CAMs: ``python -m puzzlecam.labels --cams DIR --threshold T --out DIR`` (docs/data.md).

Each image's label map is the argmax over ``[T, hr_cam_1, ..., hr_cam_K]`` (ties go to background,
ties between classes to the first key; the evaluation's rule, see puzzlecam.evaluate), written as a
palette PNG ``{id}.png`` with the VOC palette: 0 background, 1..C classes (channel index + 1; C = 20 for VOC,
80 for COCO).

``--bg-threshold B`` (B < T) marks uncertain pixels: with fg the map at T and bg the map at B,
``label = fg; label[fg == 0] = 255; label[fg + bg == 0] = 0`` (confident foreground, confident
background, an ignored band between), the affinity labels of AffinityNet's training.

``--crf`` refines each map with a dense CRF (pydensecrf2, ``pip install .[crf]``) on the RGB image
from ``--shards``: label-based unaries (the argmax label gets probability ``--crf-gt-prob``),
a Gaussian smoothness kernel (sxy 3, compat 3) and a bilateral appearance kernel (sxy 50, srgb 5,
compat 10), ``--crf-iters`` mean-field steps; with ``--bg-threshold`` both maps are refined before
they are combined.

``--affinity`` is the original README's affinity labels in one flag: ``--threshold 0.40
--bg-threshold 0.10 --crf`` (10 iterations), each overridable. A random-walk store of puzzlecam.rw
(``rw.json`` beside its files) has the CAM store's layout, so the same command makes the final
pseudo-labels from it (the README: ``--threshold 0.35 --crf --crf-iters 1``).
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from puzzlecam.camstore import (
    INDEX_NAME,
    RW_META_NAME,
    CamRecord,
    cam_path,
    file_name,
    is_rw_store,
    list_ids,
    read_cam,
    recorded_sizes,
    shown_id,
    store_num_classes,
)
from puzzlecam.errors import LabelsError
from puzzlecam.utils.cli import run_command
from puzzlecam.utils.files import atomic_write_bytes, output_directory
from puzzlecam.utils.labelmap import IGNORE_INDEX, encode_label_png
from puzzlecam.utils.progress import ProgressBar

log = logging.getLogger("puzzlecam.labels")  # not __name__: that is "__main__" under python -m

CRF_GAUSSIAN = dict(sxy=3, compat=3)
CRF_BILATERAL = dict(sxy=50, srgb=5, compat=10)
# The segmentation CRF of puzzlecam.segment (design.md §9): a wider, softer appearance kernel than the labels'.
SEGMENTATION_CRF_BILATERAL = dict(sxy=80, srgb=13, compat=10)
# --affinity: the original README's make_affinity_labels.py values (fg 0.40, bg 0.10, CRF on both maps).
AFFINITY_PRESET = dict(threshold=0.40, bg_threshold=0.10, crf=True)


def predict_labels(hr_cam: np.ndarray, keys: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 (H, W) label map: class index (channel + 1) of the best key where its score > threshold, else 0.

    ``hr_cam`` (K, H, W); ``keys`` (K,) channel indices 0..19. K = 0 gives all background.
    """
    local = local_labels(hr_cam, threshold)
    return to_class_indices(local, keys)


def local_labels(hr_cam: np.ndarray, threshold: float) -> np.ndarray:
    """Indices into [background, key_1, ..., key_K]: argmax over [threshold, cams] (first max wins)."""
    if hr_cam.shape[0] == 0:
        return np.zeros(hr_cam.shape[1:], dtype=np.uint8)
    cams = hr_cam.astype(np.float32)  # float16 -> float32 is exact: ties are preserved
    best = cams.argmax(0)
    score = np.take_along_axis(cams, best[None], 0)[0].astype(np.float64)
    return np.where(score > threshold, best + 1, 0).astype(np.uint8)


def to_class_indices(local: np.ndarray, keys: np.ndarray) -> np.ndarray:
    lut = np.concatenate([[0], np.asarray(keys, dtype=np.int64) + 1]).astype(np.uint8)
    return lut[local]


def _crf_module(flag: str = "--crf"):
    try:
        import pydensecrf.densecrf as dcrf
        import pydensecrf.utils as crf_utils
    except ImportError:
        raise LabelsError(
            f"{flag} needs the optional dense CRF package: pip install .[crf]  (installs pydensecrf2)"
        ) from None
    return dcrf, crf_utils


def require_crf(flag: str = "--crf") -> None:
    """Refuse ``flag`` (naming it and the fix) when the optional dense CRF package is not installed."""
    _crf_module(flag)


def dense_crf(image: np.ndarray, unary: np.ndarray, iters: int, bilateral: dict = CRF_BILATERAL) -> np.ndarray:
    """Mean-field marginals (L, H, W) of a dense CRF on the RGB ``image`` (H, W, 3): ``unary`` (L, H*W) float32
    energies, the Gaussian kernel :data:`CRF_GAUSSIAN`, the bilateral kernel ``bilateral``, ``iters`` steps."""
    dcrf, _ = _crf_module()
    h, w = image.shape[:2]
    crf = dcrf.DenseCRF2D(w, h, unary.shape[0])
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(**CRF_GAUSSIAN)
    crf.addPairwiseBilateral(rgbim=np.ascontiguousarray(image, dtype=np.uint8), **bilateral)
    return np.asarray(crf.inference(iters), dtype=np.float32).reshape(unary.shape[0], h, w)


def crf_refine(
    image: np.ndarray, local: np.ndarray, num_labels: int, iters: int = 10, gt_prob: float = 0.7
) -> np.ndarray:
    """Dense-CRF refinement of a local label map (indices 0..num_labels-1) on the RGB ``image`` (H, W, 3)."""
    _, crf_utils = _crf_module()
    if num_labels < 2:
        return local
    unary = crf_utils.unary_from_labels(local, num_labels, gt_prob=gt_prob, zero_unsure=False)
    return dense_crf(image, unary, iters).argmax(0).astype(np.uint8)


def crf_probabilities(image: np.ndarray, probs: np.ndarray, iters: int = 10) -> np.ndarray:
    """The segmentation CRF: marginals (C, H, W) after ``iters`` mean-field steps from the softmax ``probs``
    (C, H, W) as unaries (-log p), with :data:`SEGMENTATION_CRF_BILATERAL`."""
    _, crf_utils = _crf_module()
    unary = crf_utils.unary_from_softmax(np.ascontiguousarray(probs, dtype=np.float32))
    return dense_crf(image, unary, iters, SEGMENTATION_CRF_BILATERAL)


def make_label_map(
    record: CamRecord,
    threshold: float,
    bg_threshold: float | None = None,
    image: np.ndarray | None = None,
    crf_iters: int = 10,
    crf_gt_prob: float = 0.7,
) -> np.ndarray:
    """The pseudo-label (H, W) uint8 of one image (0, 1..C, and 255 where uncertain)."""
    num_labels = len(record.keys) + 1

    def at(t: float) -> np.ndarray:
        local = local_labels(record.hr_cam, t)
        if image is not None:
            if tuple(image.shape[:2]) != record.size:
                raise LabelsError(
                    f"{record.id}: image is {image.shape[0]}x{image.shape[1]} "
                    f"but its CAM is {record.size[0]}x{record.size[1]}"
                )
            local = crf_refine(image, local, num_labels, crf_iters, crf_gt_prob)
        return local

    fg = at(threshold)
    labels = to_class_indices(fg, record.keys)
    if bg_threshold is not None:
        # label[fg == 0] = 255, then label[fg + bg == 0] = 0: background at T is kept only where B agrees.
        bg = at(bg_threshold)
        labels[(fg == 0) & (bg != 0)] = IGNORE_INDEX
    return labels


def _job(args) -> str:
    cam_dir, num_classes, out_dir, image_id, image, size, size_of, options = args
    record = read_cam(cam_dir, image_id, size=size, size_of=size_of, num_classes=num_classes)
    atomic_write_bytes(
        Path(out_dir, file_name(image_id, ".png")), encode_label_png(make_label_map(record, image=image, **options))
    )
    return image_id


# An image's (id, RGB image or None, its size if known, where that size comes from).
Item = tuple[str, np.ndarray | None, tuple[int, int] | None, str]


def _jobs(args, items: Iterator[Item], options: dict):
    num_classes = store_num_classes(args.cams)  # read once, not per image
    for image_id, image, size, size_of in items:
        yield args.cams, num_classes, args.out, image_id, image, size, size_of, options


def _shard_images(shards: str, num_workers: int, cam_dir: Path, missing: list[str], keep_images: bool):
    from puzzlecam.data import eval_loader

    for batch in eval_loader(shards, num_workers=num_workers, rank=0, world_size=1):
        image_id = batch["id"][0]
        if not cam_path(cam_dir, image_id).is_file():
            missing.append(image_id)
            continue
        image = np.asarray(batch["image"][0])
        yield image_id, image if keep_images else None, image.shape[:2], "the image"


def _store_images(cam_dir: Path) -> tuple[list[Item], int]:
    """Every id of the store, with the size index.parquet records for it (where there is one)."""
    sizes = recorded_sizes(cam_dir)
    recorded = f"the size recorded in {cam_dir / INDEX_NAME}"
    ids = list_ids(cam_dir)
    return [(image_id, None, sizes.get(image_id), recorded) for image_id in ids], len(ids)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m puzzlecam.labels",
        description="Write palette-PNG pseudo-labels {id}.png (0 background, 1..C classes: VOC 20, COCO 80; 255 "
        "uncertain) from a CAM store of puzzlecam.infer or a random-walk store of puzzlecam.rw. Affinity labels for "
        "AffinityNet (the README's): --affinity --shards PATTERN. Pseudo-labels from random-walk maps (the "
        "README's): --cams RW_STORE --threshold 0.35 --crf --crf-iters 1 --shards PATTERN. See docs/data.md.",
    )
    p.add_argument(
        "--cams",
        type=Path,
        required=True,
        help="CAM store directory ({id}.npz) written by puzzlecam.infer, or a random-walk store of puzzlecam.rw "
        "(same layout, its maps in hr_cam; the README's pseudo-labels: --threshold 0.35 --crf --crf-iters 1)",
    )
    p.add_argument(
        "--affinity",
        action="store_true",
        help="the original README's affinity labels for AffinityNet: --threshold 0.40 --bg-threshold 0.10 --crf "
        "(needs --shards); any of the three given explicitly wins (--no-crf turns the CRF off)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="background score: a pixel gets its best class only if that class's CAM > T "
        "(required unless --affinity, which gives 0.40)",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory for {id}.png")
    p.add_argument(
        "--bg-threshold",
        type=float,
        default=None,
        help="optional lower threshold B < T: pixels background at T but a class at B become 255 (uncertain); "
        "--affinity gives 0.10",
    )
    p.add_argument(
        "--crf",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="refine each map with a dense CRF before combining (needs pip install .[crf] and --shards for the "
        "images); on with --affinity, --no-crf turns it off",
    )
    p.add_argument(
        "--shards",
        default=None,
        help="shard pattern; required with --crf (the images); without --crf it restricts the output to these images",
    )
    p.add_argument("--crf-iters", type=int, default=10, help="mean-field iterations of the CRF (default 10)")
    p.add_argument(
        "--crf-gt-prob", type=float, default=0.7, help="CRF unary: probability given to the argmax label (default 0.7)"
    )
    p.add_argument("--jobs", type=int, default=1, help="worker processes (the CRF is the slow part; default 1)")
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers decoding the shards (default 0)")
    return p


def apply_presets(args) -> None:
    """Fill the flags ``--affinity`` sets where they were not given; without it ``--threshold`` is required."""
    preset = AFFINITY_PRESET if args.affinity else dict(crf=False)
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.threshold is None:
        raise LabelsError("--threshold T is required (or --affinity for the README's affinity labels)")


def check_flags(args) -> None:
    """Refuse bad flag values before any work, naming the flag."""
    apply_presets(args)
    if not math.isfinite(args.threshold):
        raise LabelsError(f"--threshold must be a finite number, got {args.threshold}")
    if args.bg_threshold is not None and not args.bg_threshold < args.threshold:
        raise LabelsError(f"--bg-threshold {args.bg_threshold} must be below --threshold {args.threshold}")
    if args.jobs < 1:
        raise LabelsError(f"--jobs must be at least 1, got {args.jobs}")
    if args.num_workers < 0:
        raise LabelsError(f"--num-workers must be 0 or more, got {args.num_workers}")
    if args.crf_iters < 0:
        raise LabelsError(f"--crf-iters must be 0 or more, got {args.crf_iters}")
    if not 0 < args.crf_gt_prob < 1:
        raise LabelsError(f"--crf-gt-prob must be between 0 and 1 (exclusive), got {args.crf_gt_prob}")


def run(args) -> None:
    check_flags(args)
    if args.crf:
        given = "--affinity (which turns --crf on; --no-crf turns it off)" if args.affinity else "--crf"
        require_crf(given)
        if args.shards is None:
            raise LabelsError(f"{given} needs --shards PATTERN: the CRF works on the RGB images")
    if not args.cams.is_dir():
        raise LabelsError(f"--cams {args.cams}: no such directory")
    if is_rw_store(args.cams):
        log.info("%s holds random-walk maps (%s): labelling those", args.cams, RW_META_NAME)
    with output_directory(args.out):
        _write_labels(args)


def _write_labels(args) -> None:
    options = dict(
        threshold=args.threshold,
        bg_threshold=args.bg_threshold,
        crf_iters=args.crf_iters,
        crf_gt_prob=args.crf_gt_prob,
    )
    missing: list[str] = []
    if args.shards is not None:
        items, total = _shard_images(args.shards, args.num_workers, args.cams, missing, keep_images=args.crf), None
    else:
        items, total = _store_images(args.cams)
    jobs = _jobs(args, items, options)
    written = 0
    with ProgressBar("pseudo-labels", total) as progress:
        if args.jobs > 1:
            # spawn: forking a process that holds torch / OpenMP threads can hang the children.
            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                for _ in pool.map(_job, jobs, chunksize=4):
                    written += 1
                    progress.advance()
        else:
            for job in jobs:
                _job(job)
                written += 1
                progress.advance()
    if missing:
        shown = ", ".join(map(shown_id, missing[:20])) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise LabelsError(f"{len(missing)} images in --shards have no CAM in {args.cams}: {shown}")
    log.info("wrote %d label maps to %s", written, args.out)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
