"""Stage 3, ``task: segmentation``: DeepLabv3+ trained on pseudo-labels (docs/training.md, "Segmentation").

Data: the augmented crops of data.train_shards with a label map per image, the same geometry as the image
(nearest neighbour; 255 where the crop is padded): ``segmentation.labels: label`` reads the ``label.png``
that ``python -m puzzlecam.data label-shards`` adds (the pseudo-labels), ``mask`` the shards' ground-truth
``seg.png`` (an upper bound, and tests).

Step: uint8 batch -> normalized images (zero where padded) -> logits (B, C, H, W) at the crop size (the
network under training's autocast) -> cross entropy in fp32 over the pixels whose label is not 255. The
loss is normalized by the labelled pixels of the global batch (all ranks): ``W * local sum / global
count``, so that DeepSpeed's gradient averaging gives N processes with B/N images each the loss and
gradient of one process with B images (the original's one CrossEntropyLoss over its whole batch).
Parameter groups: the original's four (backbone x1 / x2, head x10 / x20).

Evaluation: every image of data.eval_shards with a mask, at its own size, single scale, one image per
forward (the sizes differ; padding images into a batch would change the image-pooling branch's mean): the
argmax of the logits against the mask, one (C, C) pixel confusion summed over the images and the ranks;
the score is its mIoU.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from puzzlecam import ops
from puzzlecam.errors import ConfigError
from puzzlecam.tasks import Evaluation, Task
from puzzlecam.tasks.classification import OVERLAY_IMAGES, check_split_attention_batch, launch_world_size
from puzzlecam.utils.distributed import all_reduce_sum
from puzzlecam.utils.labelmap import IGNORE_INDEX

log = logging.getLogger(__name__)

# The member of each sample that trains the network, by segmentation.labels.
LABEL_MEMBERS = {"label": "label.png", "mask": "seg.png"}


class SegmentationLosses(NamedTuple):
    total: torch.Tensor  # fp32 scalar: the pixel cross entropy (the only term)


def pixel_cross_entropy(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross entropy of ``logits`` (B, C, H, W) against ``label`` (B, H, W) int64 over the pixels whose label is
    not 255, in fp32, divided by the count of those pixels in the global batch (all ranks) and multiplied by
    the world size W: under DeepSpeed's gradient averaging the mean over the global batch's labelled pixels
    (see the module doc). No labelled pixel anywhere gives 0. :func:`normalized_loss` of :func:`pixel_sums`."""
    return normalized_loss(*pixel_sums(logits, label))


def pixel_sums(logits: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the summed fp32 cross entropy over this rank's labelled pixels, their count as fp32)."""
    summed = F.cross_entropy(logits.float(), label, ignore_index=IGNORE_INDEX, reduction="sum")
    return summed, (label != IGNORE_INDEX).sum().to(summed.dtype)


def normalized_loss(summed: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """W * summed / (the count summed over the W ranks, at least 1)."""
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world > 1:
        count = all_reduce_sum(count.detach().clone())
    return world * summed / count.clamp_min(1)


def batch_inputs(batch: dict, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(images, valid, label) of a loader batch (with ``label``) on ``device``."""
    return tuple(batch[k].to(device, non_blocking=True) for k in ("image", "valid", "label"))


def local_sums(
    network: nn.Module, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype, channels_last: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's :func:`pixel_sums` from :func:`batch_inputs`: normalized images, logits, the summed loss."""
    images, valid, label = inputs
    x, _ = ops.prepare_inputs(images, valid, 1, dtype, channels_last, backend=backend)
    logits = network(x)
    with torch.autocast(logits.device.type, enabled=False):
        return pixel_sums(logits, label)


def predicted_labels(network: nn.Module, batch: dict, device: torch.device, channels_last: bool, backend: str):
    """The argmax of the network's logits of an evaluation batch (one uint8 image at its own size), (1, H, W)."""
    images = batch["image"].to(device)
    valid = batch["valid"].to(device)
    x, _ = ops.prepare_inputs(images, valid, 1, torch.float32, channels_last, backend=backend)
    return network(x).float().argmax(1)


class SegmentationTask(Task):
    """DeepLabv3+ (docs/model.md, "DeepLabv3+") trained with the pixel cross entropy (see the module doc)."""

    name = "segmentation"
    outputs_reason = "the label maps hold the background and every class,"

    def outputs(self, dataset):
        return dataset.num_labels

    def __init__(self, cfg):
        super().__init__(cfg)
        self.label_member = LABEL_MEMBERS[cfg.segmentation.labels]

    def check(self) -> None:
        m, t = self.cfg.model, self.cfg.train
        self.check_outputs()
        check_split_attention_batch(self.cfg)
        head_norm = self.cfg.segmentation.head_norm
        alone = head_norm == "batch" or head_norm == "sync" and launch_world_size() == 1
        if t.micro_batch_size == 1 and alone:
            raise ConfigError(
                f"segmentation.head_norm={head_norm} cannot train on train.micro_batch_size=1 with one image per "
                "batch norm: the ASPP's image-pooling branch batch-normalizes a pooled (1, C, 1, 1) input, one value "
                "per channel. Set segmentation.head_norm=group (the original's), or sync with more than one "
                "process, or train.micro_batch_size of 2 or more"
            )
        if not m.pretrained:
            log.warning(
                "model.pretrained is not set: the backbone starts from random weights (the method starts it from "
                "ImageNet weights)"
            )

    def build_network(self) -> nn.Module:
        from puzzlecam.model import build_deeplab

        network = build_deeplab(self.cfg.model, self.cfg.segmentation)
        if not self.cfg.segmentation.dropout:
            for module in network.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        return network

    def exported(self, network: nn.Module) -> nn.Module:
        return network

    def param_groups(self, network: nn.Module) -> list[dict]:
        from puzzlecam.model import param_groups

        return param_groups(network, self.cfg.optim.lr, self.cfg.optim.weight_decay, keep_empty=False)

    def train_loader(self, rank: int, world_size: int):
        loader = super().train_loader(rank, world_size)
        if loader.with_labels:
            return loader
        shards = self.cfg.data.train_shards
        if self.cfg.segmentation.labels == "label":
            raise ConfigError(
                f"segmentation.labels=label trains on the label.png of labelled shards, but no sample of "
                f"data.train_shards={shards} has one. Make them from the random-walk store: python -m "
                "puzzlecam.labels --cams RW_DIR --threshold 0.35 --crf --crf-iters 1 --shards SHARDS --out LABELS, "
                "then python -m puzzlecam.data label-shards --shards SHARDS --labels LABELS --out DIR and train on "
                "DIR (docs/data.md); or set segmentation.labels=mask to train on the shards' ground-truth masks"
            )
        raise ConfigError(
            f"segmentation.labels=mask trains on the ground-truth seg.png of each sample, but no sample of "
            f"data.train_shards={shards} has one: give shards of a split with masks, or set "
            "segmentation.labels=label with labelled shards (python -m puzzlecam.data label-shards)"
        )

    def step_inputs(self, batch, values, device):
        return batch_inputs(batch, device)

    def local_terms(self, network, inputs, dtype, channels_last):
        return local_sums(network, inputs, dtype, channels_last, self.cfg.train.ops_backend)

    def reduce_terms(self, terms) -> SegmentationLosses:
        return SegmentationLosses(normalized_loss(*terms))

    def export_metadata(self) -> dict[str, str]:
        s = self.cfg.segmentation
        return {"arch": self.cfg.model.arch, "num_classes": str(self.cfg.model.num_classes), "labels": s.labels}

    def evaluate(self, network, device, channels_last, rank, world_size) -> Evaluation:
        """Pixel mIoU of the single-scale predictions on data.eval_shards' masks (see the module doc)."""
        from puzzlecam.evaluate import confusion_from_labels, miou
        from puzzlecam.viz import segmentation_row

        classes = self.cfg.model.num_classes
        shown = []

        def score(batch: dict) -> torch.Tensor:
            prediction = predicted_labels(network, batch, device, channels_last, self.cfg.train.ops_backend)[0].cpu()
            mask = batch["mask"][0]
            if rank == 0 and len(shown) < OVERLAY_IMAGES:
                shown.append((batch["id"][0], batch["image"][0].numpy(), prediction.numpy(), mask.numpy()))
            return confusion_from_labels(prediction, mask, num_labels=classes)[0]

        confusion, scored, skipped = self.sum_over_masked_images(score, classes * classes, device, rank, world_size)
        mean, _ = miou(confusion.reshape(classes, classes))
        metrics = {"eval_miou": mean, "eval_images": scored, "eval_skipped": skipped}
        images = {f"segmentation/{i}": np.asarray(segmentation_row(*item, height=128)) for i, item in enumerate(shown)}
        return Evaluation(metrics, "eval_miou", images)
