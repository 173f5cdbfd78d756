"""Tasks: what each stage of the pipeline trains; the one Trainer (puzzlecam.train) runs any of them.

A Task owns what differs between stages (docs/training.md, "Tasks"): the network DeepSpeed wraps and the
part of it that is exported, its parameter groups, its training data, the values a step depends on
(logged with the step), the step's named losses (the first, ``total``, is the one backpropagated) and,
optionally, its evaluation (``evaluate``; None: the task has none). The Trainer owns the rest: process
group, DeepSpeed engine, precision, the poly schedule, accumulation, clipping, bad steps, checkpoints,
when to evaluate and the best weights, metrics, TensorBoard, export.

A step's losses come in three parts (docs/training.md, "The compiled step"): :meth:`Task.step_inputs` moves
the batch to the device (eager); :meth:`Task.local_terms` is everything that follows, input preparation, the
network's passes and the loss terms of this rank's micro-batch, a function of tensors only, which
:class:`StepModule` hands to DeepSpeed and ``train.compile`` compiles as one graph (``fullgraph=True``);
:meth:`Task.reduce_terms` finishes the losses (the collectives that normalize by global counts, eager).

``task: classification`` is stage 1 (modes puzzle and baseline), ``affinity`` stage 2 (AffinityNet's
edge head), ``segmentation`` stage 3 (DeepLabv3+ on pseudo-labels or, as an upper bound, the masks).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

from puzzlecam.config import Config
from puzzlecam.datasets import Dataset
from puzzlecam.errors import ConfigError, PuzzleCamError
from puzzlecam.utils.distributed import all_reduce_sum, raise_if_any_rank_failed

# task name -> "module:class", imported on use.
TASKS = {
    "classification": "puzzlecam.tasks.classification:ClassificationTask",
    "affinity": "puzzlecam.tasks.affinity:AffinityTask",
    "segmentation": "puzzlecam.tasks.segmentation:SegmentationTask",
}


class Evaluation(NamedTuple):
    """One in-training evaluation, the same on every rank (its sums are all-reduced)."""

    metrics: dict[str, float]  # logged with the step; keys start with "eval_" (eval_miou, ...)
    score: str  # the key of ``metrics`` that picks the best weights (higher is better)
    # Rank 0: a few figures of fixed evaluation images for TensorBoard, tag -> (H, W, 3) uint8; else empty.
    images: dict[str, np.ndarray]


class Task(ABC):
    name: ClassVar[str]
    # evaluate(network, device, channels_last, rank, world_size) -> Evaluation: the exported network
    # scored on the task's evaluation data, this rank's share, the sums all-reduced (a collective: every
    # rank calls it). The Trainer calls it in eval mode, without gradients, under training's autocast.
    # None: the task has no evaluation (train.eval_every must be 0).
    evaluate: ClassVar[Callable[..., Evaluation] | None] = None
    # The shards' member that becomes batch["label"] (puzzlecam.data.TrainLoader's label_member).
    label_member: str = "label.png"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._eval = None  # the evaluation loader, made on first use

    def check(self) -> None:  # noqa: B027 (a hook with nothing to check by default)
        """Refuse settings this task cannot train, before anything starts (a ConfigError naming the key)."""

    def outputs(self, dataset: Dataset) -> int | None:
        """The model.num_classes this task needs on ``dataset``'s samples (None: it does not depend on them)."""
        return None

    # Why the task needs outputs(dataset) (ends the ConfigError's first sentence).
    outputs_reason: ClassVar[str] = ""

    def check_outputs(self, dataset: Dataset | None = None) -> None:
        """model.num_classes must be :meth:`outputs` of the dataset data.train_shards hold (their samples' json
        names it: puzzlecam.datasets; ``dataset`` where the caller has read it, as the training loader does); a
        ConfigError naming the dataset and the value to set otherwise. Before training, remote shards are not
        opened here: their loader's first sample is checked when it is built."""
        from puzzlecam.datasets import of_shards

        dataset = dataset if dataset is not None else of_shards(self.cfg.data.train_shards)
        need = None if dataset is None else self.outputs(dataset)
        if need is not None and self.cfg.model.num_classes != need:
            raise ConfigError(
                f"model.num_classes={self.cfg.model.num_classes} but data.train_shards={self.cfg.data.train_shards} "
                f"hold {dataset.name.upper()} samples: {self.outputs_reason} {need}. Set model.num_classes={need} "
                "(the configs coco_*.yaml do for COCO)"
            )

    @abstractmethod
    def build_network(self) -> nn.Module:
        """The module DeepSpeed wraps, initialized (pretrained weights loaded); built on the CPU."""

    @abstractmethod
    def exported(self, network: nn.Module) -> nn.Module:
        """The part of ``network`` that ``model.safetensors`` holds (and whose state is checked finite)."""

    @abstractmethod
    def param_groups(self, network: nn.Module) -> list[dict]:
        """Optimizer groups, each with ``lr``, ``weight_decay``, ``name`` and ``lr_scale`` (the multiplier
        of the base learning rate that the poly schedule keeps)."""

    def train_loader(self, rank: int, world_size: int) -> Any:
        """This rank's training loader (puzzlecam.data.TrainLoader: len, epoch, state_dict, load_state_dict);
        by default the augmented crops of data.train_shards (with batch["label"] where the shards carry
        ``label_member``)."""
        from puzzlecam.data import train_loader
        from puzzlecam.datasets import with_classes

        d, t = self.cfg.data, self.cfg.train
        loader = train_loader(
            d.train_shards,
            batch_size=t.micro_batch_size,
            crop_size=d.crop_size,
            seed=t.seed,
            num_workers=d.num_workers,
            min_long_side=d.min_long_side,
            max_long_side=d.max_long_side,
            hflip=d.hflip,
            shuffle_buffer=d.shuffle_buffer,
            rank=rank,
            world_size=world_size,
            label_member=self.label_member,
            samples_per_epoch=d.samples_per_epoch or None,
        )
        self.check_outputs(with_classes(loader.num_classes))  # the data's classes, remote shards' too
        return loader

    def step_values(self, step: int, total_steps: int) -> dict[str, float]:
        """Values the step at ``step`` depends on besides the learning rate (logged with it)."""
        return {}

    @abstractmethod
    def step_inputs(self, batch: dict, values: dict[str, float], device: torch.device) -> tuple[torch.Tensor, ...]:
        """The tensors :meth:`local_terms` takes: the loader batch's on ``device``, each step value a 0-d fp32
        tensor (a tensor, not a float, so that a compiled step is not recompiled when it changes)."""

    @abstractmethod
    def local_terms(
        self, network: nn.Module, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype, channels_last: bool
    ) -> tuple[torch.Tensor, ...]:
        """This rank's loss terms of one micro-batch from :meth:`step_inputs`: input preparation, the network's
        passes, the terms. Tensors in, tensors out, no collective and no host synchronization (it is compiled as
        one graph under ``train.compile``); ``dtype`` is the autocast dtype the inputs are prepared in."""

    @abstractmethod
    def reduce_terms(self, terms: tuple[torch.Tensor, ...]) -> NamedTuple:
        """The step's named losses (fp32 scalars; the first field is ``total``) from :meth:`local_terms`' terms:
        what needs the other ranks (global counts) happens here, eagerly."""

    def losses(self, step: Callable[..., tuple[torch.Tensor, ...]], batch: dict, values: dict[str, float], device):
        """The named losses of one loader batch; ``step`` is the DeepSpeed engine over the :class:`StepModule`
        (or the StepModule itself)."""
        return self.reduce_terms(step(*self.step_inputs(batch, values, device)))

    def export_metadata(self) -> dict[str, str]:
        """Text metadata stored in ``model.safetensors`` besides the step."""
        return {}

    def eval_loader(self, rank: int, world_size: int):
        """This rank's share of data.eval_shards (samples r, r + W, ...; one full image per batch), indexed once
        per run."""
        if self._eval is None:
            from puzzlecam.data import eval_loader

            self._eval = eval_loader(
                self.cfg.data.eval_shards, num_workers=self.cfg.data.num_workers, rank=rank, world_size=world_size
            )
        return self._eval

    def sum_over_masked_images(
        self, score: Callable[[dict], torch.Tensor], size: int, device: torch.device, rank: int, world_size: int
    ) -> tuple[torch.Tensor, int, int]:
        """``score(batch)`` (``size`` int64 counts of one image) summed over this rank's images of
        data.eval_shards that have a mask, then over the ranks (a collective: every rank calls it). Returns
        (sums, images scored, corrupt samples skipped), the same on every rank. A PuzzleCamError on any rank (a
        mask with values out of range, say) is raised on every rank, so none waits; no image with a mask at all
        is a ConfigError."""
        failed = None
        sums = torch.zeros(size + 2, dtype=torch.long)
        try:
            loader = self.eval_loader(rank, world_size)
            skipped_before = loader.skipped
            for batch in loader:
                if not bool(batch["has_mask"][0]):
                    continue  # nothing to score
                sums[:-2] += score(batch).flatten().cpu()
                sums[-2] += 1
            sums[-1] = loader.skipped - skipped_before  # corrupt samples (each one is a warning)
        except PuzzleCamError as e:
            failed = e
        raise_if_any_rank_failed(failed)
        sums = all_reduce_sum(sums.to(device)).cpu()
        scored, skipped = int(sums[-2]), int(sums[-1])
        if scored == 0:
            raise ConfigError(
                f"data.eval_shards={self.cfg.data.eval_shards} holds no sample with a mask: nothing to evaluate "
                "(give shards of a split with masks, or set train.eval_every=0)"
            )
        return sums[:-2], scored, skipped


class StepModule(nn.Module):
    """The module DeepSpeed wraps: one call is :meth:`Task.local_terms` of the network, the whole step up to the
    losses. :meth:`compile_step` compiles exactly that (not the module call: DeepSpeed's forward hooks, timers
    and all, stay eager around it).

    Its state dict is the network's, keys unchanged (no ``network.`` prefix): checkpoints stay those of the
    network alone."""

    def __init__(self, task: Task, network: nn.Module, dtype: torch.dtype, channels_last: bool):
        super().__init__()
        self.network = network
        self.task = task
        self.dtype = dtype
        self.channels_last = channels_last
        self._terms = self.terms
        self._register_state_dict_hook(_drop_network_prefix)
        self.register_load_state_dict_pre_hook(_add_network_prefix)

    def terms(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.task.local_terms(self.network, inputs, self.dtype, self.channels_last)

    def compile_step(self, backend: str = "inductor", **options) -> None:
        """From now on, run the step through ``torch.compile(self.terms, backend=backend, **options)``."""
        self._terms = torch.compile(self.terms, backend=backend, **options)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._terms(*inputs)


_PREFIX = "network."


def _renamed(mapping, prefix: str, old: str, new: str) -> None:
    """Rename the keys of ``mapping`` that start with prefix + old to start with prefix + new, in order."""
    for key in [k for k in mapping if k.startswith(prefix + old) and not (new and k.startswith(prefix + new))]:
        mapping[prefix + new + key[len(prefix + old) :]] = mapping.pop(key)


def _drop_network_prefix(module, state_dict, prefix, local_metadata):
    _renamed(state_dict, prefix, _PREFIX, "")
    metadata = getattr(state_dict, "_metadata", None)  # per-module versions, keyed by module path
    if metadata is not None:
        _renamed(metadata, prefix, _PREFIX, "")


def _add_network_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    _renamed(state_dict, prefix, "", _PREFIX)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        _renamed(metadata, prefix, "", _PREFIX)


def build_task(cfg: Config) -> Task:
    """The Task of ``cfg.task`` (the config has refused the ones that do not exist yet)."""
    module_name, class_name = TASKS[cfg.task].split(":")
    task = getattr(importlib.import_module(module_name), class_name)(cfg)
    task.check()
    return task
