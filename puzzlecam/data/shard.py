"""``python -m puzzlecam.data shard``: VOC (+ SBD, + SegmentationClassAug) -> tar shards + manifest.

Per sample (design.md §5): ``jpg`` = the original JPEG's bytes (never re-encoded), ``json`` = {id,
labels (class indices from the Annotations XML), height, width}, ``seg.png`` = the mask as a P-mode
PNG with the VOC palette (pixel values = class indices, 255 void) where the image has one.

Two passes: every input path is checked first (a missing file fails before any work), then every
image is decoded and checked while the shards are written under temporary names. With
``--on-error fail`` any problem removes the temporaries and nothing final is written; with ``skip``
bad images are left out and counted. The shards and ``manifest.parquet`` are renamed into place
at the end; the manifest keeps the rows of other splits written to the same directory.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from puzzlecam import VOC_CLASSES
from puzzlecam.data.shards import ShardWriter
from puzzlecam.data.voc import (
    DataError,
    VocSources,
    check_mask_values,
    encode_mask_png,
    parse_annotation,
    read_id_list,
    read_mask,
)

SPLITS = ("train", "val", "trainval", "train_aug", "test")
# Named splits whose every image must have a mask; --list and test may have images without one.
MASKED_SPLITS = ("train", "val", "trainval", "train_aug")
MANIFEST = "manifest.parquet"
MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("shard", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("labels", pa.list_(pa.int8())),
        ("has_mask", pa.bool_()),
    ]
)


@dataclass
class Problem:
    image_id: str
    path: Path | None
    what: str

    def __str__(self):
        return f"{self.image_id}: {self.what}" + (f" ({self.path})" if self.path else "")


def _existing_output(out: Path, split: str) -> list[str]:
    found = sorted(p.name for p in out.glob(f"{split}-*.tar"))
    manifest = out / MANIFEST
    if manifest.is_file():
        splits = set(pq.read_table(manifest, columns=["split"]).column("split").to_pylist())
        if split in splits:
            found.append(f"{MANIFEST} (rows of split {split!r})")
    return found


def _check_paths(src: VocSources, ids: list[str], split: str, need_xml: bool, need_mask: bool):
    """Pass 1: each id's (jpeg, xml, mask) paths; missing files become Problems."""
    plans, problems = [], []
    for image_id in ids:
        jpeg, xml, mask = src.jpeg_path(image_id), src.xml_path(image_id), src.mask_path(image_id)
        bad = []
        if not jpeg.is_file():
            bad.append(Problem(image_id, jpeg, "JPEG missing"))
        if need_xml and not xml.is_file():
            bad.append(Problem(image_id, xml, "Annotations XML missing"))
        if need_mask and mask is None:
            where = (
                "SegmentationClass" + (", SegmentationClassAug" if src.aug else "") + (", SBD cls" if src.sbd else "")
            )
            bad.append(Problem(image_id, None, f"no mask in {where} (split {split!r} needs one)"))
        problems += bad
        if not bad:
            plans.append((image_id, jpeg, xml if xml.is_file() else None, mask))
    return plans, problems


def _read_sample(image_id: str, jpeg: Path, xml: Path | None, mask_path: Path | None):
    """Pass 2: decode and check one image; returns (members, meta) or raises Problem-worthy errors."""
    current = jpeg
    try:
        jpg = jpeg.read_bytes()
        with Image.open(io.BytesIO(jpg)) as img:
            if img.format != "JPEG":
                raise ValueError(f"not a JPEG file ({img.format})")
            img.load()  # a full decode catches truncated files
            width, height = img.size
        labels: list[int] = []
        if xml is not None:
            current = xml
            labels = parse_annotation(xml.read_bytes())
        members = {"jpg": jpg}
        if mask_path is not None:
            current = mask_path
            mask = read_mask(mask_path)
            if mask.shape != (height, width):
                raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]}, image is {width}x{height}")
            check_mask_values(mask)
            members["seg.png"] = encode_mask_png(mask)
        meta = {"id": image_id, "labels": labels, "height": height, "width": width}
        members["json"] = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
        return members, meta
    except Exception as e:
        raise _SampleFailed(Problem(image_id, current, f"unreadable: {type(e).__name__}: {e}")) from None


class _SampleFailed(Exception):
    def __init__(self, problem: Problem):
        self.problem = problem


def _report_problems(console: Console, problems: list[Problem], limit: int = 20) -> None:
    for p in problems[:limit]:
        console.print(f"  [red]{p}[/red]", highlight=False)
    if len(problems) > limit:
        console.print(f"  ... and {len(problems) - limit} more")


def _write_manifest(out: Path, split: str, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    path = out / MANIFEST
    if path.is_file():  # keep the other splits' rows
        old = pq.read_table(path).cast(MANIFEST_SCHEMA)
        keep = old.filter(pc.not_equal(old.column("split"), split))
        table = pa.concat_tables([keep, table])
    tmp = out / f".{MANIFEST}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def shard_dataset(
    voc_root,
    *,
    out,
    split=None,
    list_file=None,
    sbd_root=None,
    aug_masks=None,
    shard_size=1000,
    overwrite=False,
    on_error="fail",
    console: Console | None = None,
) -> int:
    """Write the shards; returns a process exit status (0 ok, 1 bad input or refused output)."""
    console = console or Console(stderr=True)
    out = Path(out)
    try:
        src = VocSources(voc_root, sbd_root, aug_masks)
        if list_file is not None:
            ids = sorted(set(read_id_list(Path(list_file))))
            split = split or Path(list_file).stem
        elif split is not None:
            ids = src.split_ids(split)
        else:
            raise DataError("give --split or --list")
    except (DataError, OSError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        return 1
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        console.print(
            f"[red]error:[/red] split name {split!r} may hold only letters, digits and '_' "
            "(it names the shards); pass --split NAME",
            highlight=False,
        )
        return 1
    if not ids:
        console.print(f"[red]error:[/red] split {split!r} lists no image ids", highlight=False)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    existing = _existing_output(out, split)
    if existing and not overwrite:
        console.print(
            f"[red]error:[/red] {out} already holds output for split {split!r}: "
            f"{', '.join(existing[:4])}{' ...' if len(existing) > 4 else ''}; pass --overwrite to replace it",
            highlight=False,
        )
        return 1

    need_mask = list_file is None and split in MASKED_SPLITS
    plans, problems = _check_paths(src, ids, split, need_xml=split != "test", need_mask=need_mask)
    if problems and on_error == "fail":
        console.print(
            f"[red]error:[/red] {len(problems)} missing input file(s); nothing was written "
            "(--on-error skip leaves these images out):",
            highlight=False,
        )
        _report_problems(console, problems)
        return 1

    writer = ShardWriter(out, split, shard_size)
    rows = []
    try:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(f"sharding {split}", total=len(plans))
            for image_id, jpeg, xml, mask in plans:
                try:
                    members, meta = _read_sample(image_id, jpeg, xml, mask)
                except _SampleFailed as e:
                    problems.append(e.problem)
                    progress.advance(task)
                    continue
                shard = writer.add(image_id, members)
                rows.append(
                    {
                        "id": image_id,
                        "split": split,
                        "shard": shard,
                        "height": meta["height"],
                        "width": meta["width"],
                        "labels": meta["labels"],
                        "has_mask": "seg.png" in members,
                    }
                )
                progress.advance(task)
        if problems and on_error == "fail":
            writer.abort()
            console.print(f"[red]error:[/red] {len(problems)} bad input file(s); nothing was written:", highlight=False)
            _report_problems(console, problems)
            return 1
        if not rows:
            writer.abort()
            console.print(f"[red]error:[/red] no image of split {split!r} could be read", highlight=False)
            return 1
        shards = writer.commit()
    except BaseException:
        writer.abort()
        raise
    keep = {p.name for p in shards}
    for stale in out.glob(f"{split}-*.tar"):  # from an earlier, larger run (--overwrite)
        if stale.name not in keep:
            stale.unlink()
    _write_manifest(out, split, rows)
    _print_summary(console, out, split, rows, shards, problems)
    return 0


def _print_summary(console, out, split, rows, shards, problems) -> None:
    counts = [0] * len(VOC_CLASSES)
    for r in rows:
        for c in r["labels"]:
            counts[c] += 1
    console.print(f"{split}: wrote {len(rows)} images in {len(shards)} shard(s) to {out}", highlight=False)
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
        f"without labels: {sum(not r['labels'] for r in rows)}",
        highlight=False,
    )
    if problems:
        console.print(f"[yellow]skipped {len(problems)} image(s) with bad input:[/yellow]", highlight=False)
        _report_problems(console, problems)
