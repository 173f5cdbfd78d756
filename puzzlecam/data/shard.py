"""``python -m puzzlecam.data shard``: VOC (+ SBD, + SegmentationClassAug) -> tar shards + manifest.

Per sample (docs/data.md): ``jpg`` = the original JPEG's bytes (never re-encoded), ``json`` = {id,
labels (class indices from the Annotations XML), height, width}, ``seg.png`` = the mask as a P-mode
PNG with the VOC palette (pixel values = class indices, 255 void) where the image has one.

Two passes: every input path is checked first (a missing file fails before any work), then every
image is decoded and checked (in ``workers`` processes when asked: :mod:`puzzlecam.data.parallel`; one writer
takes the results in id order, so the shards are byte-identical for any number) while the shards are
written under temporary names. With
``--on-error fail`` any problem removes the temporaries, nothing final is written and a
:class:`~puzzlecam.errors.DataError` lists the problems; with ``skip`` bad images are left out, each
logged as a warning. The shards and ``manifest.parquet`` are renamed into place at the end, once
all of them are on disk (a full or read-only disk is one :class:`~puzzlecam.errors.DiskError` and
leaves the directory as it was); the manifest keeps the rows of other splits written to the same directory.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from puzzlecam.data.parallel import OrderedPool
from puzzlecam.data.shards import ImageTooLarge, ShardWriter, open_image
from puzzlecam.data.voc import VocSources, check_mask_values, parse_annotation, read_id_list, read_mask
from puzzlecam.errors import DataError, UsageError
from puzzlecam.utils.files import atomic_write
from puzzlecam.utils.labelmap import encode_label_png
from puzzlecam.utils.progress import ProgressBar

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "trainval", "train_aug", "test")
# Named splits whose every image must have a mask; --list and test may have images without one.
MASKED_SPLITS = ("train", "val", "trainval", "train_aug")
ON_ERROR = ("fail", "skip")
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
# Problems listed in an error message; the rest are counted.
LISTED_PROBLEMS = 20


@dataclass
class Problem:
    """One bad input of one image: its id, the file (when there is one) and what is wrong."""

    image_id: str
    path: Path | None
    what: str

    def __str__(self):
        return f"{self.image_id}: {self.what}" + (f" ({self.path})" if self.path else "")


def check_shard_flags(shard_size: int, on_error: str, workers: int) -> None:
    """The flags every converter shares: ``--shard-size``, ``--on-error`` and ``--workers``."""
    if shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {shard_size}")
    if on_error not in ON_ERROR:
        raise UsageError(f"--on-error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")


class SplitOutput:
    """One split's shards and manifest rows, written all or nothing (the VOC and COCO converters share it).

    Creating it refuses an ``out`` that already holds the split unless ``overwrite``. Used as a context
    manager: :meth:`add` writes samples under temporary names, :meth:`commit` puts everything in place, and
    leaving the block on an exception before that removes every temporary.
    """

    def __init__(self, out: Path, split: str, shard_size: int, overwrite: bool):
        out.mkdir(parents=True, exist_ok=True)
        existing = sorted(p.name for p in out.glob(f"{split}-*.tar"))
        manifest = out / MANIFEST
        if manifest.is_file():
            splits = set(pq.read_table(manifest, columns=["split"]).column("split").to_pylist())
            if split in splits:
                existing.append(f"{MANIFEST} (rows of split {split!r})")
        if existing and not overwrite:
            raise UsageError(
                f"--out {out} already holds output for split {split!r}: "
                f"{', '.join(existing[:4])}{' ...' if len(existing) > 4 else ''}; pass --overwrite to replace it"
            )
        self.out, self.split = out, split
        self.writer = ShardWriter(out, split, shard_size)
        self.rows: list[dict] = []
        self._committed = False

    def add(self, key: str, members: dict[str, bytes], meta: dict) -> None:
        """Write one sample and its manifest row (``meta``: height, width, labels)."""
        shard = self.writer.add(key, members)
        self.rows.append(
            {
                "id": key,
                "split": self.split,
                "shard": shard,
                "height": meta["height"],
                "width": meta["width"],
                "labels": meta["labels"],
                "has_mask": "seg.png" in members,
            }
        )

    def commit(self) -> list[Path]:
        """Put the shards and the manifest in place; returns the shards. Shards of an earlier, larger run
        of the split (--overwrite) are removed."""
        # Everything that takes room is on disk before anything is renamed: a full disk leaves the
        # directory as it was. The manifest goes first; renaming the shards after it takes no room.
        self.writer.close()
        _write_manifest(self.out, self.split, self.rows)
        shards = self.writer.commit()
        self._committed = True
        remove_stale_shards(self.out, self.split, shards)
        return shards

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and not self._committed:
            self.writer.abort()
        return False


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
        with open_image(jpg) as img:
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
            if mask_path.suffix == ".png":  # its header first: a forged size is never decoded
                with open_image(mask_path.read_bytes()) as header:
                    _check_mask_size(header.size, width, height)
            mask = read_mask(mask_path)
            _check_mask_size(mask.shape[::-1], width, height)
            check_mask_values(mask)
            members["seg.png"] = encode_label_png(mask)
        meta = {"id": image_id, "labels": labels, "height": height, "width": width}
        members["json"] = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
        return members, meta
    except ImageTooLarge as e:
        raise _SampleFailed(Problem(image_id, current, str(e))) from None
    except Exception as e:
        raise _SampleFailed(Problem(image_id, current, f"unreadable: {type(e).__name__}: {e}")) from None


def _check_mask_size(size: tuple[int, int], width: int, height: int) -> None:
    if tuple(size) != (width, height):
        raise ValueError(f"mask is {size[0]}x{size[1]}, image is {width}x{height}")


class _SampleFailed(Exception):
    def __init__(self, problem: Problem):
        self.problem = problem


def _convert_plan(plan: tuple) -> tuple[dict[str, bytes], dict] | Problem:
    """Pass 2 of one image, for :class:`~puzzlecam.data.parallel.OrderedPool`: its (members, meta) or its
    Problem (a result, not an exception, so that every image's outcome comes back from the workers)."""
    try:
        return _read_sample(*plan)
    except _SampleFailed as e:
        return e.problem


def problem_listing(problems: list[Problem]) -> str:
    """The first :data:`LISTED_PROBLEMS` problems, one per line, and a count of the rest."""
    lines = [f"  {p}" for p in problems[:LISTED_PROBLEMS]]
    if len(problems) > LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - LISTED_PROBLEMS} more")
    return "\n".join(lines)


def _write_manifest(out: Path, split: str, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    path = out / MANIFEST
    if path.is_file():  # keep the other splits' rows
        old = pq.read_table(path).cast(MANIFEST_SCHEMA)
        keep = old.filter(pc.not_equal(old.column("split"), split))
        table = pa.concat_tables([keep, table])
    atomic_write(path, lambda f: pq.write_table(table, f))


@dataclass
class ShardResult:
    """What :func:`shard_dataset` wrote: the split's shards, its manifest rows and the images it left out."""

    out: Path
    split: str
    shards: list[Path]
    rows: list[dict]
    skipped: list[Problem] = field(default_factory=list)


def _select_ids(src: VocSources, voc_root, split: str | None, list_file) -> tuple[str, list[str]]:
    """(split name, sorted unique ids) from ``--list`` or a named ``--split``."""
    if list_file is not None:
        list_file = Path(list_file)
        if not list_file.is_file():
            raise DataError(f"--list {list_file}: no such file")
        split = split or list_file.stem
        if not re.fullmatch(r"[A-Za-z0-9_]+", split):
            raise UsageError(
                f"split name {split!r} may hold only letters, digits and '_' (it names the shards); pass --split NAME"
            )
        ids = sorted(set(read_id_list(list_file)))
        if not ids:
            raise DataError(f"--list {list_file} holds no image ids")
        return split, ids
    if split is None:
        raise UsageError("give --split NAME or --list FILE")
    if split not in SPLITS:
        raise UsageError(f"--split {split!r} is not one of {', '.join(SPLITS)} (--list FILE shards any id list)")
    ids = src.split_ids(split)
    if not ids:
        raise DataError(f"--split {split!r}: the id lists of --voc-root {voc_root} hold no image ids")
    return split, ids


def shard_dataset(
    voc_root,
    *,
    out,
    split: str | None = None,
    list_file=None,
    sbd_root=None,
    aug_masks=None,
    shard_size: int = 1000,
    overwrite: bool = False,
    on_error: str = "fail",
    workers: int = 1,
) -> ShardResult:
    """Write the shards of one split and its manifest rows into ``out``; returns what was written.
    ``workers`` > 1 reads and checks the images in that many processes (the shards are byte-identical).

    Bad flags, input or refused output raise :class:`~puzzlecam.errors.UsageError` (a
    :class:`~puzzlecam.errors.DataError` for input files) before anything final is written.
    """
    check_shard_flags(shard_size, on_error, workers)
    out = Path(out)
    src = VocSources(voc_root, sbd_root, aug_masks)
    split, ids = _select_ids(src, voc_root, split, list_file)
    output = SplitOutput(out, split, shard_size, overwrite)

    need_mask = list_file is None and split in MASKED_SPLITS
    plans, problems = _check_paths(src, ids, split, need_xml=split != "test", need_mask=need_mask)
    if problems and on_error == "fail":
        raise DataError(
            f"{len(problems)} missing input file(s); nothing was written (--on-error skip leaves these images out):\n"
            + problem_listing(problems)
        )
    for problem in problems:
        log.warning("skipping %s", problem)

    with output:
        with (
            OrderedPool(workers, _convert_plan) as pool,
            ProgressBar(f"sharding {split}", total=len(plans), transient=True) as bar,
        ):
            for plan, result in zip(plans, pool.results(plans), strict=True):
                if isinstance(result, Problem):
                    problems.append(result)
                    if on_error == "skip":
                        log.warning("skipping %s", result)
                else:
                    members, meta = result
                    output.add(plan[0], members, meta)
                bar.advance()
        if problems and on_error == "fail":
            raise DataError(
                f"{len(problems)} bad input file(s); nothing was written (--on-error skip leaves these images out):\n"
                + problem_listing(problems)
            )
        if not output.rows:
            raise DataError(f"no image of split {split!r} could be read:\n" + problem_listing(problems))
        shards = output.commit()
    if problems:
        log.warning("skipped %d image(s) with bad input (listed above)", len(problems))
    return ShardResult(out=out, split=split, shards=shards, rows=output.rows, skipped=problems)


def remove_stale_shards(out: Path, split: str, shards: list[Path]) -> None:
    """Remove ``split``'s shards in ``out`` that this run did not write (from an earlier, larger run: --overwrite)."""
    keep = {p.name for p in shards}
    for stale in out.glob(f"{split}-*.tar"):
        if stale.name not in keep:
            stale.unlink()
