"""``python -m puzzlecam.bench eval``: the one-pass threshold sweep against a per-threshold loop.

Both sides score the same in-memory random CAMs and masks (VOC-sized by default; ``--dataset coco``: 81 labels,
COCO-sized 480 x 640 images with 1-5 classes each, 1,000 of them, the loop on the first ``--loop-images``) at every
threshold; file reading and decoding are left out of both. The loop is how the reference code
evaluates: for each threshold, for each image, argmax over [t, cams] and accumulate a confusion
matrix. The sweep is :func:`puzzlecam.evaluate.confusion_sweep` (one pass per image). Both results
are checked to be identical before any timing is reported. Both sides run on one thread by
default (like for like; on a busy machine torch's thread pool also measures the neighbours).
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from puzzlecam.datasets import DATASETS
from puzzlecam.errors import RunError, UsageError
from puzzlecam.evaluate import DEFAULT_THRESHOLDS, confusion_sweep, miou, parse_thresholds
from puzzlecam.utils.cli import run_command
from puzzlecam.utils.files import atomic_write_json
from puzzlecam.utils.labelmap import IGNORE_INDEX

log = logging.getLogger(__name__)


def make_images(
    count: int, height: int, width: int, seed: int, num_labels: int = 21, most_classes: int = 3
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(cams float16 (K, H, W), keys 1..num_labels-1 (K,), mask uint8 (H, W)) with 1..most_classes classes and
    some 255 pixels."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        k = int(rng.integers(1, most_classes + 1))
        keys = rng.choice(np.arange(1, num_labels), k, replace=False)
        cams = rng.random((k, height, width), dtype=np.float32).astype(np.float16)
        mask = rng.choice(np.concatenate([[0], keys]), (height, width)).astype(np.uint8)
        mask[rng.random((height, width)) < 0.05] = IGNORE_INDEX
        images.append((cams, keys, mask))
    return images


def loop_confusions(images, thresholds: list[float], num_labels: int) -> np.ndarray:
    """Per threshold, per image: argmax over [t, cams] (ties to background) and a bincount confusion."""
    out = np.zeros((len(thresholds), num_labels, num_labels), dtype=np.int64)
    for i, t in enumerate(thresholds):
        for cams, keys, mask in images:
            stacked = np.concatenate([np.full((1,) + cams.shape[1:], t, dtype=np.float64), cams.astype(np.float64)])
            pred = np.concatenate([[0], keys])[stacked.argmax(0)]
            valid = mask != IGNORE_INDEX
            out[i] += np.bincount(
                mask[valid].astype(np.int64) * num_labels + pred[valid], minlength=num_labels * num_labels
            ).reshape(num_labels, num_labels)
    return out


def sweep_confusions(images, thresholds: list[float], num_labels: int) -> np.ndarray:
    out = torch.zeros(len(thresholds), num_labels, num_labels, dtype=torch.long)
    for cams, keys, mask in images:
        out += confusion_sweep(
            torch.from_numpy(cams), torch.from_numpy(keys), torch.from_numpy(mask), thresholds, num_labels
        )
    return out.numpy()


def _time(fn, repeats: int) -> tuple[float, np.ndarray]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m puzzlecam.bench eval", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dataset",
        choices=sorted(DATASETS),
        default="voc",
        help="the labels scored: voc (21, the default) or coco (81; COCO-sized defaults below)",
    )
    p.add_argument("--images", type=int, default=None, help="number of random images (default 32; coco: 1000)")
    p.add_argument(
        "--loop-images",
        type=int,
        default=None,
        help="images the per-threshold loop scores, the first of --images (default all; coco: 32); its images/s is "
        "compared, and its confusions must equal the sweep's on those images",
    )
    p.add_argument("--height", type=int, default=None, help="image height (default 375, a VOC image; coco: 480)")
    p.add_argument("--width", type=int, default=None, help="image width (default 500; coco: 640)")
    p.add_argument(
        "--thresholds",
        default=DEFAULT_THRESHOLDS,
        help=f"threshold sweep (default {DEFAULT_THRESHOLDS}: 16 thresholds)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per side; the best is reported (default 3)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads of the sweep (default 1: the numpy loop is single-threaded too; "
        "0 = torch's choice)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    return p


def run(args) -> None:
    coco = args.dataset == "coco"
    args.images = args.images if args.images is not None else (1000 if coco else 32)
    args.height = args.height if args.height is not None else (480 if coco else 375)
    args.width = args.width if args.width is not None else (640 if coco else 500)
    args.loop_images = (
        args.loop_images if args.loop_images is not None else (min(32, args.images) if coco else args.images)
    )
    num_labels = DATASETS[args.dataset].num_labels
    for flag, value in (
        ("--images", args.images),
        ("--height", args.height),
        ("--width", args.width),
        ("--loop-images", args.loop_images),
    ):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads < 0:
        raise UsageError(f"--threads must be 0 (torch's choice) or more, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.loop_images > args.images:
        raise UsageError(f"--loop-images {args.loop_images} is more than --images {args.images}")
    thresholds = parse_thresholds(args.thresholds)
    images = make_images(args.images, args.height, args.width, args.seed, num_labels, 5 if coco else 3)
    looped = images[: args.loop_images]

    loop_s, loop_conf = _time(lambda: loop_confusions(looped, thresholds, num_labels), args.repeats)
    if not np.array_equal(loop_conf, sweep_confusions(looped, thresholds, num_labels)):
        raise RunError("the sweep's confusion matrices differ from the per-threshold loop's")
    sweep_s, sweep_conf = _time(lambda: sweep_confusions(images, thresholds, num_labels), args.repeats)
    best_miou = float(torch.nan_to_num(miou(torch.from_numpy(sweep_conf))[0], nan=-1).max())
    loop_rate, sweep_rate = args.loop_images / loop_s, args.images / sweep_s

    figures = {
        "dataset": args.dataset,
        "num_labels": num_labels,
        "images": args.images,
        "loop_images": args.loop_images,
        "image_size": [args.height, args.width],
        "thresholds": len(thresholds),
        "loop_images_per_s": loop_rate,
        "sweep_images_per_s": sweep_rate,
        "sweep_seconds": sweep_s,
        "speedup": sweep_rate / loop_rate,
        "identical_confusions": True,
        "best_miou_check": best_miou,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"eval ({args.dataset}, {num_labels} labels): {args.height}x{args.width} images, "
        f"{len(thresholds)} thresholds (confusions identical on the loop's images)"
    )
    table.add_column("method")
    table.add_column("images", justify="right")
    table.add_column("images/s (all thresholds)", justify="right")
    table.add_column("ms/image", justify="right")
    table.add_column("total s", justify="right")
    table.add_row(
        "per-threshold loop (reference)",
        str(args.loop_images),
        f"{loop_rate:.1f}",
        f"{1000 / loop_rate:.1f}",
        f"{loop_s:.2f}",
    )
    table.add_row("one-pass sweep", str(args.images), f"{sweep_rate:.1f}", f"{1000 / sweep_rate:.1f}", f"{sweep_s:.2f}")
    Console().print(table)
    print(f"speedup: {figures['speedup']:.1f}x")
    if args.json:
        atomic_write_json(args.json, figures)
        log.info("wrote %s", args.json)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
