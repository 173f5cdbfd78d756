"""The Puzzle-CAM training step's math, shared by the Trainer and ``python -m puzzlecam.bench train``.

Nothing here imports DeepSpeed: the benchmark runs where DeepSpeed is not installed.

Step (design.md §3): uint8 batch -> normalized images x and their tiles (on the device) ->
A = f(x), A_tiles = f(tile(x)) -> L = L_cls + L_pcls + alpha(t) * L_re. ``baseline`` mode is the
paper's comparison point: L = L_cls, no tile pass.
"""

from __future__ import annotations

import importlib.util
from typing import NamedTuple

import torch
from torch import nn

from . import puzzle
from .config import Config

# ImageNet statistics (RGB, 0..1 scale); equal to puzzlecam.data.IMAGENET_MEAN / IMAGENET_STD.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def puzzle_ops():
    """The op implementations the step uses: ``puzzlecam.ops`` (fused kernels with dispatch), or the
    pure-torch reference while puzzlecam.ops is not present. The one place that chooses."""
    if importlib.util.find_spec("puzzlecam.ops") is not None:
        from . import ops

        return ops
    return _ReferenceOps


class _ReferenceOps:
    """puzzlecam.puzzle behind the ops signatures (``backend`` ignored)."""

    @staticmethod
    def prepare_inputs(images, valid, n=2, dtype=torch.float32, channels_last=False, backend="auto"):
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        x = (images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        h, w = x.shape[2:]
        rows = torch.arange(h, device=x.device).view(1, 1, h, 1) < valid[:, 0].view(-1, 1, 1, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, 1, w) < valid[:, 1].view(-1, 1, 1, 1)
        x = (x * (rows & cols)).to(dtype)
        tiles = puzzle.tile(x, n)
        if channels_last:
            x, tiles = x.contiguous(memory_format=torch.channels_last), tiles.contiguous(memory_format=torch.channels_last)
        return x, tiles

    @staticmethod
    def puzzle_losses(cam, cam_tiles, labels, n=2, level="feature", kind="l1", masking=True, backend="auto"):
        return puzzle.puzzle_losses(cam, cam_tiles, labels, n=n, level=level, kind=kind, masking=masking)


def prepare_inputs(images: torch.Tensor, valid: torch.Tensor, n: int, dtype: torch.dtype, channels_last: bool, backend: str):
    """uint8 (B,H,W,3) on the device -> (normalized x (B,3,H,W), tiles (n*n*B,3,H/n,W/n))."""
    return puzzle_ops().prepare_inputs(images, valid, n=n, dtype=dtype, channels_last=channels_last, backend=backend)


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


def step_losses(cams: torch.Tensor, cams_tiles: torch.Tensor | None, labels: torch.Tensor, cfg: Config, alpha: float) -> StepLosses:
    """L = L_cls + L_pcls + alpha * L_re (puzzle) or L_cls (baseline), all in fp32."""
    labels = labels.float()
    if cfg.train.mode == "baseline":
        cls = puzzle.classification_loss(puzzle.gap(cams), labels)
        zero = torch.zeros((), device=cls.device)
        return StepLosses(cls, cls, zero, zero)
    p = cfg.puzzle
    parts = puzzle_ops().puzzle_losses(
        cams, cams_tiles, labels, n=p.num_pieces, level=p.level, kind=p.kind, masking=p.masking, backend=cfg.train.ops_backend
    )
    total = parts.cls + parts.pcls + alpha * parts.re
    return StepLosses(total, parts.cls, parts.pcls, parts.re)


def forward_losses(net: nn.Module, batch: dict, cfg: Config, alpha: float, device: torch.device, dtype: torch.dtype, channels_last: bool) -> StepLosses:
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
