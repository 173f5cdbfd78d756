"""Training batches streamed from remote shards: URLs read through webdataset (docs/data.md, "Remote shards").

``train_loader`` hands shards given as URLs (``pipe:CMD``, ``http(s)://...`` and whatever else webdataset's
``gopen`` opens) to :class:`RemoteTrainLoader`. It has the interface of the local ``TrainLoader`` (len, epoch,
state_dict / load_state_dict / load_elastic_state, epoch_corrupt, skipped, shard_paths, with_labels) and the
same batch layout, so the trainer and the tasks do not know which one they hold.

What webdataset does: ``webdataset.shardlists.expand_urls`` expands a URL string (brace patterns,
``url1::url2`` lists, ``${VAR}`` from ``$WDS_VAR``) and ``webdataset.gopen.gopen`` opens each shard as a byte
stream (``pipe:`` runs the command with the shell, http/https go through ``curl`` with its retries, ...).
Everything after the bytes is ours, for the guarantees of the local loader:

- Members: the tar stream is read with :mod:`tarfile` in stream mode; only ``jpg``, ``json``, ``seg.png`` and
  ``label.png`` members are kept (the others are skipped without being stored), a member over
  ``MAX_MEMBER_BYTES`` is refused from its header, and the members are validated and decoded by the local
  loader's own :func:`puzzlecam.data.shards.decode_members`, so a corrupt sample is what it is there: skipped,
  logged once, counted in ``skipped`` and ``epoch_corrupt``.
- Length: the epoch's sample count T is known up front, from ``manifest.parquet`` beside the shards (``shard``
  writes it; its rows of these shards' names are counted) or from ``samples_per_epoch``. Every rank yields
  exactly ``T // (world size * batch size)`` batches per epoch, whatever the shards hold: each stream is
  infinite (it goes on with the next shards of its sequence, cyclically) and is cut at its quota. So no rank
  runs out early and no collective can wait at an epoch end for a rank that has no data (webdataset's
  ``split_by_node`` with uneven shards gives the ranks different counts: the known hang).
- Assignment: a rank runs K streams (K = ``num_workers``, at least 1); each DataLoader worker reads one stream.
  For epoch e the units (a shard, or when there are fewer shards than W*K streams, one of P parts of a shard:
  its samples i with i % P == part) are permuted by a generator seeded with (seed, e); global position p of
  the epoch holds unit ``order[p % U]`` (a second lap when positions run past U). Rank r takes positions
  r, r + W, r + 2W, ...; its stream s takes its positions s, s + K, s + 2K, ... Batch b of a rank's epoch
  comes from stream b % K (the DataLoader's round robin over its workers).
- Order within a unit: windows of ``shuffle_buffer`` samples, each permuted by a generator seeded with
  (seed, epoch, p, window): the streaming form of the local loader's ``shuffle_buffer`` order. Each sample's
  augmentation (puzzlecam.data.augment, the same code as local) is seeded by (seed, epoch, p, its index in the
  unit's shuffled order). (Each generator's seed also holds a tag, so that no two are seeded alike.)
- Resume: every batch carries its stream's position after it (units done, samples of the current unit
  used), the loader keeps the newest per stream, ``state_dict`` saves them. On the same layout (world size,
  streams, batch size) ``load_state_dict`` is exact: each stream reopens its unit, skips the used samples
  without decoding them and yields exactly the batches the uninterrupted run would have. On another layout the
  epoch goes on at shard granularity: the units every stream had finished are left out of the rest of the
  epoch, the ones in progress are read again from their start, and the remaining batches are what the epoch's
  remaining samples give on the new layout.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import math
import re
import sys
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from puzzlecam import datasets
from puzzlecam.data.augment import apply_geometry, draw_geometry
from puzzlecam.data.loader import _identity, _rank_world, _seed_check, _start_methods, check_loader_args, eval_batch
from puzzlecam.data.shards import (
    DECODED_KEYS,
    LABEL_KEY,
    MAX_MEMBER_BYTES,
    decode_members,
    is_url,
    sample_dataset,
    split_member_name,
)
from puzzlecam.errors import CorruptSample, ShardError
from puzzlecam.utils.labelmap import IGNORE_INDEX
from puzzlecam.utils.net import free_port

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
MAX_MANIFEST_BYTES = 256 << 20
# Bytes read after a tar's end-of-archive blocks before the producing process is checked (tar pads to 10 KiB).
_DRAIN_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------------
# URLs


def expand(shards) -> list[str]:
    """The shard URLs of ``shards`` (a URL string or a list of them), each expanded by webdataset's
    ``expand_urls`` (brace patterns, ``::`` lists, ``${VAR}``), in order, without repeats."""
    from webdataset.gopen import gopen_schemes
    from webdataset.shardlists import expand_urls

    items = [shards] if isinstance(shards, str) else [str(s) for s in shards]
    urls: list[str] = []
    for item in items:
        try:
            expanded = expand_urls(item)
        except (AssertionError, ValueError) as e:  # a missing $WDS_ variable, unbalanced braces
            raise ShardError(f"shard URL {item!r} cannot be expanded: {e}") from None
        for url in expanded:
            scheme = "pipe" if url.startswith("pipe:") else urlparse(url).scheme
            if not is_url(url) or (scheme not in gopen_schemes and scheme != "file"):
                known = ", ".join(sorted({*gopen_schemes, "file"} - {"__default__"}))
                raise ShardError(f"shard URL {url!r}: webdataset opens {known} URLs")
            if url not in urls:
                urls.append(url)
    if not urls:
        raise ShardError(f"no shard URLs in {shards!r}")
    return urls


_TAR_NAME = re.compile(r"[^/\s'\"]+\.tar\b")


def shard_name(url: str) -> str:
    """The shard's file name in ``url``: the last ``NAME.tar`` in it (in a ``pipe:`` command too)."""
    found = _TAR_NAME.findall(url)
    return found[-1] if found else url.rstrip("/").rsplit("/", 1)[-1]


def manifest_url(url: str) -> str | None:
    """``url`` with its shard file name replaced by ``manifest.parquet`` (None where it names no ``.tar``)."""
    found = list(_TAR_NAME.finditer(url))
    if not found:
        return None
    m = found[-1]
    return url[: m.start()] + MANIFEST + url[m.end() :]


class _Shard:
    """One URL opened with webdataset's gopen. :meth:`finish` (after reading the tar to its end) drains the
    padding and closes, which checks the producing process (``pipe:`` command, curl): a failed one, e.g. a
    missing file or an HTTP error, is a ShardError. :meth:`abandon` closes without that check (a stream left
    early: its process then ends on a broken pipe)."""

    def __init__(self, url: str):
        from webdataset.gopen import gopen

        self.url = url
        try:
            self.stream = gopen(url, "rb")
        except Exception as e:  # an unknown scheme, a command that cannot start
            raise ShardError(f"cannot open shard {url}: {e}") from None

    def finish(self) -> None:
        try:
            drained = 0
            while drained <= _DRAIN_BYTES:
                chunk = self.stream.read(1 << 16)
                if not chunk:
                    break
                drained += len(chunk)
            else:  # endless bytes after the archive's end: not a tar this loader wrote
                self.abandon()
                return
            self.stream.close()
        except OSError as e:
            raise ShardError(f"reading shard {self.url} failed: {e}") from None

    def abandon(self) -> None:
        proc = getattr(self.stream, "proc", None)  # webdataset's Pipe: close our end, then end the process
        with contextlib.suppress(Exception):
            (self.stream.stream if proc is not None else self.stream).close()
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                proc.kill()
                proc.wait(10)


# ---------------------------------------------------------------------------------------------
# Tar streams


@dataclass
class RawSample:
    """One sample's decodable members as read from a stream; ``problem`` makes it corrupt whatever they hold."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None

    def read(self, ext: str) -> bytes:
        return self.members[ext]


def tar_samples(stream, url: str) -> Iterator[RawSample]:
    """The samples of one tar stream in order: consecutive members of one key (webdataset's convention), only
    the ``DECODED_KEYS`` members kept. A member over ``MAX_MEMBER_BYTES`` is not read (the sample is corrupt);
    a stream cut off or damaged inside a member ends the shard, the sample being read then corrupt. Errors of
    the stream itself (OSError: the producing process failed) propagate."""
    current: RawSample | None = None
    count = 0
    try:
        tar = tarfile.open(fileobj=stream, mode="r|")
        for info in tar:
            tar.members = []  # a stream's TarFile would keep every header
            if not info.isreg():
                continue
            key, ext = split_member_name(info.name)
            if ext not in DECODED_KEYS:
                continue  # skipped by tarfile without storing a byte
            if current is None or key != current.key:
                if current is not None:
                    count += 1
                    yield current
                current = RawSample(key)
            if ext in current.members:
                current.problem = current.problem or f"member {info.name} appears twice"
            if info.size > MAX_MEMBER_BYTES:
                current.problem = f"member {info.name} of {info.size} bytes exceeds the {MAX_MEMBER_BYTES}-byte limit"
                continue
            current.members[ext] = tar.extractfile(info).read()
    except tarfile.TarError as e:
        if current is not None:
            current.problem = current.problem or f"the shard stream is cut off or damaged here ({e})"
        else:
            log.warning("shard %s: no tar data after %d samples (%s)", url, count, e)
    if current is not None:
        yield current


def _peek(url: str) -> RawSample:
    """The first sample of the shard at ``url`` (a ShardError when it cannot be read or holds none)."""
    src = _Shard(url)
    try:
        for raw in tar_samples(src.stream, url):
            return raw
        src.finish()  # an HTTP error or failed command is named here
    except OSError as e:
        raise ShardError(f"reading shard {url} failed: {e}") from None
    finally:
        src.abandon()
    raise ShardError(f"shard {url} holds no samples")


def read_manifests(urls: list[str]) -> tuple[list[int], bool] | None:
    """(samples per shard, whether any has a mask) from the ``manifest.parquet`` beside the shards, or None
    when a shard has no manifest or is not in its manifest."""
    import pyarrow.parquet as pq

    by_manifest: dict[str, Counter] = {}
    masks = False
    counts = []
    for url in urls:
        where = manifest_url(url)
        if where is None:
            return None
        if where not in by_manifest:
            src = None
            try:
                src = _Shard(where)
                data = src.stream.read(MAX_MANIFEST_BYTES + 1)
                if len(data) > MAX_MANIFEST_BYTES:
                    raise ValueError(f"larger than {MAX_MANIFEST_BYTES} bytes")
                src.finish()
                table = pq.read_table(io.BytesIO(data), columns=["shard", "has_mask"])
            except Exception as e:  # missing (HTTP 404, no file), unreadable
                log.info("no usable %s (%s)", where, e)
                return None
            finally:
                if src is not None:
                    src.abandon()
            by_manifest[where] = Counter(table.column("shard").to_pylist())
            rows = zip(table.column("shard").to_pylist(), table.column("has_mask").to_pylist(), strict=True)
            by_manifest[where + "#masks"] = Counter(name for name, mask in rows if mask)
        name = shard_name(url)
        if by_manifest[where][name] == 0:
            log.info("%s has no rows of shard %s", where, name)
            return None
        counts.append(by_manifest[where][name])
        masks = masks or by_manifest[where + "#masks"][name] > 0
    return counts, masks


# ---------------------------------------------------------------------------------------------
# Assignment


def _nth_not_in(skip: tuple[int, ...], m: int) -> int:
    """The m-th (from 0) natural number that is not in the ascending ``skip``."""
    x = m
    for v in skip:
        if v > x:
            break
        x += 1
    return x


@dataclass(frozen=True)
class Plan:
    """Which epoch position stream s of a rank reads as its j-th unit. ``global_skip``: positions left out of
    the epoch (finished before an elastic resume); ``rank_skip``: indices of the rank's own positions left out
    (finished before a resume with another stream count or batch size)."""

    world_size: int
    rank: int
    streams: int
    global_skip: tuple[int, ...] = ()
    rank_skip: tuple[int, ...] = ()

    def rank_index(self, s: int, j: int) -> int:
        return _nth_not_in(self.rank_skip, s + self.streams * j)

    def position_of_index(self, i: int) -> int:
        return _nth_not_in(self.global_skip, self.rank + self.world_size * i)

    def position(self, s: int, j: int) -> int:
        return self.position_of_index(self.rank_index(s, j))

    def done_indices(self, positions: list[tuple[int, int]]) -> set[int]:
        """The rank's indices of every unit finished: skipped before, or done by a stream at ``positions``."""
        done = set(self.rank_skip)
        for s, (j, _) in enumerate(positions):
            done.update(self.rank_index(s, t) for t in range(j))
        return done


# Tags that keep the generators of the unit order, the shuffle windows and the augmentation apart.
_ORDER, _WINDOW, _AUGMENT = 1, 2, 3


def unit_order(seed: int, epoch: int, units: int) -> np.ndarray:
    """Epoch ``epoch``'s permutation of the units (position p of the epoch holds ``order[p % units]``)."""
    return np.random.default_rng([seed, epoch, _ORDER]).permutation(units)


# ---------------------------------------------------------------------------------------------
# Batches

_warned: set[tuple[str, str]] = set()


class _Streams(IterableDataset):
    """This rank's batches of one pass: in a DataLoader worker w of K, stream (first + w) % K's share; in the main
    process (no workers) every stream in turn. Workers are started for every pass, so they see the current
    attributes (epoch, plan, positions, first, stop)."""

    def __init__(self, loader: RemoteTrainLoader, crop_size, min_long_side, max_long_side, hflip):
        self.urls, self.seed, self.batch_size = loader.urls, loader.seed, loader.batch_size
        self.parts, self.units, self.streams = loader.parts, loader.units, loader.streams
        self.shuffle_buffer, self.num_classes = loader.shuffle_buffer, loader.num_classes
        self.label_member = loader.label_member if loader.with_labels else None
        self.crop_size, self.min_long_side, self.max_long_side, self.hflip = (
            crop_size,
            min_long_side,
            max_long_side,
            hflip,
        )
        self.epoch, self.plan, self.positions, self.first, self.stop = 0, None, [], 0, 0

    def __iter__(self):
        info = get_worker_info()
        remaining, K = self.stop - self.first, self.streams
        if info is None:
            gens: dict[int, Iterator[dict]] = {}
            try:
                for t in range(remaining):
                    s = (self.first + t) % K
                    if s not in gens:
                        gens[s] = self._stream(s)
                    yield next(gens[s])
            finally:
                for g in gens.values():
                    g.close()
            return
        if info.num_workers != K:
            raise ShardError(f"{info.num_workers} DataLoader workers for {K} streams")
        count = len(range(info.id, remaining, K))
        if count:
            gen = self._stream((self.first + info.id) % K)
            try:
                for _ in range(count):
                    yield next(gen)
            finally:
                gen.close()

    def _unit(self, shard: int, part: int, p: int, start: int) -> Iterator[tuple[int, RawSample | None, bool]]:
        """(index k in the unit's shuffled order, sample, whether it is the unit's last) for k >= ``start``."""
        url = self.urls[shard]
        src = _Shard(url)
        finished = False
        try:
            emitted, window_number, window = 0, 0, []
            P, buffer = self.parts, self.shuffle_buffer

            def emit(window, last):
                rng = np.random.default_rng([self.seed, self.epoch, _WINDOW, p, window_number])
                order = rng.permutation(len(window))
                for t, i in enumerate(order):
                    if emitted + t >= start:
                        yield emitted + t, window[i], last and t == len(window) - 1

            for n, raw in enumerate(tar_samples(src.stream, url)):
                if n % P != part:
                    continue
                if len(window) == buffer:
                    yield from emit(window, False)
                    emitted, window_number, window = emitted + len(window), window_number + 1, []
                # A window wholly before ``start`` (a resume) is counted, not kept.
                window.append(raw if emitted + buffer > start else None)
            if window:
                yield from emit(window, True)
            finished = True
        except OSError as e:
            raise ShardError(f"reading shard {url} failed: {e}") from None
        finally:
            if finished:
                src.finish()
            else:
                src.abandon()

    def _stream(self, s: int) -> Iterator[dict]:
        """Stream s's batches from its saved position on (infinite)."""
        B, C, crop = self.batch_size, self.num_classes, self.crop_size
        order = unit_order(self.seed, self.epoch, self.units)
        j, k = self.positions[s]
        fresh = lambda: (
            np.zeros((B, crop, crop, 3), dtype=np.uint8),
            np.zeros((B, 2), dtype=np.int64),
            np.zeros((B, C), dtype=np.float32),
            np.full((B, crop, crop), IGNORE_INDEX, np.uint8) if self.label_member else None,
            [],
            [],
        )
        images, valid, labels, label_maps, ids, corrupt = fresh()
        barren = 0  # consecutive units without a decodable sample
        while True:
            p = self.plan.position(s, j)
            shard, part = divmod(int(order[p % self.units]), self.parts)
            decoded = False
            for index, raw, last in self._unit(shard, part, p, k):
                try:
                    if raw.problem is not None:
                        raise CorruptSample(raw.problem)
                    sample = decode_members(
                        raw.key,
                        raw.members,
                        raw.read,
                        with_mask=False,
                        label_member=self.label_member,
                        num_classes=C,
                    )
                except CorruptSample as e:
                    corrupt.append(shard)
                    if (self.urls[shard], raw.key) not in _warned:
                        _warned.add((self.urls[shard], raw.key))
                        log.warning("skipping corrupt sample %r in %s: %s", raw.key, self.urls[shard], e)
                    continue
                decoded = True
                b = len(ids)
                rng = np.random.default_rng([self.seed, self.epoch, _AUGMENT, p, index])
                geometry = draw_geometry(
                    sample.image.shape[:2], rng, crop, self.min_long_side, self.max_long_side, self.hflip
                )
                apply_geometry(sample.image, geometry, Image.BICUBIC, images[b])
                if label_maps is not None:
                    apply_geometry(sample.label, geometry, Image.NEAREST, label_maps[b])
                valid[b] = geometry.valid
                labels[b, sample.labels] = 1.0
                ids.append(sample.key)
                if len(ids) == B:
                    batch = {
                        "image": torch.from_numpy(images),
                        "valid": torch.from_numpy(valid),
                        "labels": torch.from_numpy(labels),
                        "id": ids,
                        "corrupt_shards": corrupt,
                        "stream": s,
                        "stream_position": (j + 1, 0) if last else (j, index + 1),
                    }
                    if label_maps is not None:
                        batch["label"] = torch.from_numpy(label_maps).long()
                    yield batch
                    images, valid, labels, label_maps, ids, corrupt = fresh()
            barren = 0 if decoded else barren + 1
            if barren > self.units:
                raise ShardError(
                    f"rank {self.plan.rank} stream {s}: no decodable sample in {barren} units of its shards in a row "
                    f"(first: {self.urls[0]})"
                )
            j, k = j + 1, 0


class RemoteTrainLoader:
    """Training batches streamed from shard URLs (module docstring; docs/data.md "Remote shards").

    Iterating yields the remaining batches of the current epoch, then the epoch counter advances.
    ``len(loader)`` = ``samples // (world_size * batch_size)``, the same on every rank; ``samples`` comes from
    ``samples_per_epoch`` or the shards' ``manifest.parquet``. ``shuffle_buffer`` (> 0) is the window of the
    order within a shard. ``streams``: the shard streams of this rank (default ``max(1, num_workers)``; with
    workers there must be one per worker; without, the main process reads them in turn, giving the same
    batches as that many workers). ``num_classes``: the length of ``batch["labels"]`` (default: the dataset
    of the first sample's json).
    """

    def __init__(
        self,
        shards,
        *,
        batch_size,
        crop_size,
        seed,
        num_workers=0,
        min_long_side=320,
        max_long_side=640,
        hflip=True,
        shuffle_buffer=0,
        rank=None,
        world_size=None,
        pin_memory=None,
        label_member=LABEL_KEY,
        num_classes=None,
        samples_per_epoch=None,
        streams=None,
    ):
        check_loader_args(batch_size, crop_size, min_long_side, max_long_side, num_workers, label_member)
        if shuffle_buffer < 1:
            raise ValueError(
                f"remote shards are streamed: the order within a shard needs a shuffle window, data.shuffle_buffer "
                f"> 0 (e.g. 1000), got {shuffle_buffer}"
            )
        self.streams = max(1, num_workers) if streams is None else int(streams)
        if self.streams < 1 or num_workers not in (0, self.streams):
            raise ValueError(f"streams ({streams}) must be >= 1 and equal num_workers ({num_workers}) when it is > 0")
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.seed, self.batch_size, self.shuffle_buffer = _seed_check(seed), batch_size, int(shuffle_buffer)
        self.label_member = label_member
        self.urls = expand(shards)
        self.shard_paths = list(self.urls)
        manifest = read_manifests(self.urls)
        first = _peek(self.urls[0])
        self.num_classes = self._classes(num_classes, first)
        if label_member == "seg.png" and manifest is not None:
            self.with_labels = manifest[1]
        else:
            self.with_labels = label_member in first.members
        if samples_per_epoch is not None:
            if samples_per_epoch < 1:
                raise ValueError(f"samples_per_epoch must be positive, got {samples_per_epoch}")
            self.num_samples = int(samples_per_epoch)
        elif manifest is not None:
            self.num_samples = sum(manifest[0])
        else:
            raise ShardError(
                f"cannot tell how many samples the {len(self.urls)} shard URL(s) hold (first: {self.urls[0]}): no "
                f"{MANIFEST} with their rows beside them (e.g. {manifest_url(self.urls[0])}). Serve the one "
                "'python -m puzzlecam.data shard' wrote (labelled shards: the input shards' one; the names and "
                "counts are the same), or give samples_per_epoch"
            )
        n = len(self.urls)
        self.parts = math.ceil(self.world_size * self.streams / n)
        self.units = n * self.parts
        self._full = self.num_samples // (self.world_size * batch_size)
        if self._full == 0:
            raise ShardError(
                f"{self.num_samples} samples over {self.world_size} rank(s) give fewer than batch_size={batch_size} "
                "per rank: no full batch"
            )
        names = "\n".join(shard_name(u) for u in self.urls)
        self._fingerprint = hashlib.sha1(f"{names}\n{self.num_samples}".encode()).hexdigest()
        self._data = _Streams(self, crop_size, min_long_side, max_long_side, hflip)
        self._loader = DataLoader(
            self._data,
            batch_size=None,
            num_workers=num_workers,
            collate_fn=_identity,
            persistent_workers=False,  # started per pass, so that each sees the pass's positions
            pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
            multiprocessing_context="fork" if num_workers > 0 and "fork" in _start_methods() else None,
        )
        self.skipped = 0
        self.epoch_corrupt = [0] * len(self.urls)  # per shard, of the epoch of the newest batch
        self.set_epoch(0)

    def _classes(self, num_classes, first: RawSample) -> int:
        if num_classes is not None:
            if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
                raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
            return int(num_classes)
        try:
            meta = json.loads(first.members["json"])
        except (KeyError, ValueError):
            meta = None
        try:
            return (sample_dataset(meta) if isinstance(meta, dict) else datasets.DEFAULT).num_classes
        except ValueError as e:
            raise ShardError(f"{self.urls[0]}: sample {first.key!r}: {e}") from None

    def __len__(self) -> int:
        return self._full

    def __iter__(self):
        if self.batches_done >= self.quota:
            self._next_epoch()
        if self.batches_done == 0 and self.consumed == 0:  # an epoch's first batch: its counts start
            self.epoch_corrupt = [0] * len(self.urls)
        data = self._data
        data.epoch, data.plan, data.positions = self.epoch, self.plan, list(self.positions)
        data.first, data.stop = self.batches_done, self.quota
        for batch in self._loader:
            for shard in batch.pop("corrupt_shards"):
                self.epoch_corrupt[shard] += 1
                self.skipped += 1
            self.positions[batch.pop("stream")] = tuple(batch.pop("stream_position"))
            self.batches_done += 1
            yield batch
        if self.batches_done != self.quota:  # every stream is endless: this cannot happen
            raise ShardError(f"rank {self.rank}: the streams gave {self.batches_done} of {self.quota} batches")
        self._next_epoch()

    def _next_epoch(self) -> None:
        self.set_epoch(self.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_done, self.quota, self.consumed = int(epoch), 0, self._full, 0
        self.plan = Plan(self.world_size, self.rank, self.streams)
        self.positions = [(0, 0)] * self.streams

    def state_dict(self) -> dict:
        return {
            "kind": "remote",
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "quota": self.quota,
            "consumed": self.consumed,
            "global_skip": list(self.plan.global_skip),
            "rank_skip": list(self.plan.rank_skip),
            "positions": [list(p) for p in self.positions],
            "skipped": self.skipped,
            "epoch_corrupt": list(self.epoch_corrupt),
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "streams": self.streams,
            "batch_size": self.batch_size,
            "units": self.units,
            "shuffle_buffer": self.shuffle_buffer,
            "num_samples": self.num_samples,
            "fingerprint": self._fingerprint,
        }

    def _check_same(self, state: dict) -> None:
        if state.get("kind") != "remote":
            raise ValueError(
                "loader state: the checkpoint's data position is of local shards (an index), these are URLs "
                "(streams): a run cannot change between the two"
            )
        mine = self.state_dict()
        for key in ("seed", "num_samples", "fingerprint", "shuffle_buffer"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"loader state: {key} is {state.get(key)!r} in the checkpoint but {mine[key]!r} now; a resume "
                    "needs the same shards (names and sample count), seed and shuffle_buffer"
                )

    def load_state_dict(self, state: dict) -> None:
        """Continue where this rank's ``state`` left off: exactly on the same layout (world size, streams, batch
        size); at shard granularity on another stream count or batch size (module docstring)."""
        self._check_same(state)
        if (int(state["world_size"]), int(state["rank"])) != (self.world_size, self.rank):
            raise ValueError(
                f"loader state of rank {state['rank']} of {state['world_size']}, this is rank {self.rank} of "
                f"{self.world_size} (another world size: load_elastic_state)"
            )
        same = all(int(state[k]) == v for k, v in (("streams", self.streams), ("batch_size", self.batch_size)))
        self._continue([state], exact=same and int(state["units"]) == self.units)
        self._load_counts(state)

    def load_elastic_state(self, states: list[dict]) -> None:
        """Continue the epoch of ``states`` -- every rank's state of a checkpoint written on another world size,
        in rank order -- at shard granularity. Rank 0 takes the old ranks' corrupt-sample counts summed."""
        for state in states:
            self._check_same(state)
        where = {(s["epoch"], s["batches_done"], s["consumed"]) for s in states}
        if len(where) != 1:
            raise ValueError(f"the ranks' loader states disagree on the data position: {sorted(where)}")
        self._continue(states, exact=False)
        if self.rank == 0:
            counts = [s.get("epoch_corrupt") or [] for s in states]
            fits = all(len(c) == len(self.urls) for c in counts)
            summed = [sum(c) for c in zip(*counts, strict=True)] if fits else None
            self._load_counts({"skipped": sum(int(s["skipped"]) for s in states), "epoch_corrupt": summed})
        else:
            self._load_counts({"skipped": 0, "epoch_corrupt": None})

    def _continue(self, states: list[dict], exact: bool) -> None:
        state = states[0]
        self.set_epoch(int(state["epoch"]))
        done = int(state["batches_done"])
        if done >= int(state["quota"]):
            self._next_epoch()
            return
        if exact:
            self.batches_done, self.quota, self.consumed = done, int(state["quota"]), int(state["consumed"])
            self.plan = Plan(
                self.world_size, self.rank, self.streams, tuple(state["global_skip"]), tuple(state["rank_skip"])
            )
            self.positions = [tuple(p) for p in state["positions"]]
            return
        if int(state["units"]) != self.units:  # the units are cut differently: nothing to continue from
            log.warning(
                "resuming remote shards on another layout that cuts the shards into other units (%d, now %d): "
                "epoch %d's remaining batches are left out, training goes on with epoch %d",
                state["units"],
                self.units,
                self.epoch,
                self.epoch + 1,
            )
            self._next_epoch()
            return
        old_world = int(state["world_size"])
        consumed = int(state["consumed"]) + old_world * done * int(state["batch_size"])
        global_skip = tuple(state["global_skip"])
        if old_world == self.world_size:  # this rank's own units: its positions stay its own
            old = Plan(old_world, self.rank, int(state["streams"]), global_skip, tuple(state["rank_skip"]))
            rank_skip = tuple(sorted(old.done_indices([tuple(p) for p in state["positions"]])))
        else:  # every old rank's finished units leave the epoch; the rest is dealt to the new ranks
            finished = set(global_skip)
            for r, s in enumerate(states):
                old = Plan(old_world, r, int(s["streams"]), global_skip, tuple(s["rank_skip"]))
                finished.update(old.position_of_index(i) for i in old.done_indices([tuple(p) for p in s["positions"]]))
            global_skip, rank_skip = tuple(sorted(finished)), ()
        quota = (self.num_samples - consumed) // (self.world_size * self.batch_size)
        if quota <= 0:
            self._next_epoch()
            return
        self.quota, self.consumed = quota, consumed
        self.plan = Plan(self.world_size, self.rank, self.streams, global_skip, rank_skip)

    def _load_counts(self, state: dict) -> None:
        self.skipped = int(state["skipped"])
        counts = state.get("epoch_corrupt")
        fits = counts is not None and len(counts) == len(self.urls)
        self.epoch_corrupt = [int(n) for n in counts] if fits else [0] * len(self.urls)


# ---------------------------------------------------------------------------------------------
# Evaluation and inference: every image once


class _EvalStream(IterableDataset):
    """This rank's shard URLs, split over the DataLoader's workers (worker k reads the k-th, k + K-th, ...),
    each streamed once in order: one full image per item, None for a corrupt sample."""

    def __init__(self, urls: list[str], num_classes: int):
        self.urls, self.num_classes = urls, num_classes

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for url in self.urls[worker::workers]:
            src = _Shard(url)
            try:
                for raw in tar_samples(src.stream, url):
                    try:
                        if raw.problem is not None:
                            raise CorruptSample(raw.problem)
                        sample = decode_members(
                            raw.key, raw.members, raw.read, with_mask=True, num_classes=self.num_classes
                        )
                    except CorruptSample as e:
                        log.warning("skipping corrupt sample %r in %s: %s", raw.key, url, e)
                        yield None
                        continue
                    yield eval_batch(sample, self.num_classes)
                src.finish()  # a failed download or command is named here
            except OSError as e:
                raise ShardError(f"reading shard {url} failed: {e}") from None
            finally:
                src.abandon()


class RemoteEvalLoader:
    """Full-image batches of shards at URLs (the interface of puzzlecam.data.loader.EvalLoader): rank r streams
    shards r, r + W, ... of the expanded URL list, so every image is read once by one rank (at shard granularity:
    W ranks need at least W shards to all take part). ``len`` and ``num_samples`` come from the
    ``manifest.parquet`` beside the shards (0 and None without one: progress bars then show no total).
    ``num_classes``: the length of ``batch["labels"]`` (default: the dataset of the first sample's json)."""

    def __init__(self, shards, *, num_workers=0, rank=None, world_size=None, pin_memory=None, num_classes=None):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.urls = expand(shards)
        mine = self.urls[self.rank :: self.world_size]
        counts = read_manifests(self.urls)
        self.num_samples = sum(counts[0]) if counts else None
        self._len = sum(counts[0][self.rank :: self.world_size]) if counts else 0
        if num_classes is None:
            first = _peek(self.urls[0])
            try:
                meta = json.loads(first.members["json"])
                num_classes = (sample_dataset(meta) if isinstance(meta, dict) else datasets.DEFAULT).num_classes
            except (KeyError, ValueError):
                num_classes = datasets.DEFAULT.num_classes
        self.num_classes = int(num_classes)
        self.skipped = 0
        self._loader = DataLoader(
            _EvalStream(mine, self.num_classes),
            batch_size=None,
            num_workers=min(num_workers, len(mine)),
            collate_fn=_identity,
            pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        )

    def __len__(self) -> int:
        """This rank's samples by the manifest (0 without one; corrupt ones are skipped, so fewer may come)."""
        return self._len

    def __iter__(self):
        for batch in self._loader:
            if batch is None:
                self.skipped += 1
                continue
            yield batch


# ---------------------------------------------------------------------------------------------
# A loopback HTTP server (tests, the benchmark)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A reader that leaves a shard early (a resume, the quota reached) closes its connection mid-send.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def serve_directory(directory: str | Path) -> Iterator[str]:
    """Serve ``directory`` over HTTP on 127.0.0.1 (a free port) from a thread; yields the base URL
    ``http://127.0.0.1:PORT``. For tests and ``python -m puzzlecam.bench data``."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = _Server(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, name="shard-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


__all__ = [
    "RemoteEvalLoader",
    "RemoteTrainLoader",
    "expand",
    "manifest_url",
    "serve_directory",
    "shard_name",
    "tar_samples",
]
