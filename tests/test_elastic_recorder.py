"""A training entry that records the samples each rank trains on (tests only; no tests here).

``python tests/test_elastic_recorder.py ARGS`` (or under torchrun / deepspeed) is ``launch/train.py ARGS``;
every batch a rank's loader yields is appended to ``$PUZZLECAM_RECORD_DIR/rank{R}.jsonl`` as
``{"epoch": E, "world_size": W, "ids": [...]}`` before the trainer uses it. tests/test_elastic.py reads
them to check which samples an epoch interrupted on one world size and finished on another saw.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, as launch/train.py

RECORD_DIR = "PUZZLECAM_RECORD_DIR"


def install() -> None:
    from puzzlecam.data.loader import TrainLoader

    iterate = TrainLoader.__iter__

    def recording(loader):
        record = Path(os.environ[RECORD_DIR]) / f"rank{loader.rank}.jsonl"
        for batch in iterate(loader):
            with open(record, "a") as f:
                f.write(json.dumps({"epoch": loader.epoch, "world_size": loader.world_size, "ids": batch["id"]}) + "\n")
            yield batch

    TrainLoader.__iter__ = recording


if __name__ == "__main__":
    from puzzlecam import train

    install()
    sys.exit(train.main())
