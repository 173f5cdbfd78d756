"""``python -m puzzlecam.data {shard,synth}``: convert VOC/SBD to shards; generate a synthetic VOC set."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m puzzlecam.data", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="{shard,synth}")

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
        help="missing/unreadable JPEG, XML or mask: 'fail' (default) writes nothing; 'skip' leaves the image out",
    )

    g = sub.add_parser(
        "synth",
        help="generate a procedural VOC-format data set with exact masks",
        description="Write a VOC-format folder (JPEGImages, Annotations, SegmentationClass, ImageSets/Segmentation/"
        "{train,val,trainval}.txt) of scenes with 1-3 objects; each class is a body shape/colour with a small "
        "distinctive pattern part. Deterministic for a seed; `shard --voc-root DIR` accepts it unchanged.",
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
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    if args.command == "shard":
        from puzzlecam.data.shard import shard_dataset

        if args.shard_size < 1:
            console.print("[red]error:[/red] --shard-size must be >= 1")
            return 2
        return shard_dataset(
            args.voc_root,
            out=args.out,
            split=args.split,
            list_file=args.list_file,
            sbd_root=args.sbd_root,
            aug_masks=args.aug_masks,
            shard_size=args.shard_size,
            overwrite=args.overwrite,
            on_error=args.on_error,
            console=console,
        )
    from puzzlecam.data.synth import DEFAULT_CLASSES, synthesize

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else list(DEFAULT_CLASSES)
    return synthesize(
        args.out,
        num_images=args.num_images,
        size=args.size,
        seed=args.seed,
        classes=classes,
        val_fraction=args.val_fraction,
        overwrite=args.overwrite,
        console=console,
    )


if __name__ == "__main__":
    sys.exit(main())
