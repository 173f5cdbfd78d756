"""Training metrics: ``metrics.jsonl`` while running, ``metrics.parquet`` at the end, a progress line.

Only rank 0 writes. Each line of metrics.jsonl is one JSON object for one logged optimizer step.
On resume the lines for steps after the checkpoint are dropped (they are trained again), so the
file always describes one consistent run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def _clean(v: Any) -> Any:
    # JSON has no NaN/Inf: write them as null (the step was skipped and is counted anyway).
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


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
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def export_parquet(self, path: str | Path | None = None) -> Path:
        out = Path(path) if path is not None else self.path.with_suffix(".parquet")
        rows = read_jsonl(self.path)
        table = pa.Table.from_pylist(rows) if rows else pa.table({"step": pa.array([], pa.int64())})
        tmp = out.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp)
        tmp.replace(out)
        return out


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


class Progress:
    """Rank 0's live progress line (rich), or plain log lines when output is not a terminal."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self._progress = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import (
            Progress as RichProgress,
        )

        console = Console(stderr=True)
        if not console.is_terminal:
            # Logs (files, CI): one unwrapped line per logged step.
            self._console = Console(stderr=True, width=400, soft_wrap=True)
            return
        from rich.table import Column

        self._progress = RichProgress(
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            # The stats wrap onto a second line in narrow terminals instead of being cut off.
            TextColumn("{task.fields[info]}", table_column=Column(no_wrap=False, overflow="fold", ratio=1)),
            console=console,
            expand=True,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, info="")
        self._progress.start()

    @staticmethod
    def describe(r: dict[str, Any]) -> str:
        return (
            f"step {r['step']} loss {r['loss']:.4f} cls {r['loss_cls']:.4f} pcls {r['loss_pcls']:.4f} "
            f"re {r['loss_re']:.4f} alpha {r['alpha']:.3f} lr {r['lr']:.2e} "
            f"gnorm {r.get('grad_norm', float('nan')):.3g} "
            f"{r['images_per_s']:.1f} img/s "
            f"data-wait {r['data_wait_pct']:.0f}% skipped {r['skipped_samples']} bad-steps {r['skipped_steps']}"
        )

    def update(self, step: int, record: dict[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        if self._progress is None:
            if record is not None:
                self._console.print(self.describe(record), highlight=False)
            return
        fields = {"info": self.describe(record)} if record is not None else {}
        self._progress.update(self._task, completed=step, **fields)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
