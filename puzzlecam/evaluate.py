"""CAM evaluation: the threshold-sweep mIoU (docs/inference.md), every threshold in one pass.

Semantics (the reference evaluation):

* The background score is a constant threshold ``t`` placed before the class maps; the prediction
  is the argmax over ``[t, cam_1, ..., cam_K]``. np.argmax picks the first maximum, so ties go to
  background: a pixel is predicted as its best class c* only if its best score s* > t (strictly),
  and ties between two classes go to the one listed first in ``keys``.
* Pixels whose ground truth is 255 are ignored. Confusion matrices are 21 x 21 with
  **rows = ground truth, columns = prediction** (class 0 = background, 1..20 = VOC classes).
* IoU = TP / (P + T - TP) per class (T = ground-truth pixels, P = predicted pixels);
  mIoU = nan-mean over the 21 classes (a class absent from both prediction and ground truth is nan
  and excluded). FP rate = (P - TP) / union, FN rate = (T - TP) / union (the reference's FP / FN).

One pass: a pixel's prediction at threshold t depends only on (c*, s*), so pixels are counted by
(ground truth, c*, number of thresholds strictly below s*) and a cumulative sum over the last axis
gives all T confusion matrices at once (:func:`confusion_sweep`). Comparisons are made in float64
on the stored float16 values.

Class indices: the CAM store keeps ``keys`` as *channel indices* 0..19; :func:`confusion_sweep`
takes *class indices* 1..20 (channel + 1), like the label maps. The CLI converts.

CLI: ``python -m puzzlecam.evaluate --cams DIR --shards PATTERN`` (see ``--help``; the default sweep is
0.05..0.80, or 0.05..0.50 for a random-walk store of puzzlecam.rw, whose maps are divided by one
global max and so score lower); ``--mode labels
--labels DIR`` scores PNG label maps instead (pixels a label map marks 255 count as undecided:
they add to T of their ground-truth class and to no P, i.e. as misses).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from puzzlecam.camstore import CamStoreError, cam_path, file_name, is_rw_store, read_cam, shown_id
from puzzlecam.datasets import VOC, Dataset, of_shards
from puzzlecam.errors import EvaluationError
from puzzlecam.utils.cli import run_command
from puzzlecam.utils.files import atomic_write, atomic_write_json, output_directory
from puzzlecam.utils.labelmap import IGNORE_INDEX, decode_label_png, png_size
from puzzlecam.utils.progress import ProgressBar

log = logging.getLogger("puzzlecam.evaluate")  # not __name__: that is "__main__" under python -m

NUM_LABELS = VOC.num_labels  # the default: background + VOC's 20 classes (datasets hold theirs)
CLASS_NAMES = VOC.label_names
DEFAULT_THRESHOLDS = "0.05:0.80:0.05"
# Random-walk maps (puzzlecam.rw) are divided by one global max, not per class: smaller scores.
RW_DEFAULT_THRESHOLDS = "0.05:0.50:0.05"


def parse_thresholds(spec: str) -> list[float]:
    """``"0.05:0.80:0.05"`` (start:stop:step, stop included) or ``"0.1,0.2,0.3"`` -> sorted floats."""
    try:
        if ":" in spec:
            start, stop, step = (float(p) for p in spec.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise EvaluationError(
            f"--thresholds {spec!r}: expected start:stop:step with step > 0 and stop >= start "
            "(e.g. 0.05:0.80:0.05) or a comma list (e.g. 0.1,0.2)"
        ) from None
    if not values or not all(math.isfinite(v) for v in values):
        raise EvaluationError(f"--thresholds {spec!r} gives no usable (finite) threshold")
    return sorted(set(values))


def default_thresholds(cams_dir: str | Path) -> str:
    """The default sweep of a store: 0.05..0.50 for random-walk maps (rw.json beside them), else 0.05..0.80."""
    return RW_DEFAULT_THRESHOLDS if is_rw_store(cams_dir) else DEFAULT_THRESHOLDS


def _outside(num_labels: int) -> str:
    return f"outside 0..{num_labels - 1} and {IGNORE_INDEX}"


def _label_bytes(labels: torch.Tensor) -> torch.Tensor | None:
    """``labels`` as uint8; None where a value does not fit 0..255 (then it is neither a class nor 255)."""
    if labels.dtype == torch.uint8:
        return labels
    labels = labels.long()
    return None if bool(((labels < 0) | (labels > 255)).any()) else labels.to(torch.uint8)


def _values_outside(labels: torch.Tensor, num_labels: int) -> list[int]:
    bad = (labels >= num_labels) & (labels != IGNORE_INDEX) | (labels < 0)
    return sorted({int(v) for v in labels[bad].unique()[:10]})


def _check_gt(gt: torch.Tensor, num_labels: int) -> None:
    bad = (gt >= num_labels) & (gt != IGNORE_INDEX) | (gt < 0)
    if bool(bad.any()):
        raise EvaluationError(f"ground truth holds values {_values_outside(gt, num_labels)} {_outside(num_labels)}")


def confusion_sweep(cams, keys, gt, thresholds, num_labels: int = NUM_LABELS) -> torch.Tensor:
    """All thresholds' confusion matrices of one image: int64 tensor (T, 21, 21), rows = ground truth.

    ``cams`` (K, H, W) are the normalized maps of the image's K labelled classes, ``keys`` (K,) their
    class indices 1..20 (channel index + 1), ``gt`` (H, W) the mask (0..20, 255 ignored) and
    ``thresholds`` (T,) the background scores, in any order (the result follows their order).
    K = 0 predicts background everywhere.
    """
    gt = torch.as_tensor(gt)
    cams = torch.as_tensor(cams)
    keys = torch.as_tensor(keys, dtype=torch.long).reshape(-1)
    thr = torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1)
    if gt.dim() != 2:
        raise EvaluationError(f"gt must be (H, W), got shape {tuple(gt.shape)}")
    if cams.dim() != 3 or cams.shape[0] != keys.numel() or tuple(cams.shape[1:]) != tuple(gt.shape):
        raise EvaluationError(
            f"cams must be (K, H, W) = ({keys.numel()}, {gt.shape[0]}, {gt.shape[1]}) to match {keys.numel()} keys "
            f"and the mask, got shape {tuple(cams.shape)}"
        )
    if keys.numel() and (int(keys.min()) < 1 or int(keys.max()) >= num_labels):
        raise EvaluationError(
            f"keys must be class indices 1..{num_labels - 1} (channel index + 1), got {keys.tolist()}"
        )
    if thr.numel() == 0:
        raise EvaluationError("no thresholds given")
    gt = gt.long()
    _check_gt(gt, num_labels)
    num_t = thr.numel()
    # Ignored pixels go to an extra ground-truth row that is dropped at the end: cheaper than
    # boolean indexing every array.
    g = torch.where(gt == IGNORE_INDEX, num_labels, gt).reshape(-1)
    rows = num_labels + 1
    sorted_thr, order = thr.sort()
    if keys.numel() == 0:
        counts = torch.bincount(g, minlength=rows)[:num_labels]
        swept = torch.zeros(num_t, num_labels, num_labels, dtype=torch.long)
        swept[:, :, 0] = counts
    else:
        flat = cams.reshape(keys.numel(), -1).float()  # float16 -> float32 is exact: ties are kept
        # max over dim 0 returns the first maximal index (like np.argmax); much faster than argmax here.
        score, best = flat.max(0)
        if bool(torch.isnan(score).any()):
            raise EvaluationError("cams hold nan values")
        below = torch.searchsorted(sorted_thr, score.double(), right=False)  # thresholds strictly below s*
        bins = (g * num_labels + keys[best]) * (num_t + 1) + below
        hist = torch.bincount(bins, minlength=rows * num_labels * (num_t + 1))
        hist = hist.reshape(rows, num_labels, num_t + 1)[:num_labels]
        at_least = hist.flip(-1).cumsum(-1).flip(-1)  # [..., k] = pixels with >= k thresholds below s*
        fg = at_least[..., 1:]  # at sorted threshold j the pixel is c* iff > j thresholds are below s*
        bg = (at_least[..., :1] - fg).sum(1)  # (gt, T): pixels that fall back to background
        swept = fg.permute(2, 0, 1).contiguous()
        swept[:, :, 0] += bg.T
    out = torch.empty_like(swept)
    out[order] = swept
    return out


def confusion_from_labels(pred, gt, num_labels: int = NUM_LABELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Confusion (21, 21) of a label map against a mask, and the undecided (pred 255) pixels per gt class.

    One histogram of (gt, pred) byte pairs (256 x 256 bins) gives both, and its bins outside the classes show
    values that are neither a class nor 255 (refused, naming them): one pass over the pixels.
    """
    pred = torch.as_tensor(pred)
    gt = torch.as_tensor(gt)
    if pred.shape != gt.shape:
        raise EvaluationError(f"label map shape {tuple(pred.shape)} differs from the mask's {tuple(gt.shape)}")
    if not 1 <= num_labels <= IGNORE_INDEX:
        raise EvaluationError(f"num_labels must be in 1..{IGNORE_INDEX}, got {num_labels}")
    g, p = _label_bytes(gt), _label_bytes(pred)
    if g is None:  # values outside 0..255: refused, naming them
        _check_gt(gt.long(), num_labels)
    if p is None:
        bad = _values_outside(pred.long(), num_labels)
        raise EvaluationError(f"label map holds values {bad} {_outside(num_labels)}")
    # numpy's bincount of 16-bit keys is ~10x faster than torch's on CPU (VOC val: ~0.5 ms an image); the few
    # sums over the 256 x 256 bins are numpy's too (torch's thread pool costs more than they do).
    pairs = (g.cpu().numpy().astype(np.uint16) << 8) | p.cpu().numpy()
    hist = np.bincount(pairs.reshape(-1), minlength=256 * 256).reshape(256, 256)
    bad_gt = np.flatnonzero(hist[num_labels:IGNORE_INDEX].any(1)) + num_labels
    if bad_gt.size:
        raise EvaluationError(f"ground truth holds values {bad_gt[:10].tolist()} {_outside(num_labels)}")
    bad_pred = np.flatnonzero(hist[:, num_labels:IGNORE_INDEX].any(0)) + num_labels
    if bad_pred.size:
        raise EvaluationError(f"label map holds values {bad_pred[:10].tolist()} {_outside(num_labels)}")
    conf = torch.from_numpy(np.ascontiguousarray(hist[:num_labels, :num_labels], dtype=np.int64))
    return conf, torch.from_numpy(np.ascontiguousarray(hist[:num_labels, IGNORE_INDEX], dtype=np.int64))


def _rates(confusion, undecided=None):
    conf = torch.as_tensor(confusion).double()
    tp = conf.diagonal(dim1=-2, dim2=-1)
    gt_total = conf.sum(-1)
    if undecided is not None:
        gt_total = gt_total + torch.as_tensor(undecided).double()
    pred_total = conf.sum(-2)
    union = gt_total + pred_total - tp
    return tp, gt_total, pred_total, union


def miou(confusion, undecided=None):
    """``(miou, per_class_iou)`` of a (21, 21) confusion (rows = ground truth) or a stack (T, 21, 21).

    IoU = TP / (P + T - TP); a class with P = T = 0 is nan and left out of the mean. For one matrix
    ``miou`` is a float and ``per_class_iou`` a float64 tensor (21,); for a stack, tensors (T,) and
    (T, 21). ``undecided`` (21,) adds label-map pixels marked 255 to T (they count as misses).
    """
    tp, _, _, union = _rates(confusion, undecided)
    iou = tp / union  # 0 / 0 = nan for classes absent from both
    mean = iou.nanmean(-1)
    return (float(mean), iou) if iou.dim() == 1 else (mean, iou)


def error_rates(confusion, undecided=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class FP rate (P - TP) / union and FN rate (T - TP) / union (nan where union = 0)."""
    tp, gt_total, pred_total, union = _rates(confusion, undecided)
    return (pred_total - tp) / union, (gt_total - tp) / union


# ---------------------------------------------------------------------------------------------
# Driving a whole evaluation


def iter_masks(shards: str, num_workers: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """(id, mask uint8 (H, W)) of every sample with a mask in ``shards`` (via puzzlecam.data.eval_loader)."""
    from puzzlecam.data import eval_loader

    loader = eval_loader(shards, num_workers=num_workers, rank=0, world_size=1)
    for batch in loader:
        if bool(batch["has_mask"][0]):
            yield batch["id"][0], batch["mask"][0].numpy()
    if loader.skipped:
        raise EvaluationError(
            f"{loader.skipped} samples of --shards {shards} could not be decoded (see the warnings); "
            "they cannot be scored"
        )


def sweep_cams(
    cam_dir: str | Path,
    masks: Iterable[tuple[str, np.ndarray]],
    thresholds: list[float],
    total: int | None = None,
    dataset: Dataset = VOC,
):
    """Sum the (T, L, L) confusions (L = the dataset's labels: 21 for VOC, 81 for COCO) of every (id, mask);
    raises naming missing or bad CAMs."""
    num_labels = dataset.num_labels
    total_conf = torch.zeros(len(thresholds), num_labels, num_labels, dtype=torch.long)
    missing: list[str] = []
    count = 0
    with ProgressBar("evaluate CAMs", total) as progress:
        for image_id, mask in masks:
            progress.advance()
            try:
                record = read_cam(
                    cam_dir, image_id, size=mask.shape, size_of="the mask", num_classes=dataset.num_classes
                )
            except CamStoreError as e:
                if not cam_path(cam_dir, image_id).exists():
                    missing.append(image_id)
                    continue
                raise EvaluationError(str(e)) from None
            try:
                total_conf += confusion_sweep(
                    torch.from_numpy(record.hr_cam),
                    torch.from_numpy(record.keys) + 1,
                    torch.from_numpy(mask),
                    thresholds,
                    num_labels,
                )
            except EvaluationError as e:
                raise EvaluationError(f"{shown_id(image_id)}: {e}") from None
            count += 1
    _raise_missing(missing, f"CAM files in {cam_dir}")
    return total_conf, count


def sweep_labels(
    label_dir: str | Path, masks: Iterable[tuple[str, np.ndarray]], total: int | None = None, dataset: Dataset = VOC
):
    """Sum the confusions (1, L, L) and undecided counts of PNG label maps ``{id}.png`` (L: the dataset's labels)."""
    num_labels = dataset.num_labels
    conf = torch.zeros(1, num_labels, num_labels, dtype=torch.long)
    undecided = torch.zeros(num_labels, dtype=torch.long)
    missing: list[str] = []
    count = 0
    with ProgressBar("evaluate labels", total) as progress:
        for image_id, mask in masks:
            progress.advance()
            path = Path(label_dir, file_name(image_id, ".png"))
            if not path.is_file():
                missing.append(image_id)
                continue
            label = shown_id(image_id)
            data = path.read_bytes()
            size = png_size(data)  # checked against the mask before anything is decoded
            if size is not None and size != tuple(mask.shape):
                raise EvaluationError(
                    f"{label}: label map {path} is {size[0]}x{size[1]} but the mask is {mask.shape[0]}x{mask.shape[1]}"
                )
            try:
                pred = decode_label_png(data)
            except ValueError as e:  # another format or mode (RGB, ...), above the pixel bound: the message says which
                raise EvaluationError(f"{label}: {path}: {e}") from None
            except Exception as e:  # not an image, a truncated file, ...
                raise EvaluationError(f"{label}: cannot read label map {path}: {type(e).__name__}: {e}") from None
            try:
                c, u = confusion_from_labels(torch.from_numpy(pred), torch.from_numpy(mask), num_labels)
            except EvaluationError as e:
                raise EvaluationError(f"{label}: {e}") from None
            conf[0] += c
            undecided += u
            count += 1
    _raise_missing(missing, f"label maps in {label_dir}")
    return conf, undecided, count


def _raise_missing(missing: list[str], what: str) -> None:
    if missing:
        shown = ", ".join(map(shown_id, missing[:20])) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise EvaluationError(f"{len(missing)} images with a mask have no {what}: {shown}")


def results_table(
    confusion: torch.Tensor, thresholds: list[float | None], undecided=None, dataset: Dataset = VOC
) -> pa.Table:
    """One row per (threshold, class): iou, fp_rate, fn_rate and the pixel counts."""
    rows: dict[str, list] = {
        k: []
        for k in (
            "threshold",
            "class_index",
            "class_name",
            "iou",
            "fp_rate",
            "fn_rate",
            "tp",
            "gt_pixels",
            "pred_pixels",
            "miou",
        )
    }
    means, ious = miou(confusion, undecided)
    fps, fns = error_rates(confusion, undecided)
    tp, gt_total, pred_total, _ = _rates(confusion, undecided)
    for i, t in enumerate(thresholds):
        for c, name in enumerate(dataset.label_names):
            rows["threshold"].append(t)
            rows["class_index"].append(c)
            rows["class_name"].append(name)
            rows["iou"].append(float(ious[i, c]))
            rows["fp_rate"].append(float(fps[i, c]))
            rows["fn_rate"].append(float(fns[i, c]))
            rows["tp"].append(int(tp[i, c]))
            rows["gt_pixels"].append(int(gt_total[i, c]))
            rows["pred_pixels"].append(int(pred_total[i, c]))
            rows["miou"].append(float(means[i]))
    return pa.table(
        rows,
        schema=pa.schema(
            [
                ("threshold", pa.float64()),
                ("class_index", pa.int32()),
                ("class_name", pa.string()),
                ("iou", pa.float64()),
                ("fp_rate", pa.float64()),
                ("fn_rate", pa.float64()),
                ("tp", pa.int64()),
                ("gt_pixels", pa.int64()),
                ("pred_pixels", pa.int64()),
                ("miou", pa.float64()),
            ]
        ),
    )


def summarize(
    confusion: torch.Tensor,
    thresholds: list[float | None],
    num_images: int,
    undecided=None,
    dataset: Dataset = VOC,
) -> dict:
    means, ious = miou(confusion, undecided)
    fps, fns = error_rates(confusion, undecided)
    best = int(torch.nan_to_num(means, nan=-1.0).argmax())

    def clean(v: float):  # JSON has no nan
        return None if math.isnan(v) else v

    names = dataset.label_names
    summary = {
        "dataset": dataset.name,
        "num_images": num_images,
        "best_threshold": thresholds[best],
        "best_miou": clean(float(means[best])),
        "per_class_iou": {name: clean(float(ious[best, c])) for c, name in enumerate(names)},
        "per_class_fp_rate": {name: clean(float(fps[best, c])) for c, name in enumerate(names)},
        "per_class_fn_rate": {name: clean(float(fns[best, c])) for c, name in enumerate(names)},
        "thresholds": thresholds,
        "miou_per_threshold": [clean(float(m)) for m in means],
    }
    if undecided is not None:
        scored = float(confusion[0].sum() + torch.as_tensor(undecided).sum())
        summary["undecided_fraction"] = float(torch.as_tensor(undecided).sum()) / scored if scored else 0.0
    return summary


def print_report(summary: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    thresholds = summary["thresholds"]
    if len(thresholds) > 1:
        sweep = Table(title="mIoU per threshold", caption=f"{summary['num_images']} images")
        sweep.add_column("threshold", justify="right")
        sweep.add_column("mIoU %", justify="right")
        for t, m in zip(thresholds, summary["miou_per_threshold"], strict=True):
            mark = "bold green" if t == summary["best_threshold"] else None
            sweep.add_row(f"{t:.2f}", "nan" if m is None else f"{100 * m:.2f}", style=mark)
        console.print(sweep)
    where = "" if summary["best_threshold"] is None else f" at threshold {summary['best_threshold']:.2f}"
    best = summary["best_miou"]
    per_class = Table(title=f"mIoU {'nan' if best is None else f'{100 * best:.2f}'} %{where}", min_width=48)
    for name in ("class", "IoU %", "FP %", "FN %"):
        per_class.add_column(name, justify="left" if name == "class" else "right")
    fmt = lambda v: "-" if v is None else f"{100 * v:.2f}"
    for name in summary["per_class_iou"]:
        per_class.add_row(
            name,
            fmt(summary["per_class_iou"][name]),
            fmt(summary["per_class_fp_rate"][name]),
            fmt(summary["per_class_fn_rate"][name]),
        )
    console.print(per_class)
    if "undecided_fraction" in summary:
        console.print(
            f"undecided (255) pixels in the label maps: {100 * summary['undecided_fraction']:.2f} % "
            "of scored pixels (counted as misses)"
        )


def write_results(out_dir: str | Path, table: pa.Table, summary: dict) -> None:
    """``eval.parquet`` and ``summary.json`` in ``out_dir`` (created if needed), each written atomically."""
    out = Path(out_dir)
    atomic_write(out / "eval.parquet", lambda f: pq.write_table(table, f))
    atomic_write_json(out / "summary.json", summary)


def _count_masks(shards: str) -> int | None:
    """Samples with a mask according to manifest.parquet beside the shards (for the progress bar only)."""
    try:
        from puzzlecam.data.shards import resolve_shards

        paths = resolve_shards(shards)
        manifest = pq.read_table(paths[0].parent / "manifest.parquet", columns=["shard", "has_mask"]).to_pylist()
        names = {p.name for p in paths}
        return sum(1 for row in manifest if row["has_mask"] and Path(row["shard"]).name in names)
    except Exception:  # no manifest: the bar has no total
        return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m puzzlecam.evaluate",
        description="Threshold-sweep mIoU of CAMs (or of PNG label maps) against the masks in shards. "
        "Every image with a mask is scored; a missing CAM or label map is an error naming the ids.",
    )
    p.add_argument("--cams", type=Path, help="CAM store directory ({id}.npz) written by puzzlecam.infer (mode cams)")
    p.add_argument(
        "--shards",
        required=True,
        help="webdataset shard pattern holding the masks, e.g. 'data/voc/train-{000000..000002}.tar'",
    )
    p.add_argument(
        "--mode",
        choices=("cams", "labels"),
        default="cams",
        help="cams: sweep thresholds over CAMs; labels: score PNG label maps (default: cams)",
    )
    p.add_argument(
        "--labels",
        type=Path,
        help="directory of {id}.png label maps (mode labels): 0 background, 1..20 classes, 255 undecided",
    )
    p.add_argument(
        "--thresholds",
        default=None,
        help=f"background thresholds: start:stop:step (stop included) or a comma list (default {DEFAULT_THRESHOLDS}; "
        f"{RW_DEFAULT_THRESHOLDS} for a random-walk store of puzzlecam.rw, whose maps are divided by one global max)",
    )
    p.add_argument(
        "--out", type=Path, help="write eval.parquet (one row per threshold and class) and summary.json here"
    )
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers decoding the shards (default 0)")
    return p


def run(args) -> None:
    if args.num_workers < 0:
        raise EvaluationError(f"--num-workers must be 0 or more, got {args.num_workers}")
    # A file in the way of --out is refused before the evaluation, not after it.
    with output_directory(args.out) if args.out is not None else nullcontext():
        _evaluate(args)


def _evaluate(args) -> None:
    dataset = of_shards(args.shards) or VOC  # the classes the masks label (the json of the shards names them)
    if args.mode == "cams":
        if args.cams is None:
            raise EvaluationError("--mode cams needs --cams DIR")
        if not args.cams.is_dir():
            raise EvaluationError(f"--cams {args.cams}: no such directory")
        thresholds = parse_thresholds(default_thresholds(args.cams) if args.thresholds is None else args.thresholds)
        conf, count = sweep_cams(
            args.cams, iter_masks(args.shards, args.num_workers), thresholds, _count_masks(args.shards), dataset
        )
        undecided, row_thresholds = None, thresholds
    else:
        if args.labels is None or not args.labels.is_dir():
            raise EvaluationError(f"--mode labels needs --labels DIR of PNG label maps (got {args.labels})")
        conf, undecided, count = sweep_labels(
            args.labels, iter_masks(args.shards, args.num_workers), _count_masks(args.shards), dataset
        )
        row_thresholds = [None]
    if count == 0:
        raise EvaluationError(f"no sample with a mask in --shards {args.shards}")
    summary = summarize(conf, row_thresholds, count, undecided, dataset)
    summary["mode"] = args.mode
    print_report(summary)
    if args.out is not None:
        write_results(args.out, results_table(conf, row_thresholds, undecided, dataset), summary)
        log.info("wrote %s and %s", args.out / "eval.parquet", args.out / "summary.json")


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
