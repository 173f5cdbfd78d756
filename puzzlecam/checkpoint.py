"""Checkpoint bookkeeping around DeepSpeed's own save/load.

Layout under ``{run_dir}/checkpoints/``::

    step00000010/              one DeepSpeed tag (model + optimizer states, client state)
        trainer_rank000.pt     per-rank trainer state: RNG states, data-loader position
        COMPLETE               written last, atomically, after every rank finished saving
    latest                     DeepSpeed's pointer (informational; resume trusts COMPLETE markers)

A save that dies half way leaves a tag without COMPLETE: resume ignores it and takes the newest
complete tag, so the previous checkpoint stays usable. Pruning keeps the newest ``keep_last``
complete tags and removes everything older (and any incomplete leftovers).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from puzzlecam.errors import UsageError
from puzzlecam.utils.files import atomic_write, atomic_write_text

COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int | None:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def trainer_state_path(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"trainer_rank{rank:03d}.pt"


def is_complete(tag_dir: Path) -> bool:
    return (Path(tag_dir) / COMPLETE).is_file()


def complete_tags(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(step_of(p.name), p) for p in ckpt_dir.iterdir() if p.is_dir() and step_of(p.name) is not None]
    return [p for s, p in sorted(found) if is_complete(p)]


def latest_complete(ckpt_dir: Path) -> Path | None:
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def mark_complete(tag_dir: Path, step: int) -> None:
    """Atomically mark a tag as fully written (rank 0, after a barrier)."""
    atomic_write_text(Path(tag_dir) / COMPLETE, f"{step}\n")


def prune(ckpt_dir: Path, keep_last: int) -> list[Path]:
    """Remove all but the newest ``keep_last`` complete tags (and incomplete ones older than them)."""
    ckpt_dir = Path(ckpt_dir)
    keep = complete_tags(ckpt_dir)[-max(keep_last, 1) :]
    if not keep:
        return []
    newest_kept = step_of(keep[-1].name)
    removed = []
    for p in ckpt_dir.iterdir():
        s = step_of(p.name)
        if s is None or not p.is_dir() or p in keep:
            continue
        # An incomplete tag newer than every complete one may be a save in progress: leave it.
        if not is_complete(p) and s > newest_kept:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def resolve_resume(resume: str, ckpt_dir: Path) -> Path | None:
    """``auto`` -> newest complete tag in ckpt_dir or None; ``none`` -> None; else a tag or a
    checkpoints directory (its newest complete tag). A path that gives no complete checkpoint is a
    UsageError naming ``--resume`` and the path."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_complete(ckpt_dir)
    p = Path(resume)
    if not p.exists():
        raise UsageError(f"--resume {resume}: no such checkpoint or directory")
    if step_of(p.name) is not None:
        if not is_complete(p):
            raise UsageError(
                f"--resume {resume}: checkpoint is incomplete (no {COMPLETE} marker; its save did not finish)"
            )
        return p
    for candidate in (p, p / "checkpoints"):
        tag = latest_complete(candidate)
        if tag is not None:
            return tag
    raise UsageError(f"--resume {resume}: no complete checkpoint (step########/{COMPLETE}) found there")


def save_trainer_state(tag_dir: Path, rank: int, state: dict) -> None:
    atomic_write(trainer_state_path(tag_dir, rank), lambda f: torch.save(state, f))


def load_trainer_state(tag_dir: Path, rank: int) -> dict:
    """This rank's trainer state; a missing file refuses the resume (a UsageError naming it)."""
    path = trainer_state_path(tag_dir, rank)
    if not path.is_file():
        raise UsageError(
            f"{path} is missing: the checkpoint {tag_dir} was written by fewer ranks than this run has "
            "(resuming with a different world size is not supported)"
        )
    return torch.load(path, map_location="cpu", weights_only=True)
