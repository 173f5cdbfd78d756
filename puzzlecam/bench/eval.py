"""``python -m puzzlecam.bench eval``: the one-pass threshold sweep against a per-threshold loop.

Both sides score the same in-memory random CAMs and masks (VOC-sized by default) at every
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

from puzzlecam.errors import RunError, UsageError
from puzzlecam.evaluate import DEFAULT_THRESHOLDS, NUM_LABELS, confusion_sweep, miou, parse_thresholds
from puzzlecam.utils.cli import run_command
from puzzlecam.utils.files import atomic_write_json
from puzzlecam.utils.labelmap import IGNORE_INDEX

log = logging.getLogger(__name__)


def make_images(count: int, height: int, width: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(cams float16 (K, H, W), keys 1..20 (K,), mask uint8 (H, W)) with 1..3 classes and some 255 pixels."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        k = int(rng.integers(1, 4))
        keys = rng.choice(np.arange(1, NUM_LABELS), k, replace=False)
        cams = rng.random((k, height, width), dtype=np.float32).astype(np.float16)
        mask = rng.choice(np.concatenate([[0], keys]), (height, width)).astype(np.uint8)
        mask[rng.random((height, width)) < 0.05] = IGNORE_INDEX
        images.append((cams, keys, mask))
    return images


def loop_confusions(images, thresholds: list[float]) -> np.ndarray:
    """Per threshold, per image: argmax over [t, cams] (ties to background) and a bincount confusion."""
    out = np.zeros((len(thresholds), NUM_LABELS, NUM_LABELS), dtype=np.int64)
    for i, t in enumerate(thresholds):
        for cams, keys, mask in images:
            stacked = np.concatenate([np.full((1,) + cams.shape[1:], t, dtype=np.float64), cams.astype(np.float64)])
            pred = np.concatenate([[0], keys])[stacked.argmax(0)]
            valid = mask != IGNORE_INDEX
            out[i] += np.bincount(
                mask[valid].astype(np.int64) * NUM_LABELS + pred[valid], minlength=NUM_LABELS * NUM_LABELS
            ).reshape(NUM_LABELS, NUM_LABELS)
    return out


def sweep_confusions(images, thresholds: list[float]) -> np.ndarray:
    out = torch.zeros(len(thresholds), NUM_LABELS, NUM_LABELS, dtype=torch.long)
    for cams, keys, mask in images:
        out += confusion_sweep(torch.from_numpy(cams), torch.from_numpy(keys), torch.from_numpy(mask), thresholds)
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
    p.add_argument("--images", type=int, default=32, help="number of random images (default 32)")
    p.add_argument("--height", type=int, default=375, help="image height (default 375, a typical VOC image)")
    p.add_argument("--width", type=int, default=500, help="image width (default 500)")
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
    for flag, value in (("--images", args.images), ("--height", args.height), ("--width", args.width)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads < 0:
        raise UsageError(f"--threads must be 0 (torch's choice) or more, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    thresholds = parse_thresholds(args.thresholds)
    images = make_images(args.images, args.height, args.width, args.seed)

    loop_s, loop_conf = _time(lambda: loop_confusions(images, thresholds), args.repeats)
    sweep_s, sweep_conf = _time(lambda: sweep_confusions(images, thresholds), args.repeats)
    if not np.array_equal(loop_conf, sweep_conf):
        raise RunError("the sweep's confusion matrices differ from the per-threshold loop's")
    best_miou = float(torch.nan_to_num(miou(torch.from_numpy(sweep_conf))[0], nan=-1).max())

    figures = {
        "images": args.images,
        "image_size": [args.height, args.width],
        "thresholds": len(thresholds),
        "loop_images_per_s": args.images / loop_s,
        "sweep_images_per_s": args.images / sweep_s,
        "speedup": loop_s / sweep_s,
        "identical_confusions": True,
        "best_miou_check": best_miou,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"eval: {args.images} images {args.height}x{args.width}, "
        f"{len(thresholds)} thresholds (confusions identical)"
    )
    table.add_column("method")
    table.add_column("images/s (all thresholds)", justify="right")
    table.add_column("ms/image", justify="right")
    table.add_row(
        "per-threshold loop (reference)", f"{figures['loop_images_per_s']:.1f}", f"{1000 * loop_s / args.images:.1f}"
    )
    table.add_row("one-pass sweep", f"{figures['sweep_images_per_s']:.1f}", f"{1000 * sweep_s / args.images:.1f}")
    Console().print(table)
    print(f"speedup: {figures['speedup']:.1f}x")
    if args.json:
        atomic_write_json(args.json, figures)
        log.info("wrote %s", args.json)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
