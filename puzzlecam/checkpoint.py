"""The Checkpointer: save / load / prune of a run's checkpoints around DeepSpeed's own, the COMPLETE
marker, the state of trainer, loader and RNG, and reading checkpoint files safely.

Layout under ``{run_dir}/checkpoints/``::

    step00000010/                    one DeepSpeed tag
        mp_rank_00_model_states.pt   DeepSpeed: model + optimizer states, the trainer's client state
        zero_pp_rank_R_mp_rank_00_optim_states.pt   under ZeRO 1/2: rank R's optimizer partition
        trainer_rank000.pt           per-rank trainer state: RNG states, data-loader position
        COMPLETE                     written last, atomically, after every rank finished saving
    latest                           the newest complete tag (for DeepSpeed's tools; resume trusts COMPLETE)

A save that dies half way leaves a tag without COMPLETE: resume ignores it and takes the newest
complete tag, so the previous checkpoint stays usable. Pruning keeps the newest ``keep_last``
complete tags and removes everything older (and any incomplete leftovers).

A resume on the world size that wrote the checkpoint restores each rank's own trainer state, so it
is exact. On another world size (an elastic resume, docs/training.md; puzzlecam.resume says when it
is allowed) every rank reads all the old ranks' loader states and continues the epoch at their
common global position (``TrainLoader.load_elastic_state``), and seeds its RNGs from (seed, step,
rank): the old ranks' streams do not map onto the new ones.

Reading (docs/training.md, "Checkpoints and resume"): every ``.pt`` file is read by torch's weights-only
unpickler (:func:`safe_load`): tensors, plain values and the few plain DeepSpeed classes of
:func:`deepspeed_safe_globals`. A file whose pickle names anything else (a function, a class that
could run code) is refused with one :class:`UsageError` naming it; nothing in it runs.
:func:`check_files` scans a whole tag before anything is loaded, so every rank refuses the same
checkpoint at the same point. DeepSpeed's own ``engine.load_checkpoint`` reads through
:class:`GuardedCheckpointEngine`, which also keeps a failed save (a full disk) from being raised inside
DeepSpeed's collective save.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from puzzlecam.errors import DiskError, PuzzleCamError, TrainingError, UsageError
from puzzlecam.utils.distributed import barrier, raise_if_any_rank_failed, rng_state, seed_everything, set_rng_state
from puzzlecam.utils.files import atomic_write, atomic_write_text, disk_problem, remove_quietly

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"
# DeepSpeed's model-state file of a data-parallel run (ZeRO stages 0-2): it holds the client state.
MODEL_STATES = "mp_rank_00_model_states.pt"
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
    """Atomically mark a tag as fully written (rank 0, after every rank saved)."""
    atomic_write_text(Path(tag_dir) / COMPLETE, f"{step}\n")


def point_latest(tag_dir: Path) -> None:
    """Point ``latest`` at a complete tag. It only serves DeepSpeed's tools: failing to update it leaves
    a usable checkpoint, so that is a warning, not an error."""
    tag_dir = Path(tag_dir)
    try:
        atomic_write_text(tag_dir.parent / LATEST, tag_dir.name)
    except OSError as e:
        log.warning("checkpoint %s is complete, but %s was not updated: %s", tag_dir, tag_dir.parent / LATEST, e)


def discard(tag_dir: Path) -> None:
    """Remove a checkpoint whose save failed (where the disk allows; it has no COMPLETE either way)."""
    shutil.rmtree(tag_dir, ignore_errors=True)


def set_aside(run_dir: Path, names: tuple[str, ...]) -> Path | None:
    """Move a run's checkpoints and its files ``names`` (weights, metrics, ...) into
    ``checkpoints.replaced-{time}/``, so that a fresh run in ``run_dir`` is not mixed with the old one.
    Returns the folder, or None when there was nothing of an earlier run."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    files = [run_dir / name for name in names if (run_dir / name).is_file()]
    has_checkpoints = ckpt_dir.is_dir() and any(ckpt_dir.iterdir())
    if not has_checkpoints and not any(p.name != "config.yaml" for p in files):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = run_dir / f"checkpoints.replaced-{stamp}"
    n = 1
    while aside.exists():
        n += 1
        aside = run_dir / f"checkpoints.replaced-{stamp}-{n}"
    if ckpt_dir.is_dir():
        ckpt_dir.rename(aside)
    else:
        aside.mkdir()
    for p in files:
        p.rename(aside / p.name)
    return aside


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
    """Rank ``rank``'s trainer state; a missing file refuses the resume (a UsageError naming it)."""
    path = trainer_state_path(tag_dir, rank)
    if not path.is_file():
        raise UsageError(
            f"{path} is missing: the checkpoint {tag_dir} is incomplete (every rank that wrote it saves its trainer "
            "state; a resume on a different world size reads them all)"
        )
    return safe_load(path)


def read_client_state(tag_dir: Path) -> dict:
    """The trainer's client state (step, config, world size, ...) of a checkpoint, read safely.

    The model and optimizer tensors are memory-mapped, not read.
    """
    path = Path(tag_dir) / MODEL_STATES
    if not path.is_file():
        raise UsageError(f"{path} is missing: {tag_dir} is not a checkpoint of this trainer")
    state = safe_load(path, mmap=True)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or "step" not in state:
        raise UsageError(f"{path} holds no trainer state (step, config): {tag_dir} is not a checkpoint of this trainer")
    return state


# ---------------------------------------------------------------------------------------------
# Reading checkpoint files safely


def deepspeed_safe_globals() -> list:
    """The plain classes DeepSpeed's checkpoint files hold besides tensors and builtins (its ZeRO 1/2
    optimizer files: the loss scaler, the stage enum, parameter-slice addresses). Each is rebuilt from
    its fields; none runs code when unpickled."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _allowing_deepspeed_globals():
    """A context in which the weights-only unpickler accepts :func:`deepspeed_safe_globals`
    (torch 2.4 has no such context: there the allow-list is process-wide, which is as safe)."""
    context = getattr(torch.serialization, "safe_globals", None)
    if context is not None:
        return context(deepspeed_safe_globals())
    torch.serialization.add_safe_globals(deepspeed_safe_globals())
    return contextlib.nullcontext()


def first_sentence(e: BaseException) -> str:
    """The first sentence of an exception's message, on one line (torch's messages run to paragraphs)."""
    text = " ".join(str(e).split())
    return text.split(". ")[0].rstrip(".")


def _refused(path: Path, what: str) -> UsageError:
    return UsageError(
        f"{path}: refusing to load it: {what}; checkpoint files hold only tensors and plain values, and "
        "reading this one could run code (was it written by this trainer?)"
    )


def safe_load(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` with the weights-only unpickler (and :func:`deepspeed_safe_globals`); a file that
    needs anything else, or is not a torch file, is one UsageError naming it."""
    path = Path(path)
    try:
        with _allowing_deepspeed_globals():
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = re.search(r"WeightsUnpickler error: (.*?)(\. |\.?$)", " ".join(str(e).split()))
        raise _refused(path, reason.group(1) if reason else first_sentence(e)) from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise UsageError(f"{path} is not a readable checkpoint file ({first_sentence(e)})") from None


def check_files(tag_dir: Path) -> None:
    """Scan every ``.pt`` of a checkpoint for pickled references outside the safe set (no tensor is
    read); the first offending or unreadable file is a UsageError naming it."""
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if scan is None:  # torch < 2.5: safe_load still refuses such a file when it is read
        return
    for path in sorted(Path(tag_dir).glob("*.pt")):
        try:
            with _allowing_deepspeed_globals():
                unsafe = scan(path)
        except (RuntimeError, ValueError, EOFError) as e:
            raise UsageError(f"{path} is not a readable checkpoint file ({first_sentence(e)})") from None
        if unsafe:
            raise _refused(path, f"it names {', '.join(sorted(unsafe))}")


class GuardedCheckpointEngine:
    """DeepSpeed's checkpoint engine (``engine.checkpoint_engine``) with a safe load and a deferred save.

    ``load`` is :func:`safe_load`. A ``save`` or ``makedirs`` that fails (a full or read-only disk) is
    not raised inside DeepSpeed's ``save_checkpoint``, whose barriers the other ranks would wait in:
    the partial file is removed, later writes of that save are skipped, and
    :meth:`raise_failed_save` raises it (a DiskError naming the device and path) once
    ``save_checkpoint`` has returned on every rank. Everything else is DeepSpeed's engine.
    """

    def __init__(self, inner: Any):
        self.inner = inner
        self.failed_save: PuzzleCamError | None = None

    @classmethod
    def install(cls, engine: Any) -> GuardedCheckpointEngine:
        guarded = cls(engine.checkpoint_engine)
        engine.checkpoint_engine = guarded
        return guarded

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location=map_location)

    def save(self, state_dict: dict, path: str) -> None:
        self._guarded(path, lambda: self.inner.save(state_dict, path), remove=True)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self._guarded(path, lambda: self.inner.makedirs(path, exist_ok=exist_ok), remove=False)

    def _guarded(self, path: str, write, remove: bool) -> None:
        if self.failed_save is not None:
            return
        try:
            write()
        except (OSError, RuntimeError) as exc:
            problem = disk_problem(path, exc)  # before the clean-up: a full disk still looks full
            if remove:
                remove_quietly(path)
            self.failed_save = DiskError(problem) if problem else TrainingError(f"writing {path} failed: {exc}")
            self.failed_save.__cause__ = exc

    def raise_failed_save(self) -> None:
        """Raise (and forget) the failure of the save that just ended, if it had one."""
        failed, self.failed_save = self.failed_save, None
        if failed is not None:
            raise failed


# ---------------------------------------------------------------------------------------------
# The Checkpointer


class Checkpointer:
    """Save and load the checkpoints of one run: DeepSpeed's model and optimizer states, the trainer's
    client state, and per rank the RNG state and the loader's position; COMPLETE marks a finished save,
    old ones are pruned (``keep_last``). Every method is a collective: call it on every rank."""

    def __init__(self, ckpt_dir: Path, engine: Any, rank: int, world_size: int, keep_last: int):
        self.ckpt_dir, self.engine, self.keep_last = Path(ckpt_dir), engine, keep_last
        self.rank, self.world_size = rank, world_size
        self.files = GuardedCheckpointEngine.install(engine)

    def latest(self) -> Path | None:
        return latest_complete(self.ckpt_dir)

    def save(self, step: int, client_state: dict, loader: Any, on_written: Callable[[], None] | None = None) -> Path:
        """The checkpoint of ``step``; ``on_written`` runs once every file is written, before COMPLETE.

        A write that fails on any rank (a full disk) fails the save on every rank: the tag directory is
        removed and the error names the newest complete checkpoint.
        """
        tag_dir = self.ckpt_dir / tag_for(step)
        # A fresh tag directory: a leftover from a crashed save of the same step is not reused.
        if self.rank == 0 and tag_dir.exists():
            discard(tag_dir)
        barrier()
        failed = None
        try:
            # `latest` is written after COMPLETE (point_latest): it names complete checkpoints only.
            self.engine.save_checkpoint(
                str(self.ckpt_dir), tag=tag_dir.name, client_state=client_state, save_latest=False
            )
            self.files.raise_failed_save()
            save_trainer_state(tag_dir, self.rank, {"rng": rng_state(), "loader": loader.state_dict(), "step": step})
        except PuzzleCamError as e:  # a full or read-only disk (DiskError), a write that failed
            failed = e
        if on_written is not None:
            on_written()
        self._fail_if_any_rank_failed(failed, tag_dir, step)
        if self.rank == 0:
            try:
                mark_complete(tag_dir, step)
                point_latest(tag_dir)
                prune(self.ckpt_dir, self.keep_last)
            except PuzzleCamError as e:
                failed = e
        self._fail_if_any_rank_failed(failed, tag_dir, step)
        return tag_dir

    def _fail_if_any_rank_failed(self, failed: PuzzleCamError | None, tag_dir: Path, step: int) -> None:
        def remove_partial_save():
            if self.rank == 0:
                discard(tag_dir)

        raise_if_any_rank_failed(
            failed,
            on_failure=remove_partial_save,
            context=f"the checkpoint of step {step} was not saved; the newest complete one is "
            f"{self.latest() or 'none'}",
        )

    def load(self, tag_dir: Path, loader: Any, shards: str, seed: int) -> dict:
        """Restore the engine (model and optimizer), this rank's loader position and RNG state from
        ``tag_dir`` (on another world size: the epoch's global position, and RNGs seeded from ``seed``, the
        step and the rank); returns the client state. When it fails on any rank, every rank raises."""
        failed, client = None, None
        try:
            client = self._restore(tag_dir, loader, shards, seed)
        except PuzzleCamError as e:
            failed = e
        raise_if_any_rank_failed(failed)
        return client

    def _restore(self, tag_dir: Path, loader: Any, shards: str, seed: int) -> dict:
        try:
            load_path, client = self.engine.load_checkpoint(
                str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        except (RuntimeError, KeyError) as e:  # mostly state_dict keys or shapes that do not fit this model
            raise UsageError(
                f"DeepSpeed could not load checkpoint {tag_dir} into the model of this config: {first_sentence(e)}"
            ) from e
        if load_path is None:
            raise TrainingError(f"DeepSpeed could not load the checkpoint {tag_dir}")
        saved_world_size = int(client.get("world_size", self.world_size))
        try:
            if saved_world_size == self.world_size:
                state = load_trainer_state(tag_dir, self.rank)
                loader.load_state_dict(state["loader"])
                set_rng_state(state["rng"])
            else:
                states = [load_trainer_state(tag_dir, r)["loader"] for r in range(saved_world_size)]
                loader.load_elastic_state(states)
                step_seed = np.random.SeedSequence([seed, int(client["step"])]).generate_state(1)[0]
                seed_everything(int(step_seed), self.rank)
        except ValueError as e:
            raise UsageError(f"cannot resume from {tag_dir} on data.train_shards={shards}: {e}") from None
        return client
