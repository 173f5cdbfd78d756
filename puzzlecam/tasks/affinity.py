"""Stage 2, ``task: affinity``: AffinityNet's edge head trained on affinity labels (docs/training.md, "Tasks").

Step: uint8 batch -> normalized images (zero where padded) -> edge logits at stride 4 -> sigmoid ->
``puzzlecam.affinity.affinity_loss`` against the label map resized to the edge map's size by nearest
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
from puzzlecam.affinity import AffinityLosses, affinity_loss
from puzzlecam.errors import ConfigError
from puzzlecam.tasks import Task

log = logging.getLogger(__name__)


def label_at(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) integer label maps -> (B, h, w) int64 by nearest neighbour at pixel centres
    (``nearest-exact``: PIL's NEAREST, which the original resizes its labels with)."""
    small = F.interpolate(label[:, None].float(), size=size, mode="nearest-exact")
    return small[:, 0].long()


def edge_losses(
    network: nn.Module,
    batch: dict,
    radius: int,
    device: torch.device,
    dtype: torch.dtype,
    channels_last: bool,
    backend: str,
) -> AffinityLosses:
    """The affinity losses of one loader batch (see the module doc), fp32."""
    if "label" not in batch:
        raise ConfigError(
            "task affinity trains on labelled shards (a label.png per sample) but data.train_shards has none: "
            "make them with python -m puzzlecam.data label-shards (docs/data.md)"
        )
    images = batch["image"].to(device, non_blocking=True)
    valid = batch["valid"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    x, _ = ops.prepare_inputs(images, valid, n=1, dtype=dtype, channels_last=channels_last, backend=backend)
    edge = torch.sigmoid(network(x).float())
    return affinity_loss(edge, label_at(label, tuple(edge.shape[-2:])), radius=radius, backend=backend)


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

    def losses(self, network, batch, values, device, dtype, channels_last) -> AffinityLosses:
        return edge_losses(
            network, batch, self.cfg.affinity.radius, device, dtype, channels_last, self.cfg.train.ops_backend
        )

    def export_metadata(self) -> dict[str, str]:
        return {"arch": self.cfg.model.arch, "radius": str(self.cfg.affinity.radius)}
