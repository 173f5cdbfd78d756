"""Training metrics: ``metrics.jsonl`` while running, ``metrics.parquet`` at the end, one line per step.

Only rank 0 writes. Each line of metrics.jsonl is one JSON object for one logged optimizer step.
On resume the lines for steps after the checkpoint are dropped (they are trained again), so the
file always describes one consistent run. A step with an evaluation carries its ``eval_*`` keys.
:func:`show_step` puts a step's record in the progress bar on a terminal, and logs it as one line
elsewhere (files, CI), with the step out of the total and an ETA (:class:`Eta`), as the bar shows them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from puzzlecam.utils.files import atomic_write, atomic_write_text, json_safe
from puzzlecam.utils.progress import ProgressBar

log = logging.getLogger(__name__)


class MetricsLog:
    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            if self.path.exists():
                self.path.unlink()
        else:
            self.truncate_after(resume_step)
        self._f = open(self.path, "a")

    def truncate_after(self, step: int) -> None:
        """Keep only records with ``step <= step`` (atomic rewrite)."""
        if not self.path.exists():
            return
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def export_parquet(self, path: str | Path | None = None) -> Path:
        out = Path(path) if path is not None else self.path.with_suffix(".parquet")
        rows = read_jsonl(self.path)
        table = pa.Table.from_pylist(rows) if rows else pa.table({"step": pa.array([], pa.int64())})
        return atomic_write(out, lambda f: pq.write_table(table, f))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a torn last line (crash mid-write) is ignored."""
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class Eta:
    """Time left from the pace of this launch's steps so far (evaluations and checkpoints included)."""

    def __init__(self, step: int, total_steps: int):
        self.first_step, self.total_steps = step, total_steps
        self.start = time.monotonic()

    def seconds(self, step: int) -> float | None:
        """Seconds until ``total_steps`` once ``step`` is done; None before this launch's first step."""
        done = step - self.first_step
        if done <= 0:
            return None
        return (time.monotonic() - self.start) / done * (self.total_steps - step)


def duration(seconds: float | None) -> str:
    """``H:MM:SS`` (``-:--:--`` when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def describe(r: dict[str, Any], total_steps: int, eta_s: float | None) -> str:
    """One step's record as the line the trainer shows (users grep it: keep its words)."""
    # Every loss term of the task (stage 1: cls pcls re conf, then alpha; stage 2: bg fg neg), in record order.
    terms = "".join(f"{k[len('loss_') :]} {v:.4f} " for k, v in r.items() if k.startswith("loss_"))
    alpha = f"alpha {r['alpha']:.3f} " if "alpha" in r else ""
    return (
        f"step {r['step']}/{total_steps} loss {r['loss']:.4f} {terms}{alpha}lr {r['lr']:.2e} "
        f"gnorm {r.get('grad_norm', float('nan')):.3g} "
        f"{r['images_per_s']:.1f} img/s eta {duration(eta_s)} "
        f"data-wait {r['data_wait_pct']:.0f}% skipped {r['skipped_samples']} bad-steps {r['skipped_steps']}"
    )


def describe_evaluation(r: dict[str, Any], score: str, best: dict[str, Any]) -> str:
    """An evaluation's line: its metrics (mIoU in percent) and the best so far."""

    def shown(key: str, value: Any) -> str:
        if "miou" in key:
            return f"{100 * value:.2f}%"
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    keys = [k for k in r if k.startswith("eval_") and not k.startswith("eval_best_")]
    parts = " ".join(f"{k[len('eval_') :]} {shown(k, r[k])}" for k in keys)
    return f"evaluation at step {r['step']}: {parts}; best {shown(score, best[score])} at step {best['step']}"


def show_step(
    bar: ProgressBar, step: int, record: dict[str, Any] | None, total_steps: int, eta_s: float | None
) -> None:
    """Move the bar to ``step``; a record (a logged step) goes into the bar's text when it is drawn,
    else into the log as one line."""
    if bar.live:
        bar.update(step, info=describe(record, total_steps, eta_s) if record is not None else None)
    elif record is not None:
        log.info("%s", describe(record, total_steps, eta_s))
