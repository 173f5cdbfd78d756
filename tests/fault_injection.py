"""The crash-recovery test hook, and a training entry that installs it (tests only; not a test file).

``PUZZLECAM_FAULT_KILL="step=N[,rank=R][,phase=step|save]"`` SIGKILLs rank R (default 0) right after
optimizer step N (phase ``step``, the default) or in the middle of the checkpoint save of step N, once
its files are written and before COMPLETE (phase ``save``). It fires once per run directory (a marker
file ``.fault_fired_rank{R}`` remembers it), so the resumed run goes on.

``PUZZLECAM_FAULT_NAN="step=N"`` makes the losses of the first micro-batch after optimizer step N NaN (the
skip path of a bad step), in eager and compiled steps alike.

``python tests/fault_injection.py ARGS`` (or under torchrun / deepspeed) is ``launch/train.py ARGS``
with the hook installed through the Trainer's hooks (puzzlecam.train.Hook).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, as launch/train.py

ENV = "PUZZLECAM_FAULT_KILL"
NAN_ENV = "PUZZLECAM_FAULT_NAN"


class FaultInjection:
    def __init__(self, spec: str):
        try:
            fields = dict(item.split("=", 1) for item in spec.split(","))
            self.step, self.rank = int(fields["step"]), int(fields.get("rank", 0))
        except (ValueError, KeyError):
            raise ValueError(f"{ENV}={spec!r}: expected step=N[,rank=R][,phase=step|save]") from None
        self.phase = fields.get("phase", "step")

    def __call__(self, trainer, event: str, step: int) -> None:
        if (event, step, trainer.dist.rank) != (self.phase, self.step, self.rank):
            return
        marker = trainer.run_dir / f".fault_fired_rank{self.rank}"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(step))
        os.kill(os.getpid(), signal.SIGKILL)


class NanInjection:
    def __init__(self, spec: str):
        try:
            self.step = int(dict(item.split("=", 1) for item in spec.split(","))["step"])
        except (ValueError, KeyError):
            raise ValueError(f"{NAN_ENV}={spec!r}: expected step=N") from None

    def __call__(self, trainer, event: str, step: int) -> None:
        if (event, step) != ("step", self.step):
            return
        task = trainer.task
        reduce_terms = task.reduce_terms

        def poisoned_once(terms):
            task.reduce_terms = reduce_terms
            losses = reduce_terms(terms)
            return type(losses)(*(v * float("nan") for v in losses))

        task.reduce_terms = poisoned_once


if __name__ == "__main__":
    from puzzlecam import train

    hooks = []
    if os.environ.get(ENV):
        hooks.append(FaultInjection(os.environ[ENV]))
    if os.environ.get(NAN_ENV):
        hooks.append(NanInjection(os.environ[NAN_ENV]))
    sys.exit(train.main(hooks=hooks))
