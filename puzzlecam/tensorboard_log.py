"""TensorBoard event files of a training run: ``{run_dir}/tensorboard/`` (docs/training.md, "TensorBoard").

Rank 0 writes every metrics record as scalars, tagged ``train/<key>`` (``train/loss``, ``train/lr``,
...) and ``eval/<key>`` for the evaluation's ``eval_<key>`` (``eval/miou``, ``eval/best_miou``, ...),
and at each evaluation the Task's figures (CAM overlays of fixed evaluation images) as images. A
resumed run purges the events after its checkpoint's step (they are trained again), as metrics.jsonl
drops its lines. ``train.tensorboard: false`` writes none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

DIRECTORY = "tensorboard"
_NOT_SCALARS = ("step", "time")


def scalar_tag(key: str) -> str:
    """The TensorBoard tag of a metrics key: ``eval_miou`` -> ``eval/miou``, ``loss`` -> ``train/loss``."""
    return f"eval/{key[len('eval_') :]}" if key.startswith("eval_") else f"train/{key}"


class TensorBoardLog:
    def __init__(self, run_dir: str | Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(run_dir) / DIRECTORY
        # purge_step hides the events of the steps a resume trains again (those after the checkpoint).
        purge_step = resume_step + 1 if resume_step is not None else None
        self._writer = SummaryWriter(str(self.path), purge_step=purge_step)

    def scalars(self, record: dict[str, Any]) -> None:
        """Every number of a metrics record (non-finite ones too: TensorBoard shows them) at its step."""
        step = int(record["step"])
        for key, value in record.items():
            if key not in _NOT_SCALARS and isinstance(value, (int, float)):  # bool too: bad_step is 0 or 1
                self._writer.add_scalar(scalar_tag(key), float(value), step)

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """(H, W, 3) uint8 figures by tag; flushed, so that a running TensorBoard shows them."""
        for tag, image in images.items():
            self._writer.add_image(tag, image, step, dataformats="HWC")
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
