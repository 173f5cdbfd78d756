"""Multi-scale + flip segmentation with a trained DeepLabv3+ network: palette-PNG label maps (docs/inference.md).

``python -m puzzlecam.segment --weights SEG/model.safetensors --shards PATTERN --out DIR [--crf] [--submission]``

* The network comes from ``config.yaml`` beside the weights (or ``--config``; its ``task`` must be
  ``segmentation``); the weights are loaded strictly.
* Per image (H, W) and scale s (default 0.5, 1.0, 1.5, 2.0): the image is resized to (round(H*s), round(W*s))
  as puzzlecam.infer resizes it (bicubic, antialiased, clamped; :func:`puzzlecam.infer.normalize`), run
  together with its horizontal flip as one batch of 2, and both logit maps are resized to (H, W) (bilinear,
  align_corners False), the flipped one flipped back. The 2 x (number of scales) maps are summed, then
  softmaxed over the classes (:func:`segment_probabilities`).
* ``--crf``: a dense CRF on the softmax (unaries -log p; 10 mean-field steps; Gaussian sxy 3 compat 3,
  bilateral sxy 80 srgb 13 compat 10; puzzlecam.labels.crf_probabilities).
* The label map is the argmax over the classes (ties go to the lower class index), written as a palette PNG
  ``{id}.png`` with the VOC palette (puzzlecam.utils.labelmap), which ``puzzlecam.evaluate --mode labels``
  scores. ``--submission`` writes them in the VOC evaluation server's layout
  ``results/VOC2012/Segmentation/comp6_test_cls/{id}.png`` and packs that tree into ``results.tar.gz``
  (deterministic: sorted members, zero mtimes and owners).
* ``segment.json`` records the settings and counts; a rerun with other weights, scales, flip, CRF or layout
  is refused unless ``--overwrite``. Under torchrun the images are divided across ranks (each written by
  exactly one); a rerun skips images whose PNG decodes to the image's size; files are written atomically.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import sys
import tarfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from puzzlecam.camstore import INDEX_NAME, RW_META_NAME, changed_settings, file_name, finish_run
from puzzlecam.errors import InferenceError
from puzzlecam.infer import META_NAME as INFER_META_NAME
from puzzlecam.infer import (
    _file_digest,
    add_store_run_flags,
    autocast_for,
    claim_out,
    load_trained,
    normalize,
    parse_scales,
    scaled_size,
    start_ranks,
)
from puzzlecam.labels import crf_probabilities, require_crf
from puzzlecam.utils.cli import run_command
from puzzlecam.utils.files import atomic_write, atomic_write_bytes, atomic_write_json, output_directory
from puzzlecam.utils.labelmap import IGNORE_INDEX, decode_label_png, encode_label_png, png_size
from puzzlecam.utils.progress import ProgressBar

log = logging.getLogger("puzzlecam.segment")  # not __name__: that is "__main__" under python -m

META_NAME = "segment.json"
DEFAULT_SCALES = (0.5, 1.0, 1.5, 2.0)  # the original's inference_segmentation.py
CRF_ITERS = 10
# The VOC evaluation server's layout: comp6 = methods trained on data beyond VOC's own (here: ImageNet and
# the weak labels' pipeline), as the original submits.
SUBMISSION_DIR = Path("results", "VOC2012", "Segmentation", "comp6_test_cls")
SUBMISSION_ARCHIVE = "results.tar.gz"
# Settings that change the label maps or where they go: one --out never mixes two of them (unless --overwrite).
SETTINGS = ("weights_sha256", "scales", "flip", "crf_iters", "layout")


# ---------------------------------------------------------------------------------------------
# Model and one image


def load_segmenter(weights: str | Path, config: str | Path | None = None, device: str | torch.device = "cpu"):
    """(DeepLabv3+ in eval mode on ``device``, Config) from a segmentation run's model.safetensors and config.yaml."""
    model, cfg = load_trained(weights, config, device, "segmentation", "puzzlecam.segment")
    if model.num_classes > IGNORE_INDEX:
        raise InferenceError(
            f"--weights {weights}: {model.num_classes} classes do not fit a palette PNG's indices "
            f"0..{IGNORE_INDEX - 1} ({IGNORE_INDEX} is the ignore index)"
        )
    return model, cfg


@torch.no_grad()
def segment_logits(
    model,
    image: torch.Tensor,
    scales,
    flip: bool = True,
    autocast=None,
    pair_per_forward: bool = True,
    channels_last: bool = False,
) -> torch.Tensor:
    """The summed logits (C, H, W) fp32 of one uint8 image (H, W, 3) on the model's device: per scale, the
    resized image (and with ``flip`` its mirror image) through ``model``, each logit map resized to (H, W)
    (bilinear, align_corners False), the flipped one flipped back. ``pair_per_forward``: the image and its
    flip run as one batch of 2 (else one forward each: the reference the benchmark compares with);
    ``channels_last``: the inputs in that memory format (for a model converted to it)."""
    from puzzlecam.data import IMAGENET_MEAN, IMAGENET_STD

    device = image.device
    mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=torch.float32)
    std = torch.tensor(IMAGENET_STD, device=device, dtype=torch.float32)
    h, w = image.shape[:2]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    total = None
    for scale in scales:
        x = normalize(image[None], scaled_size((h, w), scale), mean, std)
        passes = [x, x.flip(-1)] if flip else [x]
        if pair_per_forward:
            passes = [torch.cat(passes)]
        logits = []
        for batch in passes:
            with autocast or nullcontext():
                out = model(batch.contiguous(memory_format=memory_format))
            logits.append(out.float())
        logits = F.interpolate(torch.cat(logits), size=(h, w), mode="bilinear", align_corners=False)
        summed = logits[0] + logits[1].flip(-1) if flip else logits[0]
        total = summed if total is None else total + summed
    return total


def segment_probabilities(model, image: torch.Tensor, scales, flip: bool = True, autocast=None) -> torch.Tensor:
    """Softmax over the classes (C, H, W) fp32 of :func:`segment_logits`: the maps the argmax (or CRF) reads."""
    return torch.softmax(segment_logits(model, image, scales, flip, autocast), dim=0)


def label_map(probs: torch.Tensor, image: np.ndarray | None = None, crf_iters: int = 0) -> np.ndarray:
    """uint8 (H, W) class indices: the argmax of ``probs`` (C, H, W), after ``crf_iters`` steps of the dense CRF
    on the RGB ``image`` (H, W, 3) when ``crf_iters`` > 0."""
    if crf_iters > 0:
        refined = crf_probabilities(image, probs.cpu().numpy(), crf_iters)
        return refined.argmax(0).astype(np.uint8)
    return probs.argmax(0).to(torch.uint8).cpu().numpy()


def is_complete_png(path: Path, size: tuple[int, int]) -> bool:
    """True when ``path`` is a label PNG of ``size`` that decodes completely (a rerun skips only such images)."""
    try:
        data = path.read_bytes()
        if png_size(data) != tuple(size):
            return False
        decode_label_png(data)
        return True
    except Exception:  # missing, truncated, not a PNG, ...: recomputed
        return False


# ---------------------------------------------------------------------------------------------
# Submission


def write_submission_archive(out: Path) -> Path:
    """``out/results.tar.gz`` of ``out/results/...`` (every PNG there): the same files give the same bytes
    (sorted members, mtime 0, owner root, fixed modes, no name or time in the gzip header); atomic."""
    root = out / SUBMISSION_DIR
    pngs = sorted(p.name for p in root.iterdir() if p.suffix == ".png" and not p.name.startswith("."))

    def entry(name: str, directory: bool = False, size: int = 0) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
        info.mode, info.size, info.mtime = (0o755 if directory else 0o644), size, 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    def write(f) -> None:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for depth in range(1, len(SUBMISSION_DIR.parts) + 1):
                    tar.addfile(entry("/".join(SUBMISSION_DIR.parts[:depth]), directory=True))
                for name in pngs:
                    path = root / name
                    with open(path, "rb") as data:
                        tar.addfile(entry(f"{SUBMISSION_DIR.as_posix()}/{name}", size=path.stat().st_size), data)

    return atomic_write(out / SUBMISSION_ARCHIVE, write)


# ---------------------------------------------------------------------------------------------
# Bookkeeping


def _check_out(out: Path, meta: dict, overwrite: bool) -> None:
    """Refuse an --out that holds a CAM or random-walk store, or label maps of other settings."""
    for name in (INFER_META_NAME, RW_META_NAME, INDEX_NAME):
        if (out / name).is_file():
            raise InferenceError(
                f"--out {out} holds a CAM or random-walk store ({name}); write the label maps to another directory"
            )
    differs = [] if overwrite else changed_settings(out, META_NAME, meta, SETTINGS)
    if differs:
        raise InferenceError(
            f"--out {out} already holds label maps made with other {', '.join(differs)} (see {out / META_NAME}); "
            "use another --out or pass --overwrite to recompute every image"
        )


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m puzzlecam.segment",
        description="Multi-scale + flip segmentation with a trained DeepLabv3+ network (task: segmentation): per "
        "image the logits of every scale and of its flip, resized to the image, are summed, softmaxed, optionally "
        "refined by a dense CRF, and the argmax is written as a VOC-palette PNG {id}.png that "
        "'puzzlecam.evaluate --mode labels' scores; segment.json records the settings. Run under torchrun to divide "
        "the images across processes; a rerun skips completed images.",
    )
    p.add_argument(
        "--weights", type=Path, required=True, help="a segmentation run's model.safetensors (DeepLabv3+ state dict)"
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="config.yaml of the network, with task: segmentation (default: the one beside --weights)",
    )
    p.add_argument(
        "--shards",
        required=True,
        help="webdataset shard pattern of the images, e.g. 'data/voc/val-{000000..000001}.tar' "
        "(masks are not needed: a test split works)",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory of the label maps")
    p.add_argument(
        "--scales",
        default=",".join(map(str, DEFAULT_SCALES)),
        help="comma-separated scales of the image (default 0.5,1.0,1.5,2.0, the original's)",
    )
    p.add_argument("--no-flip", action="store_true", help="skip the horizontally flipped passes")
    p.add_argument(
        "--crf",
        action="store_true",
        help="refine the softmax with a dense CRF (unaries -log p; Gaussian sxy 3 compat 3, bilateral sxy 80 srgb 13 "
        "compat 10) before the argmax; needs pip install .[crf] (pydensecrf2); CPU, one image at a time",
    )
    p.add_argument("--crf-iters", type=int, default=CRF_ITERS, help=f"mean-field steps of --crf (default {CRF_ITERS})")
    p.add_argument(
        "--submission",
        action="store_true",
        help=f"write the VOC evaluation server's layout {SUBMISSION_DIR.as_posix()}/{{id}}.png under --out and, "
        f"at the end, --out/{SUBMISSION_ARCHIVE} of it (deterministic) to upload",
    )
    add_store_run_flags(
        p, precision="autocast dtype of the forward passes (default fp32); the logits are summed in fp32", backend=None
    )
    return p


def check_flags(args) -> tuple[float, ...]:
    """Refuse bad flag values before any work, naming the flag; returns the scales."""
    scales = parse_scales(args.scales)
    if args.crf_iters < 1:
        raise InferenceError(f"--crf-iters must be at least 1, got {args.crf_iters}")
    if args.num_workers < 0:
        raise InferenceError(f"--num-workers must be 0 or more, got {args.num_workers}")
    if args.crf:
        require_crf("--crf")
    return scales


def run(args) -> None:
    scales = check_flags(args)
    with output_directory(args.out):  # created by the first file written into it
        _segment(args, scales)


def _segment(args, scales: tuple[float, ...]) -> None:
    from puzzlecam.data import eval_loader

    rank, world, device = start_ranks(args.device)
    model, cfg = load_segmenter(args.weights, args.config, device)
    flip = not args.no_flip
    crf_iters = args.crf_iters if args.crf else 0
    layout = "voc-submission" if args.submission else "flat"
    meta = {
        "weights": str(args.weights),
        "weights_sha256": _file_digest(args.weights),
        "arch": cfg.model.arch,
        "num_classes": model.num_classes,
        "scales": list(scales),
        "flip": flip,
        "crf_iters": crf_iters,
        "layout": layout,
        "shards": args.shards,
        "resize": "bicubic (F.interpolate, antialias, clamped to [0, 1]); logits bilinear, align_corners False",
        "precision": args.precision,
    }
    labels_dir = args.out / SUBMISSION_DIR if args.submission else args.out
    claim_out([args.out, labels_dir], rank, lambda: _check_out(args.out, meta, args.overwrite))
    autocast = autocast_for(device, args.precision)
    loader = eval_loader(args.shards, num_workers=args.num_workers, rank=rank, world_size=world)
    written = skipped = 0
    with ProgressBar(f"segmentation (rank 0 of {world})", len(loader) or None, enabled=rank == 0) as progress:
        for batch in loader:
            image_id, image = batch["id"][0], batch["image"][0]
            path = labels_dir / file_name(image_id, ".png")
            progress.advance()
            if not args.overwrite and is_complete_png(path, tuple(image.shape[:2])):
                skipped += 1
                continue
            probs = segment_probabilities(model, image.to(device), scales, flip, autocast)
            labels = label_map(probs, np.asarray(image) if crf_iters else None, crf_iters)
            atomic_write_bytes(path, encode_label_png(labels))
            written += 1

    def settings_and_archive(totals: dict[str, int]) -> None:
        if args.submission:
            labels_dir.mkdir(parents=True, exist_ok=True)
            archive = write_submission_archive(args.out)
            log.info("submission: %s (upload it to the VOC evaluation server)", archive)
        atomic_write_json(args.out / META_NAME, {**meta, "samples": loader.num_samples, **totals})
        log.info(
            "segmentation: %d written, %d already complete, %d corrupt samples skipped, %d process(es); "
            "label maps in %s",
            totals["written"],
            totals["skipped_complete"],
            totals["corrupt_samples"],
            world,
            labels_dir,
        )

    counts = {"written": written, "skipped_complete": skipped, "corrupt_samples": loader.skipped}
    finish_run(args.out, counts, settings_and_archive)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
