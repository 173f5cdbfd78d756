"""webdataset tar shards: finding them, indexing them, reading one sample by its byte offsets.

A sample is the tar members sharing one key (``2007_000032.jpg``, ``2007_000032.json``,
``2007_000032.seg.png``, in labelled training shards ``2007_000032.label.png``). Shards are indexed
once from their tar headers (no member data is read), so that any sample can be read with two
``pread`` calls: the loaders derive their sample order themselves (see loader.py) instead of streaming
shards through a shuffle buffer.

Security: only the members named in :data:`DECODED_KEYS` are ever read; every other member (``.pyd``,
``.pth``, ``.pickle``, ...) is skipped by offset without reading a byte of it, so nothing in a shard
can be unpickled or run. Member names are never used as file-system paths. An image whose header
declares more pixels than :func:`puzzlecam.utils.limits.max_image_pixels` is refused before decoding.

:func:`decode_members` is the one validation of a sample's bytes, whatever they come from: this module's
offsets into local shards (:func:`decode_sample`) or a stream of remote shards (puzzlecam.data.remote). Labels
are checked against the class count of the dataset the loader reads (puzzlecam.datasets: a sample's json may
name it, ``"dataset": "coco"``; none is VOC).
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import tarfile
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from braceexpand import braceexpand
from PIL import Image

from puzzlecam import NUM_CLASSES, datasets
from puzzlecam.errors import CorruptSample, PuzzleCamError, ShardError
from puzzlecam.utils.files import commit_temporary, raise_disk_problem, remove_quietly, temporary_path
from puzzlecam.utils.labelmap import IGNORE_INDEX, decode_label_png
from puzzlecam.utils.limits import image_size_problem

# label.png: the training label map of labelled shards (affinity labels, pseudo-labels; label_shards.py).
LABEL_KEY = "label.png"
DECODED_KEYS = ("jpg", "json", "seg.png", LABEL_KEY)
# Largest member that is read (a hostile header could claim anything up to the file size).
MAX_MEMBER_BYTES = 64 << 20

# A URL that webdataset's gopen opens (pipe:CMD, http://, https://, file://, s3 through pipe:, gs://, ...): such
# shards are streamed (puzzlecam.data.remote), never indexed here. One letter before "://" is no scheme.
_URL = re.compile(r"^(pipe:|[A-Za-z][A-Za-z0-9+.-]+://)")


def is_url(item) -> bool:
    """Whether ``item`` (a shard pattern or path) is a URL for webdataset's gopen rather than a local path."""
    return isinstance(item, str) and _URL.match(item) is not None


def resolve_shards(shards: str | os.PathLike | list) -> list[Path]:
    """Shard paths from a brace/glob pattern, a directory (its ``*.tar``) or a list of paths/patterns."""
    items = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    if not items:
        raise ShardError("no shards given (an empty list)")
    paths: list[Path] = []
    for item in items:
        item = str(item)
        if is_url(item):
            raise ShardError(
                f"shard {item!r} is a URL: this command reads local shards (the training and evaluation loaders "
                "and the inference commands' --shards stream URLs: docs/data.md 'Remote shards'); download them first"
            )
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.tar")))
            if not found:
                raise ShardError(f"shard directory {item} holds no *.tar files")
            paths += [Path(p) for p in found]
            continue
        try:
            patterns = list(braceexpand(item))
        except ValueError as e:  # UnbalancedBracesError
            raise ShardError(
                f"shard pattern {item!r} is not a valid brace pattern ({e}); e.g. 'dir/train-{{000000..000009}}.tar'"
            ) from None
        for pattern in patterns:
            if glob.has_magic(pattern):
                found = sorted(glob.glob(pattern))
                if not found:
                    raise ShardError(f"shard pattern {pattern!r} matches no file")
                paths += [Path(p) for p in found]
            elif not os.path.isfile(pattern):
                raise ShardError(f"shard {pattern} does not exist")
            else:
                paths.append(Path(pattern))
    seen = set()
    unique = []
    for p in paths:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the base name; the rest is the extension."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext if dot else ""


@dataclass
class SampleRef:
    """Where one sample's decodable members lie: shard number -> {ext: (offset, size)}."""

    key: str
    shard: int
    members: dict[str, tuple[int, int]] = field(default_factory=dict)


def index_shard(path: Path, shard_number: int) -> tuple[list[SampleRef], list[str]]:
    """Read the tar headers of one shard; returns its samples in tar order and warnings.

    A truncated shard keeps the samples whose members lie wholly inside the file; members claiming
    more bytes than the file holds are dropped (the loaders then count those samples as corrupt).
    """
    warnings = []
    size = path.stat().st_size
    samples: dict[str, SampleRef] = {}
    try:
        tf = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as e:
        raise ShardError(f"shard {path} is not a readable tar file: {e}") from None
    with tf:
        while True:
            try:
                info = tf.next()
            except (tarfile.TarError, OSError) as e:
                warnings.append(f"shard {path}: tar headers unreadable after {len(samples)} samples ({e})")
                break
            if info is None:
                break
            if not info.isreg():
                continue
            key, ext = split_member_name(info.name)
            if ext not in DECODED_KEYS:
                continue
            if info.offset_data + info.size > size:
                warnings.append(f"shard {path}: member {info.name} is truncated")
                continue
            ref = samples.get(key)
            if ref is None:
                ref = samples[key] = SampleRef(key, shard_number)
            ref.members[ext] = (info.offset_data, info.size)
    return list(samples.values()), warnings


def index_shards(paths: list[Path]) -> tuple[list[SampleRef], list[str]]:
    refs: list[SampleRef] = []
    warnings: list[str] = []
    for i, p in enumerate(paths):
        r, w = index_shard(p, i)
        refs += r
        warnings += w
    if not refs:
        raise ShardError(f"the {len(paths)} shard(s) hold no samples (first: {paths[0]})")
    return refs, warnings


class ShardReader:
    """Reads members by offset; file handles are opened lazily per process (safe across fork)."""

    def __init__(self, paths: list[Path]):
        self.paths = [str(p) for p in paths]
        self._fds: dict[int, int] = {}
        self._pid = -1

    def read(self, shard: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():
            self._fds = {}
            self._pid = os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        if size > MAX_MEMBER_BYTES:
            raise CorruptSample(f"member of {size} bytes exceeds the {MAX_MEMBER_BYTES}-byte limit")
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise CorruptSample(f"short read in {self.paths[shard]} at {offset}")
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __getstate__(self):
        return {"paths": self.paths, "_fds": {}, "_pid": -1}

    def __del__(self):
        if self._pid == os.getpid():
            self.close()


class ImageTooLarge(ValueError):
    """An image whose header declares more pixels than :func:`puzzlecam.utils.limits.max_image_pixels`."""


def open_image(data: bytes) -> Image.Image:
    """``data`` opened by PIL with only its header read; a declared size above the pixel bound
    (:mod:`puzzlecam.utils.limits`) raises :class:`ImageTooLarge` before a byte is decoded."""
    try:
        with warnings.catch_warnings():
            # PIL warns above its own level; the bound below decides (and says so in one message).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # above twice PIL's level PIL refuses by itself
        raise ImageTooLarge(f"refused before decoding: {e}") from None
    width, height = image.size
    problem = image_size_problem(height, width)
    if problem is not None:
        image.close()
        raise ImageTooLarge(f"refused before decoding: {problem}")
    return image


@dataclass
class Sample:
    key: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    labels: list[int]
    mask: np.ndarray | None  # (H, W) uint8 or None
    label: np.ndarray | None = None  # (H, W) uint8 training label map (decode_sample's label_member) or None


def check_label_values(label: np.ndarray, num_classes: int = NUM_CLASSES) -> None:
    """A ValueError unless every value of a mask / label map is 0 (background), a class 1..num_classes or 255."""
    bad = label[(label > num_classes) & (label != IGNORE_INDEX)]
    if bad.size:
        raise ValueError(
            f"mask holds values {np.unique(bad).tolist()[:8]}; expected 0..{num_classes} or {IGNORE_INDEX}"
        )


def _decode_label_map(png: bytes, ext: str, shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    """A ``seg.png`` / ``label.png`` member: the image's size (checked on the header: a forged size is never
    decoded), values 0..num_classes and 255."""
    with open_image(png) as header:
        size = header.size[::-1]
    if size != shape:
        raise CorruptSample(f"{ext} {size} does not match image {shape}")
    label = decode_label_png(png)
    try:
        check_label_values(label, num_classes)
    except ValueError as e:
        raise CorruptSample(f"{ext}: {e}") from None
    return label


def sample_dataset(meta: dict) -> datasets.Dataset:
    """The dataset a sample's parsed json names (VOC where it names none); a ValueError for an unknown name."""
    return datasets.named_in(meta)


def decode_members(
    key: str,
    present: Collection[str],
    read: Callable[[str], bytes],
    *,
    with_mask: bool,
    label_member: str | None = None,
    num_classes: int = NUM_CLASSES,
) -> Sample:
    """Decode one sample from its members' bytes: ``present`` are the decodable members it has, ``read(ext)``
    returns one member's bytes (and may raise :class:`CorruptSample`, e.g. for a member over the size bound).

    ``jpg`` + ``json``, + ``seg.png`` as ``mask`` with ``with_mask``, + the label map ``label_member``
    (``label.png`` or ``seg.png``) as ``label``, which must then be present. The json's labels must be class
    indices 0..num_classes-1 of the dataset it names, whose class count must be ``num_classes``; masks and label
    maps hold 0..num_classes and 255. Any problem raises :class:`CorruptSample`."""
    try:
        if "json" not in present:
            raise CorruptSample("no json member")
        if "jpg" not in present:
            raise CorruptSample("no jpg member")
        meta = json.loads(read("json"))
        if not isinstance(meta, dict) or not isinstance(meta.get("labels"), list):
            raise CorruptSample("json has no 'labels' list")
        try:
            dataset = sample_dataset(meta)
        except ValueError as e:
            raise CorruptSample(str(e)) from None
        if dataset.num_classes != num_classes:
            raise CorruptSample(
                f"json names dataset {dataset.name} ({dataset.num_classes} classes) but the loader reads "
                f"{num_classes}-class labels (shards of several datasets mixed?)"
            )
        labels = meta["labels"]
        if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < num_classes for c in labels):
            raise CorruptSample(f"labels {labels[:8]} out of range 0..{num_classes - 1}")
        member = "jpg"  # the one an ImageTooLarge is about
        with open_image(read("jpg")) as img:
            if img.format != "JPEG":
                raise CorruptSample(f"jpg member is {img.format}, not JPEG")
            image = np.array(img.convert("RGB"))
        mask = label = None
        if with_mask and "seg.png" in present:
            member = "seg.png"
            mask = _decode_label_map(read(member), member, image.shape[:2], num_classes)
        if label_member is not None:
            member = label_member
            if member not in present:
                raise CorruptSample(f"no {member} member (the other samples of these shards have one)")
            label = _decode_label_map(read(member), member, image.shape[:2], num_classes)
    except ImageTooLarge as e:
        raise CorruptSample(f"{member} {e}") from None
    except PuzzleCamError:  # CorruptSample, or a bad $PUZZLECAM_MAX_IMAGE_PIXELS (not the sample's fault)
        raise
    except Exception as e:  # PIL / json / zlib errors of a damaged member
        raise CorruptSample(f"{type(e).__name__}: {e}") from None
    return Sample(key, image, [int(c) for c in labels], mask, label)


def decode_sample(
    reader: ShardReader,
    ref: SampleRef,
    with_mask: bool,
    label_member: str | None = None,
    num_classes: int = NUM_CLASSES,
) -> Sample:
    """:func:`decode_members` of a sample of local shards, its members read by offset."""
    return decode_members(
        ref.key,
        ref.members,
        lambda ext: reader.read(ref.shard, *ref.members[ext]),
        with_mask=with_mask,
        label_member=label_member,
        num_classes=num_classes,
    )


def first_dataset(reader: ShardReader, refs: list[SampleRef], tries: int = 16) -> datasets.Dataset:
    """The dataset the first readable json of ``refs`` names (VOC where none is readable or none names one);
    a ShardError for a name puzzlecam does not know."""
    for ref in refs[:tries]:
        if "json" not in ref.members:
            continue
        try:
            meta = json.loads(reader.read(ref.shard, *ref.members["json"]))
        except (CorruptSample, ValueError):
            continue
        if isinstance(meta, dict):
            try:
                return sample_dataset(meta)
            except ValueError as e:
                raise ShardError(f"{reader.paths[ref.shard]}: sample {ref.key!r}: {e}") from None
    return datasets.DEFAULT


# ---------------------------------------------------------------------------------------------
# Writing


def tar_member_info(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata so that the same input gives byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Writes ``{split}-{index:06d}.tar`` under temporary names; :meth:`commit` renames them all.

    The temporaries are :func:`puzzlecam.utils.files.temporary_path` names (``.NAME.tmp-PID``), so
    shard globs never pick them up. A write that fails on a full or read-only disk removes every
    temporary first, then raises one :class:`~puzzlecam.errors.DiskError` naming the shard;
    :meth:`abort` removes them after any other failure.
    """

    def __init__(self, out_dir: Path, split: str, shard_size: int):
        self.out_dir, self.split, self.shard_size = Path(out_dir), split, shard_size
        self.written: list[tuple[Path, Path]] = []  # (temporary, final)
        self._file: io.BufferedWriter | None = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def shard_name(self, index: int) -> str:
        return f"{self.split}-{index:06d}.tar"

    def add(self, key: str, members: dict[str, bytes]) -> str:
        """Add one sample; returns the name of the shard that holds it."""
        with self._cleaning_up_on_failure():
            if self._tar is None or self._count == self.shard_size:
                self._close_current()
                final = self.out_dir / self.shard_name(len(self.written))
                tmp = temporary_path(final)
                self.written.append((tmp, final))
                self._file = open(tmp, "wb")  # closed by _close_current
                self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
                self._count = 0
            for ext in sorted(members):
                data = members[ext]
                self._tar.addfile(tar_member_info(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self._count += 1
        return self.written[-1][1].name

    def close(self) -> None:
        """Finish the last shard: every shard is complete on disk, none is renamed yet."""
        with self._cleaning_up_on_failure():
            self._close_current()

    def commit(self) -> list[Path]:
        """Finish the last shard and rename every temporary into place; returns the final paths."""
        self.close()
        return [commit_temporary(tmp, final) for tmp, final in self.written]

    def abort(self) -> None:
        """Remove every temporary written so far (nothing final has been touched). Never raises: it runs
        after a failure, and closing the tar would write its end blocks to a disk that just failed."""
        file, self._file, self._tar = self._file, None, None
        if file is not None:
            try:
                file.close()
            except OSError:  # the buffered bytes cannot be flushed; the descriptor is closed all the same
                pass
        for tmp, _ in self.written:
            remove_quietly(tmp)

    @contextlib.contextmanager
    def _cleaning_up_on_failure(self):
        try:
            yield
        except BaseException as exc:
            where = self.written[-1][1] if self.written else self.out_dir
            try:
                raise_disk_problem(where, exc)  # before the clean-up, so that a full disk still looks full
            finally:
                self.abort()
            raise

    def _close_current(self) -> None:
        if self._tar is not None:
            self._tar.close()  # writes the end-of-archive blocks; the file stays open
            self._tar = None
        if self._file is not None:
            file, self._file = self._file, None
            try:  # on disk before the rename, as utils.files.atomic_write does
                file.flush()
                os.fsync(file.fileno())
            finally:
                file.close()
