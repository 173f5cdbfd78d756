"""Training and evaluation loaders over tar shards (batch layout: docs/data.md).

The epoch's sample order is derived, not streamed: every process indexes the shards' tar headers,
then computes the same seeded permutation of all samples for (seed, epoch), pads it by wrap-around
to a multiple of the world size and gives rank r the positions r, r + W, r + 2W, ... So every rank
has the same number of samples and batches (no collective can hang at the epoch end), however few
shards there are and however many ranks and workers read them.

Batch k of an epoch is a pure function of (seed, epoch, rank, world size, k): a DataLoader worker
decodes and augments the whole batch, each sample with an RNG seeded from (seed, epoch, its global
position), and the DataLoader returns batches in index order. The batches are therefore identical
for any number of workers and any scheduling, and resuming at batch k (``load_state_dict``) only
has to start the index sequence at k: nothing before it is read.

Global slot s of an epoch holds sample ``order[s mod N]`` whatever the world size, and after k
batches of B on W ranks exactly the slots below k*B*W are used. A resume on another world size or
micro-batch (an elastic resume, docs/training.md) therefore continues the epoch at that global
position P: the rest of the order, from P, is split as a fresh epoch is (padded by wrap-around to a
multiple of the new world size W', rank r' taking slots P + r', P + r' + W', ..., whole batches
only), so no sample of the epoch is repeated or skipped beyond what that rule does at an epoch's end.

In labelled shards (``label.png`` beside the ``jpg``, python -m puzzlecam.data label-shards) every batch
also holds ``label`` (B, crop, crop) int64: each label map with its image's geometry (the same draw;
nearest-neighbour resizing), 255 where the image is padded. ``label_member="seg.png"`` makes the
ground-truth masks that label instead (stage 3's upper bound). The draws do not depend on the label, so
the images of a batch are the same with or without labels.

A sample that cannot be decoded (bad JPEG/PNG, missing json, labels out of range) is skipped and
counted; in training its place in the batch goes to the next decodable sample of the rank's order
(wrapping around), so batches keep their size. Training counts them per shard and per epoch too
(``TrainLoader.epoch_corrupt``), for the trainer's bound on their fraction (docs/training.md).

The image-label vector has one entry per class of the shards' dataset (``num_classes``; by default the one the
first sample's json names, puzzlecam.datasets: VOC's 20 where none). Shards given as URLs (``pipe:...``,
``http(s)://...``) are streamed instead: :func:`train_loader` returns a puzzlecam.data.remote loader with the
same interface.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from puzzlecam.data.augment import apply_geometry, draw_geometry
from puzzlecam.data.shards import (
    LABEL_KEY,
    SampleRef,
    ShardReader,
    decode_sample,
    first_dataset,
    index_shards,
    is_url,
    resolve_shards,
)
from puzzlecam.errors import CorruptSample, ShardError
from puzzlecam.utils.labelmap import IGNORE_INDEX

log = logging.getLogger(__name__)

# The members a training batch's ``label`` can come from: the label maps of labelled shards, or the masks.
LABEL_MEMBERS = (LABEL_KEY, "seg.png")


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        dist = torch.distributed
        initialized = dist.is_available() and dist.is_initialized()
        if rank is None:
            rank = dist.get_rank() if initialized else 0
        if world_size is None:
            world_size = dist.get_world_size() if initialized else 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size


def _open(shards) -> tuple[ShardReader, list[SampleRef]]:
    paths = resolve_shards(shards)
    refs, warnings = index_shards(paths)
    for w in warnings:
        log.warning(w)
    return ShardReader(paths), refs


def _num_classes(num_classes: int | None, reader: ShardReader, refs: list[SampleRef]) -> int:
    """``num_classes`` as given, else the class count of the dataset the first sample's json names."""
    if num_classes is None:
        return first_dataset(reader, refs).num_classes
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def is_remote(shards) -> bool:
    """Whether ``shards`` (a pattern, path or list) names URLs (streamed) rather than local files (indexed);
    a list mixing both is a ShardError."""
    items = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    urls = [is_url(i) for i in items]
    if any(urls) and not all(urls):
        raise ShardError(f"shards mix URLs and local paths: {items[urls.index(True)]!r}, {items[urls.index(False)]!r}")
    return bool(urls) and all(urls)


_warned: set[tuple[int, str]] = set()


def _warn_corrupt(reader: ShardReader, ref: SampleRef, error: Exception) -> None:
    """Log a corrupt sample once per process (it comes back every epoch)."""
    if (ref.shard, ref.key) not in _warned:
        _warned.add((ref.shard, ref.key))
        log.warning("skipping corrupt sample %r in %s: %s", ref.key, reader.paths[ref.shard], error)


def epoch_order(shard_of: np.ndarray, seed: int, epoch: int, shuffle_buffer: int) -> np.ndarray:
    """The epoch's order of sample indices (before the split across ranks).

    ``shuffle_buffer <= 0``: a uniform permutation of all samples. ``> 0``: shards in a seeded
    order, then samples shuffled within consecutive windows of that many samples (mostly sequential
    reads, for storage where seeks are expensive).
    """
    rng = np.random.default_rng([seed, epoch])
    n = len(shard_of)
    if shuffle_buffer <= 0 or shuffle_buffer >= n:
        return rng.permutation(n)
    shard_rank = np.argsort(rng.permutation(int(shard_of.max()) + 1))
    order = np.argsort(shard_rank[shard_of], kind="stable")
    for start in range(0, n, shuffle_buffer):
        rng.shuffle(order[start : start + shuffle_buffer])
    return order


def positions_per_rank(num_samples: int, start: int, world_size: int) -> int:
    """Each rank's positions in an epoch's slots from ``start`` on: the rest of the order padded by
    wrap-around to a multiple of the world size (``start`` 0: a whole epoch)."""
    return math.ceil((num_samples - start) / world_size)


def _seed_check(seed: int) -> int:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


# ---------------------------------------------------------------------------------------------
# Training


class _TrainBatches(Dataset):
    """Item (epoch, k) = batch k of that epoch for one rank, decoded and augmented."""

    def __init__(
        self,
        reader,
        refs,
        *,
        rank,
        world_size,
        batch_size,
        crop_size,
        seed,
        min_long_side,
        max_long_side,
        hflip,
        shuffle_buffer,
        label_member,
        num_classes,
    ):
        self.reader, self.refs = reader, refs
        self.num_classes = num_classes
        self.shard_of = np.array([r.shard for r in refs], dtype=np.int64)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.crop_size, self.seed, self.hflip = crop_size, seed, hflip
        self.min_long_side, self.max_long_side = min_long_side, max_long_side
        self.shuffle_buffer = shuffle_buffer
        # Labelled shards (python -m puzzlecam.data label-shards, or seg.png with label_member="seg.png"): every
        # sample's label map goes into the batch; shards where no sample has one give batches without.
        self.label_member = label_member if any(label_member in r.members for r in refs) else None
        self.with_labels = self.label_member is not None
        self._order_of = (-1, -1, None)  # (epoch, start, this rank's sample indices)

    def per_rank(self, start: int) -> int:
        return positions_per_rank(len(self.refs), start, self.world_size)

    def batches(self, start: int) -> int:
        """Whole batches of each rank in the epoch's slots from ``start`` on (0: a whole epoch)."""
        return self.per_rank(start) // self.batch_size

    def rank_order(self, epoch: int, start: int) -> np.ndarray:
        """Sample indices of this rank for the epoch's slots from ``start`` (position i has global slot
        start + rank + i * W; slot s holds sample order[s mod N]: wrap-around padding)."""
        if self._order_of[:2] != (epoch, start):
            order = epoch_order(self.shard_of, self.seed, epoch, self.shuffle_buffer)
            slots = start + self.rank + self.world_size * np.arange(self.per_rank(start))
            self._order_of = (epoch, start, order[slots % len(order)])
        return self._order_of[2]

    def __getitem__(self, item):
        epoch, start, k = item
        mine = self.rank_order(epoch, start)
        per_rank = len(mine)
        B = self.batch_size
        # numpy buffers: copying uint8 images into a torch tensor slice is many times slower.
        images = np.zeros((B, self.crop_size, self.crop_size, 3), dtype=np.uint8)
        valid = np.zeros((B, 2), dtype=np.int64)
        labels = np.zeros((B, self.num_classes), dtype=np.float32)
        label_maps = np.full((B, self.crop_size, self.crop_size), IGNORE_INDEX, np.uint8) if self.with_labels else None
        ids, corrupt_shards = [], []
        for b in range(B):
            pos = k * B + b
            slot = start + self.rank + pos * self.world_size
            rng = np.random.default_rng([self.seed, epoch, slot])
            # Corrupt sample: take the next ones of this rank's order (wrapping) until one decodes.
            for attempt in range(per_rank):
                i = pos if attempt == 0 else ((k + 1) * B + attempt - 1) % per_rank
                ref = self.refs[mine[i]]
                try:
                    sample = decode_sample(
                        self.reader, ref, with_mask=False, label_member=self.label_member, num_classes=self.num_classes
                    )
                    break
                except CorruptSample as e:
                    # Counted at its own slot only, so the count = corrupt samples met in the order.
                    if attempt == 0:
                        corrupt_shards.append(ref.shard)
                    _warn_corrupt(self.reader, ref, e)
            else:
                raise ShardError(f"rank {self.rank}: no decodable sample among its {per_rank} samples")
            geometry = draw_geometry(
                sample.image.shape[:2], rng, self.crop_size, self.min_long_side, self.max_long_side, self.hflip
            )
            apply_geometry(sample.image, geometry, Image.BICUBIC, images[b])
            if label_maps is not None:  # the image's geometry, nearest, on the 255 canvas
                apply_geometry(sample.label, geometry, Image.NEAREST, label_maps[b])
            valid[b] = geometry.valid
            labels[b, sample.labels] = 1.0
            ids.append(sample.key)
        batch = {
            "image": torch.from_numpy(images),
            "valid": torch.from_numpy(valid),
            "labels": torch.from_numpy(labels),
            "id": ids,
            "corrupt_shards": corrupt_shards,
        }
        if label_maps is not None:
            batch["label"] = torch.from_numpy(label_maps).long()
        return batch


class _BatchIndices:
    """Sampler yielding (epoch, segment start slot, k) for k in [first, stop); reset before every pass.
    The items carry everything a batch depends on: persistent workers keep their copy of the dataset."""

    def __init__(self):
        self.epoch, self.segment_start, self.first, self.stop = 0, 0, 0, 0

    def __iter__(self):
        return iter([(self.epoch, self.segment_start, k) for k in range(self.first, self.stop)])

    def __len__(self):
        return self.stop - self.first


def _identity(x):
    return x


def check_loader_args(batch_size, crop_size, min_long_side, max_long_side, num_workers, label_member) -> None:
    """The settings every training loader (local or streamed) refuses with a ValueError naming them."""
    if batch_size < 1 or crop_size < 1:
        raise ValueError(f"batch_size ({batch_size}) and crop_size ({crop_size}) must be positive")
    if not 1 <= min_long_side <= max_long_side:
        raise ValueError(f"need 1 <= min_long_side ({min_long_side}) <= max_long_side ({max_long_side})")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if label_member not in LABEL_MEMBERS:
        raise ValueError(f"label_member must be one of {LABEL_MEMBERS}, got {label_member!r}")


class TrainLoader:
    """Iterating yields the remaining batches of the current epoch, then the epoch counter advances.

    ``label_member``: the map that becomes ``batch["label"]`` where the shards carry it: ``label.png``
    (labelled shards) or ``seg.png`` (the ground-truth masks); :attr:`with_labels` says whether they do.
    ``num_classes``: the length of ``batch["labels"]`` (default: the dataset of the first sample's json).

    ``len(loader)`` is the number of batches per epoch, the same on every rank. ``skipped`` counts
    the corrupt samples this rank has skipped so far; ``epoch_corrupt`` those of the epoch of the
    newest batch, per shard (``shard_paths``); both are restored by ``load_state_dict``.
    ``load_elastic_state`` continues an epoch saved on another world size or batch size.
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
    ):
        check_loader_args(batch_size, crop_size, min_long_side, max_long_side, num_workers, label_member)
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.seed, self.batch_size = _seed_check(seed), batch_size
        reader, refs = _open(shards)
        self.num_samples = len(refs)
        self.num_classes = _num_classes(num_classes, reader, refs)
        self.shard_paths = [Path(p) for p in reader.paths]
        self._data = _TrainBatches(
            reader,
            refs,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=batch_size,
            crop_size=crop_size,
            seed=self.seed,
            min_long_side=min_long_side,
            max_long_side=max_long_side,
            hflip=hflip,
            shuffle_buffer=shuffle_buffer,
            label_member=label_member,
            num_classes=self.num_classes,
        )
        if self._data.batches(0) == 0:
            raise ShardError(
                f"{self.num_samples} samples over {self.world_size} rank(s) give {self._data.per_rank(0)} per rank, "
                f"fewer than batch_size={batch_size}: no full batch"
            )
        self._fingerprint = hashlib.sha1("\n".join(r.key for r in refs).encode()).hexdigest()
        self._indices = _BatchIndices()
        self._loader = DataLoader(
            self._data,
            batch_size=None,
            sampler=self._indices,
            num_workers=num_workers,
            collate_fn=_identity,
            persistent_workers=num_workers > 0,
            pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
            multiprocessing_context="fork" if num_workers > 0 and "fork" in _start_methods() else None,
        )
        self.epoch, self.batches_done, self.skipped = 0, 0, 0
        # Where this rank's batches of the epoch begin: slot 0, or the global position an elastic resume
        # continued the epoch at (batches_done counts from there).
        self.segment_start = 0
        self.epoch_corrupt = [0] * len(self.shard_paths)

    def __len__(self) -> int:
        return self._data.batches(0)

    @property
    def with_labels(self) -> bool:
        """Whether batches hold ``label``: some sample of the shards has the ``label_member`` map."""
        return self._data.with_labels

    @property
    def position(self) -> int:
        """Global slots of the current epoch used so far (by every rank together)."""
        return self.segment_start + self.batches_done * self.batch_size * self.world_size

    def __iter__(self):
        if self.batches_done >= self._data.batches(self.segment_start):
            self._next_epoch()
        if self.batches_done == 0 and self.segment_start == 0:
            self.epoch_corrupt = [0] * len(self.shard_paths)
        indices = self._indices
        indices.epoch, indices.segment_start = self.epoch, self.segment_start
        indices.first, indices.stop = self.batches_done, self._data.batches(self.segment_start)
        for batch in self._loader:
            for shard in batch.pop("corrupt_shards"):
                self.epoch_corrupt[shard] += 1
                self.skipped += 1
            self.batches_done += 1
            yield batch
        self._next_epoch()

    def _next_epoch(self) -> None:
        self.epoch, self.segment_start, self.batches_done = self.epoch + 1, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.segment_start, self.batches_done = int(epoch), 0, 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "segment_start": self.segment_start,
            "position": self.position,
            "skipped": self.skipped,
            "epoch_corrupt": list(self.epoch_corrupt),
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "fingerprint": self._fingerprint,
        }

    def _check_same(self, state: dict, keys: tuple[str, ...], needs: str) -> None:
        mine = self.state_dict()
        for key in keys:
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"loader state: {key} is {state.get(key)!r} in the checkpoint but {mine[key]!r} now; {needs}"
                )

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where this rank's ``state`` left off (the same world size and batch size)."""
        self._check_same(
            state,
            ("seed", "world_size", "batch_size", "num_samples", "fingerprint"),
            "exact resume needs the same shards, seed, batch size and world size",
        )
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        self.segment_start = int(state.get("segment_start", 0))  # older checkpoints: always 0
        self._load_counts(state)

    def load_elastic_state(self, states: list[dict]) -> None:
        """Continue the epoch of ``states`` -- every rank's state of a checkpoint written on another world
        size or batch size, in rank order -- at their common global position (module docstring); an epoch
        they had finished is followed by the next. Rank 0 takes the old ranks' corrupt-sample counts summed
        and the others start at 0, so that the counts summed over the ranks carry on."""
        positions = {(s["epoch"], s.get("segment_start", 0), s["batches_done"]) for s in states}
        if len(positions) != 1:
            raise ValueError(f"the ranks' loader states disagree on the data position: {sorted(positions)}")
        state = states[0]
        self._check_same(state, ("seed", "num_samples", "fingerprint"), "a resume needs the same shards and seed")
        world_size, batch_size = int(state["world_size"]), int(state["batch_size"])
        start, done = int(state.get("segment_start", 0)), int(state["batches_done"])
        self.epoch = int(state["epoch"])
        if done >= positions_per_rank(self.num_samples, start, world_size) // batch_size:
            self._next_epoch()
        else:
            self.segment_start, self.batches_done = start + done * batch_size * world_size, 0
        if self.rank == 0:
            counts = [s.get("epoch_corrupt") for s in states]
            known = all(c is not None and len(c) == len(self.shard_paths) for c in counts)
            summed = [sum(c) for c in zip(*counts, strict=True)] if known else None
            self._load_counts({"skipped": sum(int(s["skipped"]) for s in states), "epoch_corrupt": summed})
        else:
            self._load_counts({"skipped": 0, "epoch_corrupt": None})

    def _load_counts(self, state: dict) -> None:
        self.skipped = int(state["skipped"])
        # A checkpoint older than the per-shard counts, or of the same samples cut into other shards:
        # the epoch's count starts again.
        counts = state.get("epoch_corrupt")
        fits = counts is not None and len(counts) == len(self.shard_paths)
        self.epoch_corrupt = [int(n) for n in counts] if fits else [0] * len(self.shard_paths)


def _start_methods():
    import multiprocessing

    return multiprocessing.get_all_start_methods()


def train_loader(shards, *, samples_per_epoch=None, streams=None, **options):
    """Training batches from shards: local ones (a brace/glob pattern, a directory or a list; see
    :class:`TrainLoader`) or URLs (``pipe:...``, ``http(s)://...``: streamed through webdataset, see
    puzzlecam.data.remote.RemoteTrainLoader; ``samples_per_epoch`` and ``streams`` only apply to those).
    ``options``: the keyword arguments both loaders take (batch_size, crop_size, seed, num_workers, ...)."""
    if is_remote(shards):
        from puzzlecam.data.remote import RemoteTrainLoader

        return RemoteTrainLoader(shards, samples_per_epoch=samples_per_epoch, streams=streams, **options)
    if samples_per_epoch is not None or streams is not None:
        raise ValueError("samples_per_epoch and streams are for remote shards (URLs); local shards are indexed")
    return TrainLoader(shards, **options)


# ---------------------------------------------------------------------------------------------
# Evaluation


def eval_batch(s, num_classes: int) -> dict:
    """One decoded sample as an evaluation batch: the full uint8 image, its size, its label vector, id and mask
    (255 everywhere where it has none)."""
    h, w = s.image.shape[:2]
    labels = torch.zeros(1, num_classes, dtype=torch.float32)
    labels[0, s.labels] = 1.0
    has_mask = s.mask is not None
    mask = torch.from_numpy(s.mask) if has_mask else torch.full((h, w), IGNORE_INDEX, dtype=torch.uint8)
    return {
        "image": torch.from_numpy(np.ascontiguousarray(s.image))[None],
        "valid": torch.tensor([[h, w]]),
        "labels": labels,
        "id": [s.key],
        "mask": mask[None],
        "has_mask": torch.tensor([has_mask]),
    }


class _EvalSamples(Dataset):
    def __init__(self, reader, refs, num_classes):
        self.reader, self.refs, self.num_classes = reader, refs, num_classes

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, i):
        ref = self.refs[i]
        try:
            s = decode_sample(self.reader, ref, with_mask=True, num_classes=self.num_classes)
        except CorruptSample as e:
            _warn_corrupt(self.reader, ref, e)
            return None
        return eval_batch(s, self.num_classes)


class EvalLoader:
    """One full image per batch; rank r gets samples r, r + W, ... of the shards' order (none twice).
    ``num_classes``: the length of ``batch["labels"]`` (default: the dataset of the first sample's json)."""

    def __init__(self, shards, *, num_workers=0, rank=None, world_size=None, pin_memory=None, num_classes=None):
        self.rank, self.world_size = _rank_world(rank, world_size)
        reader, refs = _open(shards)
        self.num_samples = len(refs)
        self.num_classes = _num_classes(num_classes, reader, refs)
        self.skipped = 0
        self._data = _EvalSamples(reader, refs[self.rank :: self.world_size], self.num_classes)
        self._loader = DataLoader(
            self._data,
            batch_size=None,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=_identity,
            pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        )

    def __len__(self) -> int:
        """Samples of this rank (corrupt ones are skipped, so an epoch can yield fewer)."""
        return len(self._data)

    def __iter__(self):
        for batch in self._loader:
            if batch is None:
                self.skipped += 1
                continue
            yield batch


def eval_loader(shards, *, num_workers=0, rank=None, world_size=None, pin_memory=None, num_classes=None):
    """Full-image evaluation batches with masks: local shards (:class:`EvalLoader`) or URLs streamed through
    webdataset (puzzlecam.data.remote.RemoteEvalLoader: rank r reads shards r, r + W, ...)."""
    if is_remote(shards):
        from puzzlecam.data.remote import RemoteEvalLoader as loader_class
    else:
        loader_class = EvalLoader
    return loader_class(
        shards,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        pin_memory=pin_memory,
        num_classes=num_classes,
    )


__all__ = ["EvalLoader", "TrainLoader", "epoch_order", "eval_loader", "is_remote", "train_loader"]
