"""Stage 1, ``task: classification``: the Puzzle-CAM classifier (modes puzzle and baseline).

The step's math is shared by the Trainer (through :class:`ClassificationTask`) and ``python -m
puzzlecam.bench train``; nothing here imports DeepSpeed (the benchmark runs where it is not installed).

Step (docs/method.md): uint8 batch -> normalized images x and their tiles (on the device) ->
A = f(x), A_tiles = f(tile(x)) -> L = L_cls + L_pcls + alpha(t) * L_re. ``baseline`` mode is the
paper's comparison point: L = L_cls, no tile pass.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from puzzlecam import NUM_CLASSES, ops, puzzle
from puzzlecam.config import Config
from puzzlecam.errors import ConfigError
from puzzlecam.tasks import Task


def prepare_inputs(
    images: torch.Tensor, valid: torch.Tensor, n: int, dtype: torch.dtype, channels_last: bool, backend: str
):
    """uint8 (B,H,W,3) on the device -> (normalized x (B,3,H,W), tiles (n*n*B,3,H/n,W/n))."""
    return ops.prepare_inputs(images, valid, n=n, dtype=dtype, channels_last=channels_last, backend=backend)


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
    cams: torch.Tensor, cams_tiles: torch.Tensor | None, labels: torch.Tensor, cfg: Config, alpha: float
) -> StepLosses:
    """L = L_cls + L_pcls + alpha * L_re + conf_weight * L_conf (puzzle) or L_cls (baseline), all in fp32."""
    labels = labels.float()
    if cfg.train.mode == "baseline":
        cls = puzzle.classification_loss(puzzle.gap(cams), labels)
        zero = torch.zeros((), device=cls.device)
        return StepLosses(cls, cls, zero, zero, zero)
    p = cfg.puzzle
    parts = ops.puzzle_losses(
        cams,
        cams_tiles,
        labels,
        n=p.num_pieces,
        level=p.level,
        kind=p.kind,
        reduction=p.re_reduction,
        with_conf=p.conf_weight > 0,
        backend=cfg.train.ops_backend,
    )
    total = parts.cls + parts.pcls + alpha * parts.re
    if p.conf_weight > 0:
        total = total + p.conf_weight * parts.conf
    return StepLosses(total, parts.cls, parts.pcls, parts.re, parts.conf)


def forward_losses(
    net: nn.Module,
    batch: dict,
    cfg: Config,
    alpha: float,
    device: torch.device,
    dtype: torch.dtype,
    channels_last: bool,
) -> StepLosses:
    """Move a loader batch to the device, prepare inputs, run the passes, return the losses."""
    images = batch["image"].to(device, non_blocking=True)
    valid = batch["valid"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    x, tiles = prepare_inputs(images, valid, cfg.puzzle.num_pieces, dtype, channels_last, cfg.train.ops_backend)
    cams, cams_tiles = net(x, tiles if cfg.train.mode == "puzzle" else None)
    return step_losses(cams, cams_tiles, labels, cfg, alpha)


def alpha_for(step: int, total_steps: int, cfg: Config) -> float:
    if cfg.train.mode == "baseline":
        return 0.0
    return puzzle.alpha_at(step, total_steps, cfg.puzzle.alpha_max, cfg.puzzle.alpha_schedule)


class ClassificationTask(Task):
    """The classifier (docs/model.md) trained with the Puzzle-CAM losses (docs/method.md) on image-level labels."""

    name = "classification"

    def check(self) -> None:
        if self.cfg.model.num_classes != NUM_CLASSES:
            raise ConfigError(
                f"model.num_classes={self.cfg.model.num_classes} but the training data's label vectors have "
                f"{NUM_CLASSES} classes (the PASCAL VOC classes the shards hold): set model.num_classes={NUM_CLASSES}"
            )

    def build_network(self) -> nn.Module:
        from puzzlecam.model import build_model

        return PuzzleNet(build_model(self.cfg.model))

    def exported(self, network: nn.Module) -> nn.Module:
        return network.classifier

    def param_groups(self, network: nn.Module) -> list[dict]:
        from puzzlecam.model import param_groups

        return param_groups(network.classifier, self.cfg.optim.lr, self.cfg.optim.weight_decay, keep_empty=False)

    def train_loader(self, rank: int, world_size: int):
        from puzzlecam.data import train_loader

        d, t = self.cfg.data, self.cfg.train
        return train_loader(
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
        )

    def step_values(self, step: int, total_steps: int) -> dict[str, float]:
        return {"alpha": alpha_for(step, total_steps, self.cfg)}

    def losses(self, network, batch, values, device, dtype, channels_last) -> StepLosses:
        return forward_losses(network, batch, self.cfg, values["alpha"], device, dtype, channels_last)

    def export_metadata(self) -> dict[str, str]:
        return {"arch": self.cfg.model.arch}
