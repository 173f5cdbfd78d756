"""Overlays: ``python -m puzzlecam.viz --cams DIR --shards PATTERN --out DIR [--n 16] [--rw DIR]
[--segmentation DIR]``.

For each of the first ``n`` images of the shards that have a CAM, one row of panels:
image | one heat map per labelled class (jet colours blended over the image) | the CAMs' labels at
``--threshold`` (the stage-1 pseudo-label) | with ``--rw``, the random walk's labels at ``--rw-threshold``
(what stage 3 trains on) | with ``--segmentation``, DeepLabv3+'s prediction | ground truth (VOC palette; grey
when the sample has no mask). Written as ``{id}.png`` per image plus ``grid.png`` (all rows stacked). No
matplotlib: the colour map is a small numpy jet; Pillow draws the captions.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from puzzlecam.camstore import CamStoreError, cam_path, file_name, read_cam, shown_id, store_num_classes
from puzzlecam.datasets import VOC, with_classes
from puzzlecam.errors import UsageError
from puzzlecam.labels import predict_labels
from puzzlecam.utils.cli import run_command
from puzzlecam.utils.files import atomic_write, output_directory
from puzzlecam.utils.labelmap import decode_label_png, voc_colormap

log = logging.getLogger("puzzlecam.viz")  # not __name__: that is "__main__" under python -m

CAPTION_H = 14
GAP = 2


def jet(x: np.ndarray) -> np.ndarray:
    """Jet-like colour map: values in [0, 1] (clipped) -> uint8 RGB (..., 3); blue low, red high."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)[..., None]
    centers = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # where R, G, B peak
    rgb = np.clip(1.5 - np.abs(4.0 * (x - centers)), 0.0, 1.0)
    return (rgb * 255 + 0.5).astype(np.uint8)


def heat_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the jet colours of ``cam`` (H, W) in [0, 1] over the RGB ``image`` (H, W, 3)."""
    blended = (1 - alpha) * image.astype(np.float32) + alpha * jet(cam).astype(np.float32)
    return blended.round().astype(np.uint8)


def colorize(labels: np.ndarray) -> np.ndarray:
    """VOC palette colours of a label map (H, W) -> (H, W, 3) uint8."""
    return voc_colormap()[labels]


def _panel(rgb: np.ndarray, caption: str, height: int, nearest: bool = False) -> Image.Image:
    im = Image.fromarray(rgb)
    width = max(1, round(im.width * height / im.height))
    # Label maps are resized by nearest neighbour so that they keep their exact palette colours.
    im = im.resize((width, height), Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR)
    panel = Image.new("RGB", (width, height + CAPTION_H), (255, 255, 255))
    panel.paste(im, (0, CAPTION_H))
    ImageDraw.Draw(panel).text((2, 1), caption, fill=(0, 0, 0), font=ImageFont.load_default())
    return panel


def _hstack(panels: list[Image.Image]) -> Image.Image:
    width = sum(p.width for p in panels) + GAP * (len(panels) - 1)
    row = Image.new("RGB", (width, max(p.height for p in panels)), (255, 255, 255))
    x = 0
    for p in panels:
        row.paste(p, (x, 0))
        x += p.width + GAP
    return row


def _vstack(rows: list[Image.Image]) -> Image.Image:
    grid = Image.new(
        "RGB", (max(r.width for r in rows), sum(r.height for r in rows) + GAP * (len(rows) - 1)), (255, 255, 255)
    )
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height + GAP
    return grid


def _class_name(key: int, classes: tuple[str, ...]) -> str:
    return classes[key] if 0 <= key < len(classes) else f"class {key}"


def overlay_row(
    image_id: str,
    image: np.ndarray,
    record,
    mask: np.ndarray | None,
    threshold: float,
    height: int = 160,
    later: list[tuple[str, np.ndarray]] = (),
    classes: tuple[str, ...] = VOC.classes,
) -> Image.Image:
    """One image's panels side by side (see the module docstring); ``later`` adds (caption, label map) panels
    before the ground truth (the random walk's labels, a segmentation); ``classes`` names the CAMs' keys."""
    if tuple(image.shape[:2]) != record.size:
        raise CamStoreError(
            f"{shown_id(image_id)}: image is {image.shape[0]}x{image.shape[1]} "
            f"but its CAM is {record.size[0]}x{record.size[1]}"
        )
    panels = [_panel(image, shown_id(image_id), height)]
    for k, cam in zip(record.keys, record.hr_cam, strict=True):
        panels.append(_panel(heat_overlay(image, cam.astype(np.float32)), _class_name(int(k), classes), height))
    pred = predict_labels(record.hr_cam, record.keys, threshold)
    caption = f"CAM t={threshold:.2f}" if later else f"pseudo-label t={threshold:.2f}"
    panels.append(_panel(colorize(pred), caption, height, nearest=True))
    for caption, labels in later:
        panels.append(_panel(colorize(labels), caption, height, nearest=True))
    if mask is None:
        panels.append(_panel(np.full_like(image, 128), "no mask", height))
    else:
        panels.append(_panel(colorize(mask), "ground truth", height, nearest=True))
    return _hstack(panels)


def segmentation_row(
    image_id: str, image: np.ndarray, prediction: np.ndarray, mask: np.ndarray, height: int = 160
) -> Image.Image:
    """image | predicted label map | ground truth (VOC palette), side by side: a segmentation network's view of
    one image."""
    return _hstack(
        [
            _panel(image, shown_id(image_id), height),
            _panel(colorize(prediction), "prediction", height, nearest=True),
            _panel(colorize(mask), "ground truth", height, nearest=True),
        ]
    )


def write_png(path: Path, im: Image.Image) -> None:
    atomic_write(path, lambda f: im.save(f, format="PNG"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m puzzlecam.viz",
        description="PNG overlays of CAMs: image | heat map per labelled class | pseudo-label | [random-walk "
        "labels (--rw) | DeepLabv3+ (--segmentation) |] ground truth, one {id}.png per image and grid.png.",
    )
    p.add_argument("--cams", type=Path, required=True, help="CAM store directory ({id}.npz) written by puzzlecam.infer")
    p.add_argument("--shards", required=True, help="shard pattern holding the images (and masks)")
    p.add_argument("--out", type=Path, required=True, help="output directory for {id}.png and grid.png")
    p.add_argument(
        "--n", type=int, default=16, help="number of images: the first N of the shards that have a CAM (default 16)"
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="background threshold of the pseudo-label panel (default: best_threshold of --summary, else 0.20)",
    )
    p.add_argument(
        "--summary", type=Path, default=None, help="summary.json of puzzlecam.evaluate: take its best threshold"
    )
    p.add_argument(
        "--rw", type=Path, default=None, help="a random-walk store of puzzlecam.rw: adds its label map (a panel)"
    )
    p.add_argument(
        "--rw-threshold",
        type=float,
        default=None,
        help="background threshold of the random-walk panel (default: best_threshold of --rw-summary, else 0.35)",
    )
    p.add_argument("--rw-summary", type=Path, default=None, help="summary.json of the random walk's evaluation")
    p.add_argument(
        "--segmentation",
        type=Path,
        default=None,
        help="a directory of {id}.png label maps of puzzlecam.segment: adds the segmentation (a panel)",
    )
    p.add_argument("--height", type=int, default=160, help="panel height in pixels (default 160)")
    return p


def _threshold(args, flag: str = "--threshold", summary_flag: str = "--summary", default: float = 0.20) -> float:
    """``flag``'s value, else the best threshold of ``summary_flag``'s summary.json, else ``default``."""
    value, summary = (getattr(args, f.lstrip("-").replace("-", "_")) for f in (flag, summary_flag))
    if value is not None:
        if not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}")
        return value
    if summary is None:
        return default
    try:
        return float(json.loads(summary.read_text())["best_threshold"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{summary_flag} {summary}: cannot read best_threshold ({e})") from None


def run(args) -> None:
    if args.n < 1:
        raise UsageError(f"--n must be at least 1, got {args.n}")
    if args.height < 1:
        raise UsageError(f"--height must be at least 1 pixel, got {args.height}")
    threshold = _threshold(args)
    rw_threshold = _threshold(args, "--rw-threshold", "--rw-summary", 0.35)
    for flag, path in (("--cams", args.cams), ("--rw", args.rw), ("--segmentation", args.segmentation)):
        if path is not None and not path.is_dir():
            raise UsageError(f"{flag} {path}: no such directory")
    with output_directory(args.out):
        _write_overlays(args, threshold, rw_threshold)


def _later_panels(args, image_id: str, size: tuple[int, int], rw_threshold: float) -> list[tuple[str, np.ndarray]]:
    """The random walk's label map and the segmentation of one image, where asked for."""
    panels = []
    if args.rw is not None:
        rw = read_cam(args.rw, image_id, size=size)
        panels.append((f"random walk t={rw_threshold:.2f}", predict_labels(rw.hr_cam, rw.keys, rw_threshold)))
    if args.segmentation is not None:
        path = args.segmentation / file_name(image_id, ".png")
        try:
            labels = decode_label_png(path.read_bytes())
        except (OSError, ValueError) as e:
            raise UsageError(
                f"--segmentation: no readable label map for {shown_id(image_id)} at {path} ({e})"
            ) from None
        if labels.shape != size:
            raise UsageError(
                f"--segmentation {path}: {labels.shape[0]}x{labels.shape[1]}, the image is {size[0]}x{size[1]}"
            )
        panels.append(("DeepLabv3+", labels))
    return panels


def _write_overlays(args, threshold: float, rw_threshold: float) -> None:
    from puzzlecam.data import eval_loader

    rows = []
    num_classes = store_num_classes(args.cams)  # read once, not per image
    dataset = with_classes(num_classes)
    classes = dataset.classes if dataset is not None else ()  # unknown: "class k" captions
    for batch in eval_loader(args.shards, num_workers=0, rank=0, world_size=1):
        image_id = batch["id"][0]
        if not cam_path(args.cams, image_id).is_file():
            continue
        image = np.asarray(batch["image"][0])
        record = read_cam(args.cams, image_id, size=image.shape[:2], num_classes=num_classes)
        mask = np.asarray(batch["mask"][0]) if bool(batch["has_mask"][0]) else None
        later = _later_panels(args, image_id, tuple(image.shape[:2]), rw_threshold)
        row = overlay_row(image_id, image, record, mask, threshold, args.height, later, classes)
        write_png(args.out / file_name(image_id, ".png"), row)
        rows.append(row)
        if len(rows) == args.n:
            break
    if not rows:
        raise UsageError(f"no image of --shards {args.shards} has a CAM in --cams {args.cams}")
    write_png(args.out / "grid.png", _vstack(rows))
    log.info("wrote %d overlays and %s", len(rows), args.out / "grid.png")


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
