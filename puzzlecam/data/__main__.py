"""``python -m puzzlecam.data {shard,synth,label-shards}``: convert VOC/SBD to shards; generate a synthetic VOC
set; add label maps (affinity labels, pseudo-labels) to training shards (docs/data.md).

The report (what was written, the class table) goes to stdout; log lines and errors to stderr.
Exit status: 0 done, 2 bad flags or input (nothing final written), 1 a failed run (e.g. a full disk).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from puzzlecam import VOC_CLASSES
from puzzlecam.utils.cli import run_command

if TYPE_CHECKING:  # the commands import their modules (pyarrow, PIL) only when they run
    from puzzlecam.data.label_shards import LabelShardResult
    from puzzlecam.data.shard import ShardResult
    from puzzlecam.data.synth import SynthResult


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m puzzlecam.data", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="{shard,synth,label-shards}")

    s = sub.add_parser(
        "shard",
        help="convert VOC (+ SBD, + SegmentationClassAug) into tar shards + manifest.parquet",
        description="Write {split}-{index:06d}.tar webdataset shards (jpg = original bytes, json = id/labels/"
        "height/width, seg.png = VOC-palette mask) and manifest.parquet into --out. Labels come from the "
        "Annotations XML (every object of the 20 classes, difficult included; parts ignored). Masks: "
        "VOC SegmentationClass, else --aug-masks, else SBD cls/*.mat. Output is written under temporary names "
        "and renamed at the end; the same input gives byte-identical shards.",
    )
    s.add_argument(
        "--voc-root", required=True, help="VOCdevkit/VOC2012 (JPEGImages, Annotations, SegmentationClass, ImageSets)"
    )
    s.add_argument(
        "--sbd-root", help="SBD benchmark_RELEASE/dataset (img, cls/*.mat, train.txt, val.txt); needed for train_aug"
    )
    s.add_argument("--aug-masks", help="a SegmentationClassAug folder of index PNGs, used where VOC has no mask")
    s.add_argument(
        "--split",
        choices=("train", "val", "trainval", "train_aug", "test"),
        help="named split: VOC ImageSets/Segmentation lists; train_aug = VOC train + SBD train + SBD val "
        "- VOC val (10,582 ids); with --list, only names the shards",
    )
    s.add_argument(
        "--list",
        dest="list_file",
        metavar="FILE",
        help="shard the ids in FILE instead (one per line; 'path/ID.jpg ...' lines work too); "
        "the split name defaults to the file's stem; masks are optional",
    )
    s.add_argument("--out", required=True, help="output directory (created if needed)")
    s.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    s.add_argument("--overwrite", action="store_true", help="replace this split's existing shards and manifest rows")
    s.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="missing/unreadable JPEG, XML or mask: 'fail' (default) writes nothing and exits 2; "
        "'skip' leaves the image out with a warning",
    )

    g = sub.add_parser(
        "synth",
        help="generate a procedural VOC-format data set with exact masks",
        description="Write a VOC-format folder (JPEGImages, Annotations, SegmentationClass, ImageSets/Segmentation/"
        "{train,val,trainval}.txt) of scenes with 1-3 objects (--layout); each class is a body shape/colour with a "
        "small distinctive pattern part. Deterministic for a seed; `shard --voc-root DIR` accepts it unchanged.",
    )
    g.add_argument("--out", required=True, help="output folder (written under a temporary name, then renamed)")
    g.add_argument("--num-images", type=int, required=True, help="number of images")
    g.add_argument("--size", type=int, default=160, help="long side of every image in pixels (default 160)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument(
        "--classes",
        default=None,
        help="comma-separated VOC class names to use (default: aeroplane,bird,boat,car,cat,dog,person,train)",
    )
    g.add_argument(
        "--val-fraction", type=float, default=0.25, help="fraction of images listed in val.txt (default 0.25)"
    )
    g.add_argument(
        "--layout",
        default="1-3:0.3-0.6",
        help="objects per image and their size as a fraction of the short side, MIN-MAX:MINSCALE-MAXSCALE "
        "(default 1-3:0.3-0.6; another layout makes a different set of the same classes, e.g. for pretraining)",
    )
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")

    ls = sub.add_parser(
        "label-shards",
        help="copy training shards adding each image's label map (label.png) for stages 2 and 3",
        description="For every input shard NAME write --out/NAME: each sample's jpg (unchanged bytes), json and "
        "seg.png plus its label map from --labels as label.png (the training loader's batch['label']). Every "
        "label is checked first (present, the image's size, values 0..20 and 255); any problem fails naming the "
        "ids and writes nothing. Shards are written atomically and byte-identically for the same input; a rerun "
        "keeps the output shards already finished (an interrupted run resumes).",
    )
    ls.add_argument(
        "--shards",
        required=True,
        help="input shards: a brace/glob pattern, e.g. 'data/shards/train_aug-*.tar', or a directory",
    )
    ls.add_argument(
        "--labels",
        required=True,
        help="directory of label maps {id}.png written by python -m puzzlecam.labels (palette or grayscale PNGs, "
        "0 background, 1..20 classes, 255 ignored; ids named as the CAM store names files)",
    )
    ls.add_argument("--out", required=True, help="output directory for the labelled shards (the input shards' names)")
    ls.add_argument(
        "--overwrite",
        action="store_true",
        help="rewrite every output shard (after the label maps changed), replacing any file under its name",
    )
    return p


def print_shard_report(console: Console, result: ShardResult) -> None:
    """What ``shard`` wrote: counts and the images per class."""
    rows = result.rows
    counts = [0] * len(VOC_CLASSES)
    for r in rows:
        for c in r["labels"]:
            counts[c] += 1
    console.print(
        f"{result.split}: wrote {len(rows)} images in {len(result.shards)} shard(s) to {result.out}", highlight=False
    )
    table = Table(show_edge=False)
    for _ in range(2):
        table.add_column("class")
        table.add_column("images", justify="right")
    half = (len(VOC_CLASSES) + 1) // 2
    for i in range(half):
        right = [VOC_CLASSES[i + half], str(counts[i + half])] if i + half < len(VOC_CLASSES) else ["", ""]
        table.add_row(VOC_CLASSES[i], str(counts[i]), *right)
    console.print(table)
    console.print(
        f"images: {len(rows)}   with masks: {sum(r['has_mask'] for r in rows)}   "
        f"without labels: {sum(not r['labels'] for r in rows)}   skipped: {len(result.skipped)}",
        highlight=False,
    )


def print_synth_report(console: Console, result: SynthResult) -> None:
    """What ``synth`` wrote: image counts and classes."""
    splits = result.splits
    console.print(
        f"wrote {len(splits['trainval'])} images ({len(splits['train'])} train, {len(splits['val'])} val) of "
        f"{len(result.classes)} classes ({', '.join(VOC_CLASSES[c] for c in result.classes)}) to {result.out}",
        highlight=False,
    )


def print_label_shards_report(console: Console, result: LabelShardResult) -> None:
    """What ``label-shards`` wrote: shards written now and kept from an earlier run."""
    console.print(
        f"wrote {len(result.written)} labelled shard(s), kept {len(result.kept)} finished one(s): "
        f"{result.samples} images with label.png in {result.out}",
        highlight=False,
    )


def run(args: argparse.Namespace) -> None:
    console = Console()
    if args.command == "label-shards":
        from puzzlecam.data.label_shards import label_shards

        print_label_shards_report(console, label_shards(args.shards, args.labels, args.out, overwrite=args.overwrite))
        return
    if args.command == "shard":
        from puzzlecam.data.shard import shard_dataset

        result = shard_dataset(
            args.voc_root,
            out=args.out,
            split=args.split,
            list_file=args.list_file,
            sbd_root=args.sbd_root,
            aug_masks=args.aug_masks,
            shard_size=args.shard_size,
            overwrite=args.overwrite,
            on_error=args.on_error,
        )
        print_shard_report(console, result)
        return
    from puzzlecam.data.synth import DEFAULT_CLASSES, parse_layout, synthesize

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else list(DEFAULT_CLASSES)
    result = synthesize(
        args.out,
        num_images=args.num_images,
        size=args.size,
        seed=args.seed,
        classes=classes,
        val_fraction=args.val_fraction,
        overwrite=args.overwrite,
        layout=parse_layout(args.layout),
    )
    print_synth_report(console, result)


def main(argv=None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
