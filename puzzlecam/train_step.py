"""The Puzzle-CAM training step's math, shared by the Trainer and ``python -m puzzlecam.bench train``.

Nothing here imports DeepSpeed: the benchmark runs where DeepSpeed is not installed.

Step (docs/method.md): uint8 batch -> normalized images x and their tiles (on the device) ->
A = f(x), A_tiles = f(tile(x)) -> L = L_cls + L_pcls + alpha(t) * L_re. ``baseline`` mode is the
paper's comparison point: L = L_cls, no tile pass.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from . import ops, puzzle
from .config import Config


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


def poly_lr_factor(step: int, total_steps: int, power: float) -> float:
    """Poly decay (1 - t/T)^power, 1 at t=0 and 0 at t=T."""
    return max(0.0, 1.0 - step / max(total_steps, 1)) ** power


def alpha_for(step: int, total_steps: int, cfg: Config) -> float:
    if cfg.train.mode == "baseline":
        return 0.0
    return puzzle.alpha_at(step, total_steps, cfg.puzzle.alpha_max, cfg.puzzle.alpha_schedule)
