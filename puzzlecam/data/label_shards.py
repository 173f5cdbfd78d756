"""``python -m puzzlecam.data label-shards``: training shards that carry a label map per image (docs/data.md).

Stages 2 and 3 train on label maps (affinity labels, pseudo-labels) written by puzzlecam.labels as
``DIR/{id}.png`` (ids named as the CAM store names files, :func:`puzzlecam.camstore.file_name`). This
command copies every input shard to ``--out`` under the same name, each sample with its members
``jpg`` (the unchanged JPEG bytes), ``json`` and ``seg.png`` (where present) and the label map's PNG
bytes, unchanged, as ``label.png``; the training loader then returns ``batch["label"]``.

Every sample is checked before anything is written: a label file for each id, a palette or index PNG
of the image's size with values 0..C (the shards' dataset: VOC 20, COCO 80) and 255. Any problem fails the
whole command naming the ids
(the first :data:`~puzzlecam.data.shard.LISTED_PROBLEMS` and a count of the rest); nothing is written.
Each output shard is written atomically (a temporary name, renamed when complete), members in tar order
with fixed metadata, so the same input gives byte-identical shards. A rerun skips the output shards
that already hold exactly their input's samples, each with a ``label.png`` (an interrupted run
resumes); ``overwrite`` rewrites them (after the label maps changed). Any other file under an output
shard's name is refused without ``overwrite``.
"""

from __future__ import annotations

import io
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

from puzzlecam.camstore import file_name, shown_id
from puzzlecam.data.shard import Problem, problem_listing
from puzzlecam.data.shards import (
    LABEL_KEY,
    ImageTooLarge,
    SampleRef,
    ShardReader,
    index_shard,
    open_image,
    resolve_shards,
    tar_member_info,
)
from puzzlecam.data.voc import check_mask_values
from puzzlecam.datasets import DEFAULT, of_shards
from puzzlecam.errors import DataError, ShardError, UsageError
from puzzlecam.utils.files import atomic_write
from puzzlecam.utils.labelmap import decode_label_png
from puzzlecam.utils.progress import ProgressBar

log = logging.getLogger(__name__)

# The members copied from an input sample (the ones the loaders read; anything else stays behind).
COPIED_KEYS = ("jpg", "json", "seg.png")


@dataclass
class LabelShardResult:
    """What :func:`label_shards` did: the output shards written now, those a rerun kept, the sample count."""

    out: Path
    written: list[Path]
    kept: list[Path]
    samples: int


def _label_bytes(
    labels_dir: Path, reader: ShardReader, ref: SampleRef, num_labels: int
) -> tuple[bytes | None, Problem | None]:
    """The label PNG of one sample, checked against its image; or the problem that makes it unusable."""
    path = labels_dir / file_name(ref.key, ".png")
    key = shown_id(ref.key)
    if "jpg" not in ref.members:
        return None, Problem(key, reader.paths[ref.shard], "the shard holds no jpg for this id")
    if not path.is_file():
        return None, Problem(key, path, "no label map")
    try:
        with open_image(reader.read(ref.shard, *ref.members["jpg"])) as image:
            height, width = image.size[::-1]
    except (ImageTooLarge, OSError, ValueError) as e:
        return None, Problem(key, reader.paths[ref.shard], f"its jpg is unreadable: {e}")
    data = path.read_bytes()
    try:
        label = decode_label_png(data)
        check_mask_values(label, num_labels)
    except (OSError, ValueError) as e:
        return None, Problem(key, path, f"unreadable label map: {e}")
    if label.shape != (height, width):
        return None, Problem(
            key, path, f"label map is {label.shape[0]}x{label.shape[1]} but the image is {height}x{width}"
        )
    return data, None


def _finished(path: Path, refs: list[SampleRef]) -> bool:
    """True when ``path`` is an output shard holding exactly ``refs``' samples, each with its label."""
    try:
        done, _ = index_shard(path, 0)
    except ShardError:
        return False
    want = {ref.key: set(ref.members) & set(COPIED_KEYS) | {LABEL_KEY} for ref in refs}
    return {ref.key: set(ref.members) for ref in done} == want


def _write_shard(out: Path, reader: ShardReader, refs: list[SampleRef], labels: dict[str, bytes], bar) -> None:
    def write(f):
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for ref in refs:
                members = {ext: reader.read(ref.shard, *ref.members[ext]) for ext in COPIED_KEYS if ext in ref.members}
                members[LABEL_KEY] = labels[ref.key]
                for ext in sorted(members):
                    data = members[ext]
                    tar.addfile(tar_member_info(f"{ref.key}.{ext}", len(data)), io.BytesIO(data))
                bar.advance()

    atomic_write(out, write)


def label_shards(shards, labels, out, *, overwrite: bool = False) -> LabelShardResult:
    """Write ``out/NAME`` for every input shard ``NAME``: its samples plus their ``label.png`` (module docstring).

    Raises :class:`~puzzlecam.errors.UsageError` (:class:`~puzzlecam.errors.DataError` for label files,
    :class:`~puzzlecam.errors.ShardError` for shards) before anything is written.
    """
    paths = resolve_shards(shards)
    labels_dir, out = Path(labels), Path(out)
    if not labels_dir.is_dir():
        raise DataError(f"--labels {labels_dir}: no such directory")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is not a directory")
    names = [p.name for p in paths]
    clashing = sorted({n for n in names if names.count(n) > 1})
    if clashing:
        raise ShardError(f"--shards: several input shards are named {', '.join(clashing[:4])}; --out keeps the names")
    inputs = {p.resolve() for p in paths}
    overwritten = [str(p) for p in paths if (out / p.name).resolve() in inputs]
    if overwritten:
        raise UsageError(f"--out {out} would replace the input shards {', '.join(overwritten[:4])}: choose another")

    reader = ShardReader(paths)
    num_labels = (of_shards(paths) or DEFAULT).num_labels  # the dataset the shards' json names
    per_shard: list[list[SampleRef]] = []
    for number, path in enumerate(paths):
        refs, warnings = index_shard(path, number)
        if warnings:
            raise ShardError(
                f"--shards: {warnings[0]}" + (f" (and {len(warnings) - 1} more)" if len(warnings) > 1 else "")
            )
        per_shard.append(refs)
    total = sum(len(refs) for refs in per_shard)

    label_of: dict[str, bytes] = {}
    problems: list[Problem] = []
    with ProgressBar("checking label maps", total=total, transient=True) as bar:
        for refs in per_shard:
            for ref in refs:
                data, problem = _label_bytes(labels_dir, reader, ref, num_labels)
                if problem is not None:
                    problems.append(problem)
                else:
                    label_of[ref.key] = data
                bar.advance()
    if problems:
        raise DataError(
            f"{len(problems)} of {total} images have no usable label map in --labels {labels_dir}; "
            f"nothing was written:\n" + problem_listing(problems)
        )

    # Which output shards to write: a finished one is kept; anything else under an output name is refused
    # before a byte is written (it is not this command's unfinished work: that is never under a final name).
    todo, kept, foreign = [], [], []
    for path, refs in zip(paths, per_shard, strict=True):
        target = out / path.name
        if overwrite or not target.exists():
            todo.append((target, refs))
        elif _finished(target, refs):
            kept.append(target)
        else:
            foreign.append(str(target))
    if foreign:
        raise UsageError(
            f"--out {out} already holds {len(foreign)} shard(s) that are not these inputs with labels: "
            f"{', '.join(foreign[:4])}{' ...' if len(foreign) > 4 else ''}; pass --overwrite to replace them"
        )
    if kept:
        log.info("kept %d finished shard(s) of an earlier run (--overwrite rewrites them)", len(kept))
    written = []
    with ProgressBar("writing labelled shards", total=sum(len(refs) for _, refs in todo)) as bar:
        for target, refs in todo:
            _write_shard(target, reader, refs, label_of, bar)
            written.append(target)
    reader.close()
    return LabelShardResult(out=out, written=written, kept=kept, samples=total)
