"""Running a pipeline of commands resumably: the stage record shared by ``puzzlecam.pipeline`` and
``puzzlecam.demo`` (docs/pipeline.md, "Resuming and rerunning").

A stage is one command (a training launch, an inference, an evaluation). It is reused only when the record
(``RUN/stages.json``) holds its current fingerprint as finished and its output is there; one recorded as
started with the same fingerprint (interrupted, or failed) runs again on its output, which lets training
resume from its newest checkpoint; any other stage has its outputs removed first and runs from scratch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from puzzlecam.errors import StageError, UsageError
from puzzlecam.utils.files import atomic_write_json
from puzzlecam.utils.net import free_port

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
TRAIN_ENTRY = REPO / "launch" / "train.py"
STAGE_RECORD = "stages.json"
LAUNCHERS = ("deepspeed", "torchrun", "python")

console = Console(width=max(110, shutil.get_terminal_size((110, 24)).columns))


def console_script(name: str) -> str:
    """A console script of this interpreter's environment (deepspeed, torchrun)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise UsageError(f"cannot find the '{name}' command next to {sys.executable} or on PATH; run `make install`")
    return found


def fingerprint(obj) -> str:
    """A hash of JSON-able settings (key order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def threads_env(procs: int, threads: int = 0) -> dict[str, str]:
    """``OMP_NUM_THREADS`` for ``procs`` processes sharing this machine: ``threads`` each, or cores / procs
    (torch's default, every core in every process, oversubscribes the cores several times over)."""
    return {"OMP_NUM_THREADS": str(threads or max(1, (os.cpu_count() or 2) // max(1, procs)))}


def launch_command(launcher: str, procs: int, entry: Sequence[str], module: bool = False) -> list[str]:
    """``entry`` (a script and its arguments, or with ``module`` a ``-m`` module and its arguments) started as
    ``procs`` processes on this machine by ``launcher`` (deepspeed | torchrun | python = one process), each
    launch on a free loopback port."""
    if launcher not in LAUNCHERS:
        raise UsageError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    entry = list(entry)
    if launcher == "python" or (procs == 1 and module):
        return [sys.executable, "-m", *entry] if module else [sys.executable, *entry]
    if launcher == "deepspeed" and not module:
        port = ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
        return [console_script("deepspeed"), "--num_gpus", str(procs), *port, *entry]
    # torchrun; also deepspeed's choice for inference modules, which deepspeed's launcher cannot start with -m
    rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    return [console_script("torchrun"), "--nproc-per-node", str(procs), *rdzv, *(["-m"] if module else []), *entry]


def run_logged(title: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> float:
    """Run one command, showing it and its output live and keeping a copy in ``log_path``; returns its seconds;
    a failure raises StageError naming the log."""
    console.rule(f"[bold]{title}")
    console.print("$ " + shlex.join(cmd), style="dim", soft_wrap=True, markup=False, highlight=False)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(  # in the caller's directory: relative paths mean what they meant to the user
            cmd,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            sys.stdout.write(line)
        rc = proc.wait()
    if rc != 0:
        raise StageError(f"stage '{title}' failed with exit code {rc}; full output in {log_path}")
    return time.monotonic() - start


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


@dataclass
class Stage:
    """One step of a pipeline: ``cmd`` run unless its recorded run can be reused.

    ``complete()`` says whether its output is there; ``outputs`` are removed before a fresh run; ``inputs``
    name the earlier stages whose output it reads (their fingerprints enter its own); ``settings`` replace
    the command line in the fingerprint where the command holds something that changes on every run (a
    launcher's free port); ``result`` reads what the summary reports of it (mIoU, threshold) once done.
    """

    key: str
    title: str
    cmd: list[str]
    complete: Callable[[], bool]
    outputs: Sequence[Path] = ()
    inputs: Sequence[str] = ()
    settings: object = None
    env: dict[str, str] | None = None
    result: Callable[[], dict] | None = None
    where: Path | None = None  # its main output, for the summary
    extra: dict = field(default_factory=dict)


class Stages:
    """The record of a directory's stages (``OUT/stages.json``) and the rule for reusing one (module doc)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / STAGE_RECORD
        self.records = self._read()

    def _read(self) -> dict[str, dict]:
        try:
            records = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("%s is unreadable (%s); every stage runs again", self.path, e)
            return {}
        return records if isinstance(records, dict) else {}

    def current_fingerprint(self, stage: Stage) -> str:
        settings = stage.cmd if stage.settings is None else stage.settings
        # An input stage without a record (a --print-only listing of a fresh run) counts as not yet run.
        inputs = {name: (self.records.get(name) or {}).get("fingerprint") for name in stage.inputs}
        return fingerprint({"settings": settings, "inputs": inputs})

    def reusable(self, stage: Stage) -> bool:
        record = self.records.get(stage.key) or {}
        same = record.get("fingerprint") == self.current_fingerprint(stage)
        return same and record.get("state") == "done" and stage.complete()

    def forget(self, keys: Sequence[str]) -> None:
        """Drop these stages' records, so that they run from scratch (``--rerun``)."""
        for key in keys:
            self.records.pop(key, None)
        atomic_write_json(self.path, self.records)

    def adopt(self, stage: Stage) -> None:
        """Record ``stage`` as finished with its current settings without running it: its output was made by
        hand (its command run on a cluster, say); a UsageError when that output is not there."""
        if not stage.complete():
            raise UsageError(f"--adopt {stage.key}: its output is not there (or not complete): run it first")
        self.records[stage.key] = {
            "fingerprint": self.current_fingerprint(stage),
            "state": "done",
            "command": shlex.join(stage.cmd),
            "adopted": True,
        }
        atomic_write_json(self.path, self.records)
        console.print(f"adopted: {stage.key} (made outside the pipeline)", markup=False, highlight=False)

    def run(self, stage: Stage) -> float | None:
        """Run ``stage`` unless its recorded run can be reused; its seconds, or None when reused."""
        current = self.current_fingerprint(stage)
        record = self.records.get(stage.key) or {}
        same = record.get("fingerprint") == current
        if same and record.get("state") == "done" and stage.complete():
            console.print(f"reused: {stage.key} (settings and inputs unchanged)", markup=False, highlight=False)
            return None
        if same and record.get("state") == "started":
            why = "resumed"
        else:
            why = "output missing" if same else "settings or inputs changed" if record else "no earlier run"
            for path in stage.outputs:
                _remove(path)
        self.records[stage.key] = {"fingerprint": current, "state": "started", "command": shlex.join(stage.cmd)}
        atomic_write_json(self.path, self.records)
        seconds = run_logged(stage.title, stage.cmd, self.out / "logs" / f"{stage.key}.log", stage.env)
        self.records[stage.key].update(state="done", seconds=round(seconds, 1))
        atomic_write_json(self.path, self.records)
        console.print(f"ran: {stage.key} in {seconds:.0f} s ({why})", markup=False, highlight=False)
        return seconds
