"""``python -m puzzlecam.data {shard,synth,label-shards}``: convert VOC/SBD or MS COCO to shards; generate a
synthetic VOC- or COCO-format set; add label maps (affinity labels, pseudo-labels) to training shards (docs/data.md).

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
from puzzlecam.datasets import COCO
from puzzlecam.utils.cli import run_command

if TYPE_CHECKING:  # the commands import their modules (pyarrow, PIL) only when they run
    from puzzlecam.data.label_shards import LabelShardResult
    from puzzlecam.data.shard import ShardResult
    from puzzlecam.data.synth import SynthResult
    from puzzlecam.data.synth_coco import SynthCocoResult

VOC_SPLITS = ("train", "val", "trainval", "train_aug", "test")
VOC_ONLY = ("sbd_root", "aug_masks", "list_file")
COCO_ONLY = ("clip_outside",)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that runs ``check(parser, namespace)`` after parsing: checks between flags that argparse
    cannot express, reported like argparse's own (usage line, ``error: ...``, exit 2)."""

    def __init__(self, *args, check=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.check = check

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if self.check is not None:
            self.check(self, namespace)
        return namespace, extras


def _flag(dest: str) -> str:
    return "--list" if dest == "list_file" else "--" + dest.replace("_", "-")


def _check_shard(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """VOC or COCO: the flags of the other one are refused; a VOC --split must be a named split."""
    if args.coco_images is not None:
        if args.coco_annotations is None:
            parser.error("argument --coco-images: needs --coco-annotations FILE")
        for dest in VOC_ONLY:
            if getattr(args, dest) is not None:
                parser.error(f"argument {_flag(dest)}: not allowed with argument --coco-images")
        return
    if args.coco_annotations is not None:
        parser.error("argument --coco-annotations: needs --coco-images DIR")
    for dest in COCO_ONLY:
        if getattr(args, dest) not in (None, False):
            parser.error(f"argument {_flag(dest)}: only with --coco-images")
    if args.split is not None and args.split not in VOC_SPLITS:
        choices = ", ".join(repr(c) for c in VOC_SPLITS)
        parser.error(f"argument --split: invalid choice: {args.split!r} (choose from {choices})")


def _check_synth(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.format == "coco" and args.layout is not None:
        parser.error("argument --layout: only with --format voc")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m puzzlecam.data", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="{shard,synth,label-shards}", parser_class=_Parser)

    s = sub.add_parser(
        "shard",
        check=_check_shard,
        help="convert VOC (+ SBD, + SegmentationClassAug) or MS COCO into tar shards + manifest.parquet",
        description="Write {split}-{index:06d}.tar webdataset shards (jpg = original bytes, json = id/labels/"
        "height/width, seg.png = VOC-palette mask) and manifest.parquet into --out. VOC (--voc-root): labels come "
        "from the Annotations XML (every object of the 20 classes, difficult included; parts ignored); masks: "
        "VOC SegmentationClass, else --aug-masks, else SBD cls/*.mat. MS COCO (--coco-images, --coco-annotations): "
        "the 80 categories in id order are labels 0..79; labels = every category annotated in the image (crowd "
        "included); masks 0..80 painted in annotation order as pycocotools renders them, crowd regions 255; images "
        "without annotations are left out and counted. Output is written under temporary names and renamed at "
        "the end; the same input gives byte-identical shards.",
    )
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--voc-root",
        metavar="DIR",
        help="VOCdevkit/VOC2012 (JPEGImages, Annotations, SegmentationClass, ImageSets)",
    )
    source.add_argument(
        "--coco-images",
        metavar="DIR",
        help="MS COCO: the folder of the split's images (e.g. train2014/); needs --coco-annotations",
    )
    s.add_argument(
        "--coco-annotations",
        metavar="FILE",
        help="MS COCO: the split's instances file (e.g. annotations/instances_train2014.json; '{split}' in it is "
        "replaced by --split); without --split the split is named after it (instances_NAME.json -> NAME)",
    )
    s.add_argument(
        "--sbd-root", help="SBD benchmark_RELEASE/dataset (img, cls/*.mat, train.txt, val.txt); needed for train_aug"
    )
    s.add_argument("--aug-masks", help="a SegmentationClassAug folder of index PNGs, used where VOC has no mask")
    s.add_argument(
        "--split",
        metavar="NAME",
        help="VOC: a named split, one of train, val, trainval, train_aug, test (VOC ImageSets/Segmentation lists; "
        "train_aug = VOC train + SBD train + SBD val - VOC val, 10,582 ids); with --list, only names the shards. "
        "MS COCO: any name of letters, digits and '_' (e.g. train2014); it names the shards",
    )
    s.add_argument(
        "--list",
        dest="list_file",
        metavar="FILE",
        help="VOC: shard the ids in FILE instead (one per line; 'path/ID.jpg ...' lines work too); "
        "the split name defaults to the file's stem; masks are optional",
    )
    s.add_argument("--out", required=True, help="output directory (created if needed)")
    s.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    s.add_argument("--overwrite", action="store_true", help="replace this split's existing shards and manifest rows")
    s.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="missing/unreadable JPEG, XML or mask (COCO: a bad annotation or image entry, a missing or "
        "unreadable image): 'fail' (default) writes nothing and exits 2; 'skip' leaves the image out with a warning",
    )
    s.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="read, check and decode the images (COCO: and render the masks) in N processes (default 1); the "
        "shards are byte-identical for any N",
    )
    s.add_argument(
        "--clip-outside",
        action="store_true",
        help="MS COCO: accept polygon points outside the image and render them clipped, as pycocotools does "
        "(default: such an annotation is bad input, named with its image)",
    )

    g = sub.add_parser(
        "synth",
        check=_check_synth,
        help="generate a procedural VOC- or COCO-format data set with exact masks",
        description="Write a VOC-format folder (JPEGImages, Annotations, SegmentationClass, ImageSets/Segmentation/"
        "{train,val,trainval}.txt) of scenes with 1-3 objects (--layout); each class is a body shape/colour with a "
        "small distinctive pattern part. Deterministic for a seed; `shard --voc-root DIR` accepts it unchanged. "
        "--format coco writes an MS COCO 2014-format folder instead (train2014/, val2014/, "
        "annotations/instances_{train2014,val2014}.json; all 80 categories with their real ids; polygons, RLE "
        "compressed and uncompressed, crowd regions, some images without annotations) for `shard --coco-images`.",
    )
    g.add_argument(
        "--format",
        choices=("voc", "coco"),
        default="voc",
        help="voc (default): a VOC-format folder; coco: an MS COCO-format folder",
    )
    g.add_argument("--out", required=True, help="output folder (written under a temporary name, then renamed)")
    g.add_argument("--num-images", type=int, required=True, help="number of images")
    g.add_argument("--size", type=int, default=160, help="long side of every image in pixels (default 160)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument(
        "--classes",
        default=None,
        help="comma-separated class names to use: VOC's (default: aeroplane,bird,boat,car,cat,dog,person,train), "
        "with --format coco COCO's (default: all 80)",
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.25,
        help="fraction of images listed in val.txt (with --format coco: put in val2014) (default 0.25)",
    )
    g.add_argument(
        "--layout",
        default=None,
        help="objects per image and their size as a fraction of the short side, MIN-MAX:MINSCALE-MAXSCALE "
        "(default 1-3:0.3-0.6; another layout makes a different set of the same classes, e.g. for pretraining; "
        "--format voc only)",
    )
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")

    ls = sub.add_parser(
        "label-shards",
        help="copy training shards adding each image's label map (label.png) for stages 2 and 3",
        description="For every input shard NAME write --out/NAME: each sample's jpg (unchanged bytes), json and "
        "seg.png plus its label map from --labels as label.png (the training loader's batch['label']). Every "
        "label is checked first (present, the image's size, values 0..C and 255, C the shards' classes: VOC 20, "
        "COCO 80); any problem fails naming the ids and writes nothing. Shards are written atomically and "
        "byte-identically for the same input; a rerun keeps the output shards already finished (an interrupted "
        "run resumes).",
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
        "0 background, 1..C classes, 255 ignored; ids named as the CAM store names files)",
    )
    ls.add_argument("--out", required=True, help="output directory for the labelled shards (the input shards' names)")
    ls.add_argument(
        "--overwrite",
        action="store_true",
        help="rewrite every output shard (after the label maps changed), replacing any file under its name",
    )
    return p


def print_shard_report(console: Console, result: ShardResult) -> None:
    """What ``shard`` wrote: counts and the images per class (VOC: 2 columns of classes, COCO: 3)."""
    rows = result.rows
    coco = getattr(result, "dataset", "voc") == "coco"
    classes = COCO.classes if coco else VOC_CLASSES
    counts = [0] * len(classes)
    for r in rows:
        for c in r["labels"]:
            counts[c] += 1
    console.print(
        f"{result.split}: wrote {len(rows)} images in {len(result.shards)} shard(s) to {result.out}", highlight=False
    )
    columns = 3 if coco else 2
    table = Table(show_edge=False)
    for _ in range(columns):
        table.add_column("class")
        table.add_column("images", justify="right")
    height = (len(classes) + columns - 1) // columns
    for i in range(height):
        cells = []
        for k in range(i, i + columns * height, height):
            cells += [classes[k], str(counts[k])] if k < len(classes) else ["", ""]
        table.add_row(*cells)
    console.print(table)
    if coco:
        console.print(
            f"images: {len(rows)}   without annotations (left out): {len(result.without_annotations)}   "
            f"skipped: {result.skipped_images}",
            highlight=False,
        )
        return
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


def print_synth_coco_report(console: Console, result: SynthCocoResult) -> None:
    """What ``synth --format coco`` wrote: image counts per split and the classes."""
    counts = ", ".join(f"{len(keys)} {split}" for split, keys in result.splits.items())
    console.print(
        f"wrote {sum(len(k) for k in result.splits.values())} images ({counts}; "
        f"{len(result.without_annotations)} without annotations) of {len(result.classes)} COCO classes to "
        f"{result.out} (annotations/instances_{{{','.join(result.splits)}}}.json)",
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
    if args.command == "shard" and args.coco_images is not None:
        from puzzlecam.data.coco import shard_coco

        result = shard_coco(
            args.coco_images,
            args.coco_annotations,
            out=args.out,
            split=args.split,
            shard_size=args.shard_size,
            overwrite=args.overwrite,
            on_error=args.on_error,
            workers=args.workers,
            clip_outside=args.clip_outside,
        )
        print_shard_report(console, result)
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
            workers=args.workers,
        )
        print_shard_report(console, result)
        return
    common = dict(
        num_images=args.num_images,
        size=args.size,
        seed=args.seed,
        val_fraction=args.val_fraction,
        overwrite=args.overwrite,
    )
    if args.format == "coco":
        from puzzlecam.data.synth_coco import synthesize_coco

        result = synthesize_coco(args.out, classes=_class_list(args.classes, COCO.classes), **common)
        print_synth_coco_report(console, result)
        return
    from puzzlecam.data.synth import DEFAULT_CLASSES, parse_layout, synthesize

    layout = parse_layout(args.layout or "1-3:0.3-0.6")
    result = synthesize(args.out, classes=_class_list(args.classes, DEFAULT_CLASSES), layout=layout, **common)
    print_synth_report(console, result)


def _class_list(text: str | None, default) -> list[str]:
    """``--classes`` "a,b" as a list of names (the default's when not given)."""
    return [c.strip() for c in text.split(",") if c.strip()] if text else list(default)


def main(argv=None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
