"""Stage 1, ``task: classification``: the Puzzle-CAM classifier (modes puzzle and baseline).

The step's math is shared by the Trainer (through :class:`ClassificationTask`) and ``python -m
puzzlecam.bench train``; nothing here imports DeepSpeed (the benchmark runs where it is not installed).

Step (docs/method.md): uint8 batch -> normalized images x and their tiles (on the device) ->
A = f(x), A_tiles = f(tile(x)) -> L = L_cls + L_pcls + alpha(t) * L_re. ``baseline`` mode is the
paper's comparison point: L = L_cls, no tile pass.

Evaluation (docs/training.md, "Evaluation during training"), as the original training loop's: per image
of ``data.eval_shards`` with a mask, the single-scale CAMs of its labelled classes (make_cam at the CAM
grid), the mask resized to that grid by nearest neighbour, the threshold sweep 0.10..0.45 (step 0.05) of
puzzlecam.evaluate; the confusions are summed over ranks; the score is the best threshold's mIoU.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from puzzlecam import ops, puzzle
from puzzlecam.config import Config
from puzzlecam.errors import ConfigError
from puzzlecam.puzzle import PuzzleSpec
from puzzlecam.tasks import Evaluation, Task

# The original's thresholds: np.arange(0.10, 0.50, 0.05).
EVAL_THRESHOLDS = "0.10:0.45:0.05"
# Images of rank 0's share shown as CAM overlays in TensorBoard (the first ones with a mask: fixed).
OVERLAY_IMAGES = 4


class PuzzleNet(nn.Module):
    """Both forward passes of a step in one module call (DeepSpeed expects one forward per backward).

    The two passes stay separate network calls, as in the reference method: BatchNorm sees the full
    images and the tiles as two batches.
    """

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor, tiles: torch.Tensor | None = None):
        _, cams = self.classifier(x)
        cams_tiles = self.classifier(tiles)[1] if tiles is not None else None
        return cams, cams_tiles


class StepLosses(NamedTuple):
    total: torch.Tensor  # fp32 scalar, the one backward goes through
    cls: torch.Tensor
    pcls: torch.Tensor
    re: torch.Tensor
    conf: torch.Tensor  # the Shannon-entropy term (0 unless puzzle.conf_weight > 0)


def step_losses(
    cams: torch.Tensor, cams_tiles: torch.Tensor | None, labels: torch.Tensor, cfg: Config, alpha: torch.Tensor | float
) -> StepLosses:
    """L = L_cls + L_pcls + alpha * L_re + conf_weight * L_conf (puzzle) or L_cls (baseline), all in fp32."""
    labels = labels.float()
    if cfg.train.mode == "baseline":
        cls = puzzle.classification_loss(puzzle.gap(cams), labels)
        zero = torch.zeros((), device=cls.device)
        return StepLosses(cls, cls, zero, zero, zero)
    p = cfg.puzzle
    parts = ops.puzzle_losses(cams, cams_tiles, labels, PuzzleSpec.from_config(p), backend=cfg.train.ops_backend)
    total = parts.cls + parts.pcls + alpha * parts.re
    if p.conf_weight > 0:
        total = total + p.conf_weight * parts.conf
    return StepLosses(total, parts.cls, parts.pcls, parts.re, parts.conf)


def batch_inputs(batch: dict, alpha: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(images, valid, labels, alpha) of a loader batch on ``device`` (alpha a 0-d fp32 tensor)."""
    return (
        batch["image"].to(device, non_blocking=True),
        batch["valid"].to(device, non_blocking=True),
        batch["labels"].to(device, non_blocking=True),
        torch.tensor(alpha, dtype=torch.float32, device=device),
    )


def local_losses(
    net: nn.Module, inputs: tuple[torch.Tensor, ...], cfg: Config, dtype: torch.dtype, channels_last: bool
) -> StepLosses:
    """The step from :func:`batch_inputs`: normalized images and tiles, the passes, the losses (fp32, autocast off)."""
    images, valid, labels, alpha = inputs
    x, tiles = ops.prepare_inputs(
        images, valid, cfg.puzzle.num_pieces, dtype, channels_last, backend=cfg.train.ops_backend
    )
    cams, cams_tiles = net(x, tiles if cfg.train.mode == "puzzle" else None)
    with torch.autocast(cams.device.type, enabled=False):
        return step_losses(cams, cams_tiles, labels, cfg, alpha)


def image_cams(network: nn.Module, image: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The network's raw class maps (1, C, h, w), fp32, of one uint8 image (1, H, W, 3) at its own size."""
    from puzzlecam.data import IMAGENET_MEAN, IMAGENET_STD
    from puzzlecam.infer import normalize

    mean = torch.tensor(IMAGENET_MEAN, device=image.device)
    std = torch.tensor(IMAGENET_STD, device=image.device)
    x = normalize(image, tuple(image.shape[1:3]), mean, std)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # A non-finite activation (fp16 overflow) counts as none: one image cannot stop the evaluation.
    return network(x)[1].float().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def cam_grid_sweep(raw: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """The (T, C+1, C+1) confusions of one image at the CAM grid, as the original loop scores it.

    ``raw`` (C, h, w) class maps, ``keys`` (K,) the labelled channels, ``mask`` (H, W) the ground truth
    (0..C, 255 ignored): make_cam of the labelled classes, the mask resized to (h, w) by nearest neighbour.
    """
    from puzzlecam.evaluate import confusion_sweep

    cams = puzzle.make_cam(raw[None])[0, keys]
    small = F.interpolate(mask[None, None].float(), size=tuple(raw.shape[-2:]), mode="nearest")[0, 0]
    return confusion_sweep(cams.cpu(), keys.cpu() + 1, small.long().cpu(), thresholds, raw.shape[0] + 1)


def overlay(image_id: str, image: np.ndarray, raw: torch.Tensor, keys: torch.Tensor, mask, threshold: float):
    """puzzlecam.viz's row (image | heat map per labelled class | pseudo-label | ground truth) of one image's
    single-scale CAMs, upsampled as inference does; (H, W, 3) uint8."""
    from puzzlecam.camstore import CamRecord
    from puzzlecam.datasets import with_classes
    from puzzlecam.viz import overlay_row

    cam, hr_cam = puzzle.multiscale_cam([raw], None, keys, tuple(image.shape[:2]))
    record = CamRecord(image_id, keys.cpu().numpy(), cam.cpu().numpy(), hr_cam.cpu().numpy())
    dataset = with_classes(raw.shape[0])  # the network's classes name its CAMs
    classes = dataset.classes if dataset is not None else ()
    return np.asarray(overlay_row(image_id, image, record, mask, threshold, height=128, classes=classes))


def check_split_attention_batch(cfg: Config) -> None:
    """ResNeSt's split-attention bn1 normalizes a pooled (B, C, 1, 1) input: batch statistics need more than
    one image per norm, and the full-image pass holds train.micro_batch_size of them per process
    (docs/model.md, "Normalization")."""
    from puzzlecam.model import RESNEST_ARCHS

    m, micro_batch = cfg.model, cfg.train.micro_batch_size
    if m.arch not in RESNEST_ARCHS or micro_batch > 1 or m.norm == "frozen":
        return
    world_size = launch_world_size()
    if m.norm == "sync" and world_size > 1:
        return  # the statistics of world_size images
    alone = " on one process (where it is plain batch norm)" if m.norm == "sync" else ""
    raise ConfigError(
        f"model.arch={m.arch} with model.norm={m.norm}{alone} cannot train on train.micro_batch_size=1: its "
        "split-attention blocks batch-normalize a pooled (B, C, 1, 1) input, one value per channel for one "
        "image. Set model.norm=frozen, or model.norm=sync with more than one process, or train.micro_batch_size "
        "of 2 or more (with train.grad_accum_steps lowered to keep train.global_batch_size)"
    )


def launch_world_size() -> int:
    """The launcher's world size (WORLD_SIZE; 1 under plain python): the process group does not exist yet."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def alpha_for(step: int, total_steps: int, cfg: Config) -> float:
    if cfg.train.mode == "baseline":
        return 0.0
    return puzzle.alpha_at(step, total_steps, cfg.puzzle.alpha_max, cfg.puzzle.alpha_schedule)


class ClassificationTask(Task):
    """The classifier (docs/model.md) trained with the Puzzle-CAM losses (docs/method.md) on image-level labels."""

    name = "classification"
    outputs_reason = "the classifier has one output per class,"

    def outputs(self, dataset):
        return dataset.num_classes

    def check(self) -> None:
        self.check_outputs()
        check_split_attention_batch(self.cfg)

    def build_network(self) -> nn.Module:
        from puzzlecam.model import build_model

        return PuzzleNet(build_model(self.cfg.model))

    def exported(self, network: nn.Module) -> nn.Module:
        return network.classifier

    def param_groups(self, network: nn.Module) -> list[dict]:
        from puzzlecam.model import param_groups

        return param_groups(network.classifier, self.cfg.optim.lr, self.cfg.optim.weight_decay, keep_empty=False)

    def step_values(self, step: int, total_steps: int) -> dict[str, float]:
        return {"alpha": alpha_for(step, total_steps, self.cfg)}

    def step_inputs(self, batch, values, device):
        return batch_inputs(batch, values["alpha"], device)

    def local_terms(self, network, inputs, dtype, channels_last):
        return tuple(local_losses(network, inputs, self.cfg, dtype, channels_last))

    def reduce_terms(self, terms) -> StepLosses:
        return StepLosses(*terms)

    def export_metadata(self) -> dict[str, str]:
        return {"arch": self.cfg.model.arch}

    def evaluate(self, network, device, channels_last, rank, world_size) -> Evaluation:
        """mIoU of the CAMs on data.eval_shards at the best of the original's thresholds (see the module doc)."""
        from puzzlecam.evaluate import miou, parse_thresholds

        thresholds = parse_thresholds(EVAL_THRESHOLDS)
        num_labels = self.cfg.model.num_classes + 1  # the background and the classes
        shown = []

        def score(batch: dict) -> torch.Tensor:
            raw = image_cams(network, batch["image"].to(device), channels_last)[0]
            keys = batch["labels"][0].nonzero().flatten().to(raw.device)
            mask = batch["mask"][0]
            if rank == 0 and len(shown) < OVERLAY_IMAGES:
                shown.append((batch["id"][0], batch["image"][0].numpy(), raw.cpu(), keys.cpu(), mask.numpy()))
            return cam_grid_sweep(raw, keys, mask.to(raw.device), thresholds)

        size = len(thresholds) * num_labels * num_labels
        sums, scored, skipped = self.sum_over_masked_images(score, size, device, rank, world_size)
        means, _ = miou(sums.reshape(len(thresholds), num_labels, num_labels))
        best = int(torch.nan_to_num(means, nan=-1.0).argmax())  # the first of equal ones, as the original
        metrics = {
            "eval_miou": float(means[best]),
            "eval_threshold": thresholds[best],
            "eval_images": scored,
            "eval_skipped": skipped,
        }
        images = {f"cam/{i}": overlay(*item, thresholds[best]) for i, item in enumerate(shown)}
        return Evaluation(metrics, "eval_miou", images)
