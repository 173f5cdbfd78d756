"""Stage 2, ``task: affinity``: AffinityNet's edge head trained on affinity labels (docs/training.md, "Tasks").

Step: uint8 batch -> normalized images (zero where padded) -> edge logits at stride 4 -> sigmoid ->
``puzzlecam.affinity.affinity_loss`` (``ops.affinity_sums`` in the compiled step, then the normalization)
against the label map resized to the edge map's size by nearest
neighbour (the pixel nearest each output pixel's centre, as the original's PIL resize of the 512 crop to
128), pairs of ``affinity.radius``. The loss normalizes each term by the pair counts summed over the
ranks, so N processes with B/N images each give the loss and gradient of one process with B images.
Only the edge head trains (one parameter group at the configured learning rate); there is no
in-training evaluation.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from puzzlecam import ops
from puzzlecam.affinity import AffinityLosses, normalized_losses
from puzzlecam.errors import ConfigError
from puzzlecam.tasks import Task

log = logging.getLogger(__name__)


def label_at(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) integer label maps -> (B, h, w) int64 by nearest neighbour at pixel centres
    (``nearest-exact``: PIL's NEAREST, which the original resizes its labels with)."""
    small = F.interpolate(label[:, None].float(), size=size, mode="nearest-exact")
    return small[:, 0].long()


def batch_inputs(batch: dict, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(images, valid, label) of a loader batch on ``device``."""
    if "label" not in batch:
        raise ConfigError(
            "task affinity trains on labelled shards (a label.png per sample) but data.train_shards has none: "
            "make them with python -m puzzlecam.data label-shards (docs/data.md)"
        )
    return tuple(batch[k].to(device, non_blocking=True) for k in ("image", "valid", "label"))


def edge_sums(
    network: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    radius: int,
    dtype: torch.dtype,
    channels_last: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (sums, counts) of the affinity loss (see the module doc) from :func:`batch_inputs`."""
    images, valid, label = inputs
    x, _ = ops.prepare_inputs(images, valid, 1, dtype, channels_last, backend=backend)
    logits = network(x)
    with torch.autocast(logits.device.type, enabled=False):
        edge = torch.sigmoid(logits.float())
        return ops.affinity_sums(edge, label_at(label, tuple(edge.shape[-2:])), radius, backend=backend)


class AffinityTask(Task):
    """AffinityNet (docs/model.md, "AffinityNet") trained with the affinity loss (docs/affinity.md)."""

    name = "affinity"

    def check(self) -> None:
        if not self.cfg.model.pretrained:
            log.warning(
                "model.pretrained is not set: the frozen backbone keeps random weights, and only the edge head "
                "trains on them (the method uses ImageNet weights)"
            )

    def build_network(self) -> nn.Module:
        from puzzlecam.model import build_affinity_net

        return build_affinity_net(self.cfg.model)

    def exported(self, network: nn.Module) -> nn.Module:
        return network

    def param_groups(self, network: nn.Module) -> list[dict]:
        o = self.cfg.optim
        return [
            {
                "params": network.head_parameters(),
                "lr": o.lr,
                "weight_decay": o.weight_decay,
                "name": "edge_head",
                "lr_scale": 1.0,
            }
        ]

    def step_inputs(self, batch, values, device):
        return batch_inputs(batch, device)

    def local_terms(self, network, inputs, dtype, channels_last):
        return edge_sums(network, inputs, self.cfg.affinity.radius, dtype, channels_last, self.cfg.train.ops_backend)

    def reduce_terms(self, terms) -> AffinityLosses:
        return normalized_losses(*terms)

    def export_metadata(self) -> dict[str, str]:
        return {"arch": self.cfg.model.arch, "radius": str(self.cfg.affinity.radius)}
