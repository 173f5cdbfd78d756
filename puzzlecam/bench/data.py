"""``python -m puzzlecam.bench data``: training-pipeline images/s: local shards (random access), the same
shards streamed over HTTP (puzzlecam.data.remote, through webdataset), and a per-file folder loader.

All three pipelines do the same work per image: decode the JPEG, rescale (bicubic, long side uniform in
[min, max]), flip, crop to a uint8 canvas, collate a batch. The local pipeline is
``puzzlecam.data.train_loader`` on the shard files (tar headers indexed, members read by offset); the HTTP one
is ``train_loader`` on ``http://127.0.0.1:PORT/NAME.tar`` URLs of the same shards served by a loopback
``http.server`` thread (each shard streamed by curl through webdataset's gopen, shuffled in windows of
``--shuffle-buffer``); the folder pipeline reads ``JPEGImages/{id}.jpg`` and its XML one file at a time
through a shuffled DataLoader, the way the original research code reads VOC. Without ``--voc-root`` a
synthetic VOC-size set is generated into a temporary folder first. The page cache is warmed for all before
timing, so the figures compare the pipelines, not the disk (docs/data.md).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset

from puzzlecam import NUM_CLASSES
from puzzlecam.data import train_loader
from puzzlecam.data.augment import augment
from puzzlecam.data.remote import serve_directory
from puzzlecam.data.shards import resolve_shards
from puzzlecam.data.voc import parse_annotation, read_id_list
from puzzlecam.errors import UsageError
from puzzlecam.utils.cli import run_command
from puzzlecam.utils.files import atomic_write_json

log = logging.getLogger(__name__)


class FolderDataset(Dataset):
    """Per-file VOC reading (JPEGImages + Annotations), as the original code does."""

    def __init__(self, voc_root: Path, ids: list[str], crop_size: int, min_long: int, max_long: int):
        self.voc, self.ids = voc_root, ids
        self.crop_size, self.min_long, self.max_long = crop_size, min_long, max_long

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        from PIL import Image

        image_id = self.ids[i]
        image = np.array(Image.open(self.voc / "JPEGImages" / f"{image_id}.jpg").convert("RGB"))
        labels = torch.zeros(NUM_CLASSES)
        labels[parse_annotation((self.voc / "Annotations" / f"{image_id}.xml").read_bytes())] = 1.0
        rng = np.random.default_rng()  # fresh randomness per sample, as the original code
        canvas, valid = augment(image, rng, self.crop_size, self.min_long, self.max_long, True)
        return torch.from_numpy(canvas), torch.tensor(valid), labels


def _rate(batches, count: int, batch_size: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    return count * batch_size / (time.perf_counter() - start)


def _endless(loader):
    while True:
        yield from loader


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m puzzlecam.bench data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--voc-root", help="a VOCdevkit/VOC2012 folder (default: a generated synthetic set)")
    p.add_argument("--split", default="train", help="ImageSets/Segmentation list to read (default train)")
    p.add_argument("--shards", help="shards of that split (default: written from --voc-root into a temp folder)")
    p.add_argument("--num-images", type=int, default=400, help="size of the generated set (default 400)")
    p.add_argument("--image-size", type=int, default=500, help="long side of generated images (default 500, as VOC)")
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts to try (default 0,1,2)")
    p.add_argument(
        "--shuffle-buffer", type=int, default=100, help="the HTTP stream's shuffle window, samples (default 100)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    p.add_argument("--crop-size", type=int, default=512, help="crop size (default 512, the paper's)")
    p.add_argument("--min-long-side", type=int, default=320, help="rescale range, low end (default 320)")
    p.add_argument("--max-long-side", type=int, default=640, help="rescale range, high end (default 640)")
    p.add_argument("--batches", type=int, default=8, help="timed batches per measurement (default 8)")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="measurements per pipeline, alternating; the median is reported (default 3)",
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (worker start-up; default 3)")
    p.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    return p


def _worker_counts(text: str) -> list[int]:
    try:
        workers = [int(w) for w in text.split(",")]
    except ValueError:
        raise UsageError(f"--workers must be comma-separated integers, got {text!r}") from None
    if any(w < 0 for w in workers):
        raise UsageError(f"--workers must be >= 0, got {text!r}")
    return workers


def _check_counts(args: argparse.Namespace) -> None:
    for flag, value, low in (
        ("--batch-size", args.batch_size, 1),
        ("--batches", args.batches, 1),
        ("--repeats", args.repeats, 1),
        ("--warmup", args.warmup, 0),
        ("--shuffle-buffer", args.shuffle_buffer, 1),
    ):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")


def run(args: argparse.Namespace) -> None:
    workers = _worker_counts(args.workers)
    _check_counts(args)

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        voc = Path(args.voc_root) if args.voc_root else Path(tmp) / "voc"
        if not args.voc_root:
            from puzzlecam.data.synth import synthesize

            if args.image_size < 32:  # synthesize would name its own flag, --size
                raise UsageError(f"--image-size must be >= 32, got {args.image_size}")
            log.info("generating %d synthetic images of %d px", args.num_images, args.image_size)
            synthesize(voc, num_images=args.num_images, size=args.image_size, seed=0, val_fraction=0.0)
        shards = args.shards
        if shards is None:
            from puzzlecam.data.shard import shard_dataset

            log.info("sharding %s (split %s)", voc, args.split)
            shard_dataset(voc, out=Path(tmp) / "shards", split=args.split, shard_size=100)
            shards = str(Path(tmp) / "shards" / f"{args.split}-*.tar")
        ids = read_id_list(voc / "ImageSets" / "Segmentation" / f"{args.split}.txt")
        for f in list(Path(tmp).rglob("*")) + [voc / "JPEGImages" / f"{i}.jpg" for i in ids]:
            if f.is_file():
                f.read_bytes()  # warm the page cache for both pipelines
        aug = dict(crop_size=args.crop_size, min_long_side=args.min_long_side, max_long_side=args.max_long_side)
        paths = resolve_shards(shards)
        if len({p.parent.resolve() for p in paths}) != 1:
            raise UsageError(f"--shards {shards}: the HTTP pipeline serves one folder; these shards lie in several")
        results = []
        with serve_directory(paths[0].parent) as base:
            urls = [f"{base}/{p.name}" for p in paths]
            for k in workers:
                local = train_loader(shards, batch_size=args.batch_size, seed=0, num_workers=k, **aug)
                http = train_loader(
                    urls,
                    batch_size=args.batch_size,
                    seed=0,
                    num_workers=k,
                    shuffle_buffer=args.shuffle_buffer,
                    samples_per_epoch=local.num_samples,  # no manifest needed beside --shards
                    **aug,
                )
                folder = DataLoader(
                    FolderDataset(voc, ids, args.crop_size, args.min_long_side, args.max_long_side),
                    batch_size=args.batch_size,
                    shuffle=True,
                    drop_last=True,
                    num_workers=k,
                    persistent_workers=k > 0,
                )
                runs = {
                    "shards": (_endless(local), []),
                    "http": (_endless(http), []),
                    "folder": (_endless(folder), []),
                }
                for it, _ in runs.values():
                    for _ in range(args.warmup):
                        next(it)
                # Alternate the pipelines and keep the median: the machine's load drifts over time.
                for _ in range(args.repeats):
                    for it, rates in runs.values():
                        rates.append(_rate(it, args.batches, args.batch_size))
                medians = {f"{n}_images_per_s": float(np.median(r)) for n, (_, r) in runs.items()}
                results.append({"workers": k, **medians})
                del local, http, folder, runs

    table = Table(
        title=f"training pipeline images/s, batch {args.batch_size}, crop {args.crop_size}, "
        f"median of {args.repeats} x {args.batches} batches"
    )
    for col in ("workers", "local", "HTTP", "folder", "HTTP/local", "local/folder"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            str(r["workers"]),
            f"{r['shards_images_per_s']:.1f}",
            f"{r['http_images_per_s']:.1f}",
            f"{r['folder_images_per_s']:.1f}",
            f"{r['http_images_per_s'] / r['shards_images_per_s']:.2f}x",
            f"{r['shards_images_per_s'] / r['folder_images_per_s']:.2f}x",
        )
    Console().print(table)
    if args.json_out:
        atomic_write_json(args.json_out, results)


def main(argv=None) -> int:
    return run_command(build_parser(), run, argv)
