"""The Puzzle-CAM Trainer: DeepSpeed data-parallel training with exact resume.

``launch/train.py`` is a thin entry around :func:`main`. The same process runs under
``deepspeed``, ``torchrun`` or plain ``python`` (docs/training.md). One optimizer step:

1. ``grad_accum_steps`` micro-batches, each: uint8 batch -> device -> normalized images + tiles
   (puzzlecam.ops.prepare_inputs) -> two forward passes -> L = L_cls + L_pcls + alpha(t) L_re
   (puzzlecam.ops.puzzle_losses) -> backward (DeepSpeed averages gradients over ranks);
2. every rank learns whether any rank's loss was NaN/Inf (one all-reduce, which also averages the
   logged losses and sums the epoch's corrupt samples, bounded by ``data.max_corrupt_fraction``); a
   bad step is skipped on every rank and counted, ``max_bad_steps`` in a row stop the run;
3. poly learning-rate decay per parameter group, explicit clipping of the all-reduced gradients
   (``optim.grad_clip``; the norm is logged), SGD.

Checkpoints hold only finite state and are read without running code (puzzlecam.checkpoint); a
resume is compared with the checkpoint's config first (puzzlecam.resume), and nothing in the run
directory changes until it is accepted. The method and its losses: docs/method.md; the run
directory, checkpoints, resume, failures, exit status and logging: docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from puzzlecam import NUM_CLASSES
from puzzlecam.errors import ConfigError, PuzzleCamError, RunError, TrainingError, UsageError

from . import checkpoint as ckpt
from .config import Config, load_config, save_config
from .metrics import MetricsLog, read_jsonl, show_step
from .resume import Comparison, check_resume
from .train_step import PuzzleNet, alpha_for, forward_losses, poly_lr_factor
from .utils.cli import run_command
from .utils.distributed import (
    average_buffers,
    barrier,
    init_distributed,
    rng_state,
    seed_everything,
    set_rng_state,
    sum_across_ranks,
)
from .utils.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from .utils.progress import ProgressBar

log = logging.getLogger(__name__)

_DS_FORBIDDEN = {
    "optimizer": "the optimizer is torch SGD built from the run config (optim.*)",
    "scheduler": "the learning-rate schedule is poly decay from the run config (optim.poly_power)",
    "gradient_clipping": "set optim.grad_clip in the run config",
}
_AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
# The run directory's files besides checkpoints; `--resume none` moves them aside with the checkpoints.
RUN_FILES = ("config.yaml", "model.safetensors", "metrics.jsonl", "metrics.parquet", "summary.json", "resumes.jsonl")


def _precision_dtype(ds_config: dict) -> torch.dtype:
    ac = ds_config.get("torch_autocast", {})
    if ac.get("enabled", False):
        return _AUTOCAST_DTYPES[str(ac.get("dtype", "bfloat16")).replace("torch.", "")]
    return torch.float32


def _ds_section(ds: dict, key: str, path: Path) -> dict:
    section = ds.get(key, {})
    if not isinstance(section, dict):
        raise ConfigError(f"DeepSpeed config {path}: '{key}' must be a JSON object, got {section!r}")
    return section


def build_deepspeed_config(cfg: Config, world_size: int, path: str) -> dict:
    """Read the DeepSpeed JSON and fill in what the run config decides (batch sizes, clipping).

    Raises ConfigError naming the file/key when the JSON contradicts the run config or asks for
    something this trainer does not support.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config {p} does not exist (train.deepspeed_config / --deepspeed_config)")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {p} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"DeepSpeed config {p} must hold a JSON object, got {type(ds).__name__}")
    t = cfg.train
    got = t.micro_batch_size * t.grad_accum_steps * world_size
    if got != t.global_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} but train.micro_batch_size ({t.micro_batch_size}) x "
            f"train.grad_accum_steps ({t.grad_accum_steps}) x world size ({world_size}) = {got}; "
            "change one of them so that the product equals the global batch"
        )
    for key, why in _DS_FORBIDDEN.items():
        if key in ds:
            raise ConfigError(f"DeepSpeed config {p}: remove '{key}' ({why})")
    for key in ("fp16", "bf16"):
        if _ds_section(ds, key, p).get("enabled", False):
            raise ConfigError(
                f"DeepSpeed config {p}: '{key}.enabled' casts the whole model (BatchNorm statistics included) to "
                'half precision; use "torch_autocast": {"enabled": true, "dtype": "bfloat16"|"float16"} '
                "(launch/configs/ds_bf16.json, ds_fp16.json), which keeps weights, norms and losses in fp32"
            )
    autocast_dtype = str(_ds_section(ds, "torch_autocast", p).get("dtype", "bfloat16")).replace("torch.", "")
    if autocast_dtype not in _AUTOCAST_DTYPES:
        raise ConfigError(
            f"DeepSpeed config {p}: torch_autocast.dtype {autocast_dtype!r} is not one of {', '.join(_AUTOCAST_DTYPES)}"
        )
    stage = _ds_section(ds, "zero_optimization", p).get("stage", 0)
    if stage != 0:
        raise ConfigError(
            f"DeepSpeed config {p}: zero_optimization.stage={stage} is not supported (use 0: plain data parallel)"
        )
    expected = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
    }
    for key, value in expected.items():
        if key in ds and ds[key] != value:
            raise ConfigError(
                f"DeepSpeed config {p}: '{key}' is {ds[key]} but the run config gives {value}; "
                "remove it from the JSON (the run config's train.* batch settings decide)"
            )
        ds[key] = value
    if _precision_dtype(ds) == torch.float16 and not torch.cuda.is_available():
        raise ConfigError(
            f"DeepSpeed config {p}: float16 autocast needs a CUDA GPU; use ds_bf16.json or ds_fp32.json on CPU"
        )
    ds["gradient_clipping"] = 0.0  # the Trainer clips (optim.grad_clip) after the all-reduce
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, resume: str = "auto", resume_force: bool = False):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        # Bad input fails before anything is started or built; nothing in the run directory changes
        # until a resume is accepted (docs/training.md, "What a resume compares").
        if cfg.model.num_classes != NUM_CLASSES:
            raise ConfigError(
                f"model.num_classes={cfg.model.num_classes} but the training data's label vectors have "
                f"{NUM_CLASSES} classes (the PASCAL VOC classes the shards hold): set model.num_classes={NUM_CLASSES}"
            )
        resume_from = ckpt.resolve_resume(resume, self.ckpt_dir)
        client = None
        if resume_from is not None:
            ckpt.check_files(resume_from)
            client = ckpt.read_client_state(resume_from)

        import deepspeed

        from . import data as pdata
        from .model import build_model, param_groups

        self.dist = init_distributed(use_deepspeed=True)
        self.device = self.dist.device
        t = cfg.train
        if not cfg.data.train_shards:
            raise ConfigError(
                "data.train_shards is empty: give the training shards, e.g. data.train_shards='shards/train-*.tar'"
            )
        changes = None
        if client is not None:
            changes = check_resume(client, cfg, self.dist.world_size, resume_from, resume_force)
        ds_config = build_deepspeed_config(cfg, self.dist.world_size, t.deepspeed_config)
        self.dtype = _precision_dtype(ds_config)
        self.channels_last = t.channels_last and self.device.type == "cuda"
        if self.device.type == "cpu":
            # Exact repeatability (resume == uninterrupted run) on CPU.
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            torch.backends.cudnn.benchmark = True  # fixed crop size: autotuned convolutions pay off

        # Identical initialization on every rank (DeepSpeed also broadcasts rank 0's weights).
        seed_everything(t.seed, 0)
        classifier = build_model(cfg.model)
        if self.channels_last:
            classifier = classifier.to(memory_format=torch.channels_last)
        self.classifier = classifier.to(self.device)
        groups = param_groups(self.classifier, cfg.optim.lr, cfg.optim.weight_decay, keep_empty=False)
        optimizer = torch.optim.SGD(
            groups,
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            nesterov=cfg.optim.nesterov,
            weight_decay=cfg.optim.weight_decay,
        )
        net: torch.nn.Module = PuzzleNet(self.classifier)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=ds_config)
        self.checkpoint_files = ckpt.GuardedCheckpointEngine.install(self.engine)
        if t.compile:
            self.engine.compile()
        seed_everything(t.seed, self.dist.rank)

        self.loader = pdata.train_loader(
            cfg.data.train_shards,
            batch_size=t.micro_batch_size,
            crop_size=cfg.data.crop_size,
            seed=t.seed,
            num_workers=cfg.data.num_workers,
            min_long_side=cfg.data.min_long_side,
            max_long_side=cfg.data.max_long_side,
            hflip=cfg.data.hflip,
            shuffle_buffer=cfg.data.shuffle_buffer,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.steps_per_epoch = len(self.loader) // t.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training data gives {len(self.loader)} micro-batches of {t.micro_batch_size} per rank per epoch, "
                f"fewer than train.grad_accum_steps={t.grad_accum_steps}: not one optimizer step per epoch"
            )
        self.total_steps = t.max_steps if t.max_steps > 0 else t.epochs * self.steps_per_epoch
        if client is not None and int(client["step"]) > self.total_steps:
            raise ConfigError(
                f"train.max_steps / train.epochs give {self.total_steps} steps, but checkpoint {resume_from} is at "
                f"step {client['step']}: to resume, give at least as many steps"
            )
        self.step = 0
        self.skipped_steps = 0
        self.bad_streak = 0
        self._batches = None

        if resume_from is not None:
            self._load(resume_from)
        if self.dist.is_main:
            self._prepare_run_dir(resume, resume_from, changes, resume_force)
        barrier()
        self.metrics = (
            MetricsLog(self.run_dir / "metrics.jsonl", resume_step=self.step if resume_from else None)
            if self.dist.is_main
            else None
        )
        self.resumed_from = resume_from
        self.fault = _FaultInjection.from_env(self.run_dir, self.dist.rank)

    def _prepare_run_dir(
        self, resume: str, resume_from: Path | None, changes: Comparison | None, resume_force: bool
    ) -> None:
        """Rank 0, once the run is set up (a resume accepted): the old run aside (``--resume none``),
        the resolved config, the record of a resume and its changes."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume == "none":
            # A fresh start must not leave older checkpoints for a later `--resume auto` to pick up, nor
            # old weights, metrics and summary beside the new config.
            aside = ckpt.set_aside(self.run_dir, RUN_FILES)
            if aside is not None:
                log.warning("--resume none: moved the existing checkpoints, weights and metrics to %s", aside)
        save_config(self.cfg, self.run_dir / "config.yaml")
        if resume_from is None:
            return
        if changes.allowed:
            log.info("resuming with changed settings: %s", ", ".join(str(c) for c in changes.allowed))
        if changes.refused:
            log.warning(
                "--resume-force: resuming despite changes to what the run trains: %s",
                ", ".join(str(c) for c in changes.refused),
            )
        record = {"time": time.time(), "from": str(resume_from), "step": self.step, **changes.as_record(resume_force)}
        path = self.run_dir / "resumes.jsonl"
        earlier = path.read_text() if path.is_file() else ""
        atomic_write_text(path, earlier + json.dumps(record) + "\n")

    # ------------------------------------------------------------------------------------------
    # Data

    def _next_batch(self) -> dict:
        """The next micro-batch; epochs roll over (the loader advances its epoch counter)."""
        while True:
            if self._batches is None:
                self._batches = iter(self.loader)
            try:
                return next(self._batches)
            except StopIteration:
                self._batches = None

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def save(self) -> Path:
        """DeepSpeed checkpoint + per-rank trainer state; COMPLETE marks it usable; old ones pruned.

        Non-finite weights or statistics are not saved (a TrainingError), so every complete checkpoint
        is a finite one. A write that fails on any rank (a full disk) fails the save on every rank: the
        tag directory is removed and the error names the newest complete checkpoint.
        """
        tag = ckpt.tag_for(self.step)
        tag_dir = self.ckpt_dir / tag
        average_buffers(self.classifier)
        self._check_finite("nothing is saved (no checkpoint, no model.safetensors)")
        client_state = {
            "step": self.step,
            "epoch": self.loader.epoch,
            "skipped_steps": self.skipped_steps,
            "bad_streak": self.bad_streak,
            "world_size": self.dist.world_size,
            "config": self.cfg.to_dict(),
            # Rank 0's data position, for inspection; every rank restores its own from trainer_rank*.pt.
            "data": self.loader.state_dict(),
        }
        # A fresh tag directory: a leftover from a crashed save of the same step is not reused.
        if self.dist.is_main and tag_dir.exists():
            ckpt.discard(tag_dir)
        barrier()
        failed = None
        try:
            # `latest` is written after COMPLETE (ckpt.point_latest): it names complete checkpoints only.
            self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
            self.checkpoint_files.raise_failed_save()
            ckpt.save_trainer_state(
                tag_dir, self.dist.rank, {"rng": rng_state(), "loader": self.loader.state_dict(), "step": self.step}
            )
        except PuzzleCamError as e:  # a full or read-only disk (DiskError), a write that failed
            failed = e
        self.fault.maybe_fire(self.step, "save")  # test hook: die with the files written, before COMPLETE
        self._fail_save_if_any_rank_failed(failed, tag_dir)
        if self.dist.is_main:
            try:
                ckpt.mark_complete(tag_dir, self.step)
                ckpt.point_latest(tag_dir)
                ckpt.prune(self.ckpt_dir, self.cfg.train.keep_last)
            except PuzzleCamError as e:
                failed = e
        self._fail_save_if_any_rank_failed(failed, tag_dir)
        return tag_dir

    def _fail_save_if_any_rank_failed(self, failed: PuzzleCamError | None, tag_dir: Path) -> None:
        def remove_partial_save():
            if self.dist.is_main:
                ckpt.discard(tag_dir)

        raise_if_any_rank_failed(
            failed,
            on_failure=remove_partial_save,
            context=f"the checkpoint of step {self.step} was not saved; the newest complete one is "
            f"{ckpt.latest_complete(self.ckpt_dir) or 'none'}",
        )

    def _check_finite(self, consequence: str) -> None:
        """A TrainingError when any weight or running statistic is NaN/Inf (the same verdict on every rank)."""
        state = self.classifier.state_dict()
        bad = [name for name, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        (count,) = sum_across_ranks([len(bad)])
        if count == 0:
            return
        shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise TrainingError(
            f"training diverged: {len(bad)} of {len(state)} model tensors are non-finite (NaN/Inf) at step "
            f"{self.step} ({shown}); {consequence}. The last finite checkpoint is "
            f"{ckpt.latest_complete(self.ckpt_dir) or 'none'}. Lower optim.lr, enable optim.grad_clip or use "
            "ds_fp32.json."
        )

    def _load(self, tag_dir: Path) -> None:
        """Restore everything from a checkpoint; when it fails on any rank, every rank raises."""
        failed = None
        try:
            self._restore(tag_dir)
        except PuzzleCamError as e:
            failed = e
        raise_if_any_rank_failed(failed)

    def _restore(self, tag_dir: Path) -> None:
        try:
            load_path, client = self.engine.load_checkpoint(
                str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        except (RuntimeError, KeyError) as e:  # mostly state_dict keys or shapes that do not fit this model
            raise UsageError(
                f"DeepSpeed could not load checkpoint {tag_dir} into the model of this config: {ckpt.first_sentence(e)}"
            ) from e
        if load_path is None:
            raise TrainingError(f"DeepSpeed could not load the checkpoint {tag_dir}")
        state = ckpt.load_trainer_state(tag_dir, self.dist.rank)
        try:
            self.loader.load_state_dict(state["loader"])
        except ValueError as e:
            raise UsageError(
                f"cannot resume from {tag_dir} on data.train_shards={self.cfg.data.train_shards}: {e}"
            ) from None
        self.step = int(client["step"])
        self.skipped_steps = int(client.get("skipped_steps", 0))
        self.bad_streak = int(client.get("bad_streak", 0))
        set_rng_state(state["rng"])
        self._batches = None

    # ------------------------------------------------------------------------------------------
    # Training

    def _set_lr(self) -> float:
        factor = poly_lr_factor(self.step, self.total_steps, self.cfg.optim.poly_power)
        for g in self.optimizer.param_groups:
            g["lr"] = self.cfg.optim.lr * g.get("lr_scale", 1.0) * factor
        return self.cfg.optim.lr * factor

    def _clip_grads(self) -> float:
        """Clip the (all-reduced) gradients to optim.grad_clip; returns their global norm before clipping.

        Done here rather than by DeepSpeed so that a skipped step never reaches a clipping routine
        with no gradients, and the norm is logged. fp16: the GradScaler unscales first.
        """
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        if not params:
            return 0.0
        scaler = getattr(self.engine, "torch_autocast_z0_gradscaler", None)
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def _drop_grads(self) -> None:
        """Make the coming optimizer step a no-op on every rank (a skipped non-finite step)."""
        scaler = getattr(self.engine, "torch_autocast_z0_gradscaler", None)
        for p in self.engine.module.parameters():
            if scaler is not None:
                # fp16: the GradScaler skips the step and lowers its scale when it sees Inf.
                p.grad = torch.full_like(p, float("inf"))
            else:
                p.grad = None  # torch SGD leaves parameters without gradients untouched

    def _check_corrupt_fraction(self, corrupt: int) -> None:
        """Stop once the epoch's corrupt samples (all ranks) exceed data.max_corrupt_fraction of its
        samples, naming the shards with the most (the same verdict on every rank: the count is all-reduced)."""
        samples = len(self.loader) * self.cfg.train.micro_batch_size * self.dist.world_size
        limit = self.cfg.data.max_corrupt_fraction
        if corrupt <= limit * samples:
            return
        per_shard = sum_across_ranks(self.loader.epoch_corrupt)
        worst = sorted((i for i, n in enumerate(per_shard) if n > 0), key=lambda i: -per_shard[i])[:3]
        raise TrainingError(
            f"{corrupt} corrupt samples in epoch {self.loader.epoch} so far, {corrupt / samples:.1%} of its {samples}: "
            f"more than data.max_corrupt_fraction={limit} allows; most in "
            f"{', '.join(f'{self.loader.shard_paths[i]} ({per_shard[i]})' for i in worst)}. Check those shards (the "
            "warnings name each sample) or raise data.max_corrupt_fraction"
        )

    def train_step(self) -> dict:
        t = self.cfg.train
        start = time.perf_counter()
        lr = self._set_lr()
        alpha = alpha_for(self.step, self.total_steps, self.cfg)
        sums = None  # per StepLosses field, then the count of non-finite losses
        data_wait = 0.0
        bad = False
        self.engine.train()
        grad_norm = float("nan")
        for micro in range(t.grad_accum_steps):
            tw = time.perf_counter()
            batch = self._next_batch()
            data_wait += time.perf_counter() - tw
            losses = forward_losses(self.engine, batch, self.cfg, alpha, self.device, self.dtype, self.channels_last)
            parts = torch.stack(list(losses)).detach().float()  # total first, then every named term
            finite = torch.isfinite(parts[0])
            # One all-reduce: the sum of every rank's losses, the count of non-finite ones and the
            # corrupt samples met in the epoch so far.
            corrupt = parts.new_tensor([sum(self.loader.epoch_corrupt)])
            vec = torch.cat([torch.where(finite, parts, torch.zeros_like(parts)), (~finite).float()[None], corrupt])
            vec = vec.to(self.device)
            if torch.distributed.is_initialized() and self.dist.world_size > 1:
                torch.distributed.all_reduce(vec)
            vec = vec.cpu().double()
            self._check_corrupt_fraction(int(vec[-1]))
            vec = vec[:-1]
            bad = bad or bool(vec[-1] > 0)
            if not bad:
                self.engine.backward(losses.total)  # at the last micro-batch DeepSpeed all-reduces the gradients
            sums = vec if sums is None else sums + vec
            if micro == t.grad_accum_steps - 1:
                if bad:
                    self._drop_grads()
                else:
                    grad_norm = self._clip_grads()
            self.engine.step()
        n = self.dist.world_size * t.grad_accum_steps
        self.step += 1
        if bad:
            self.skipped_steps += 1
            self.bad_streak += 1
        else:
            self.bad_streak = 0
        elapsed = time.perf_counter() - start
        names = ["loss"] + [f"loss_{name}" for name in losses._fields[1:]]  # loss, loss_cls, ..., loss_conf
        mean = (sums[:-1] / n).tolist() if not bad else [float("nan")] * len(names)
        return {
            "step": self.step,
            "epoch": self.loader.epoch,
            **dict(zip(names, mean, strict=True)),
            "alpha": alpha,
            "lr": lr,
            "images_per_s": t.global_batch_size / max(elapsed, 1e-9),
            "data_wait_pct": 100.0 * data_wait / max(elapsed, 1e-9),
            "skipped_samples": int(getattr(self.loader, "skipped", 0)),
            "skipped_steps": self.skipped_steps,
            "grad_norm": grad_norm,
            "bad_step": bad,
            "time": time.time(),
        }

    def fit(self) -> Path | None:
        """Train to ``total_steps``; returns the exported weights' path (rank 0) or None."""
        t = self.cfg.train
        bar = ProgressBar("train", self.total_steps, completed=self.step, enabled=self.dist.is_main, info=True)
        try:
            while self.step < self.total_steps:
                record = self.train_step()
                shown = self.step % t.log_every == 0 or self.step == self.total_steps
                if self.metrics is not None and (shown or record["bad_step"]):
                    self.metrics.write(record)
                show_step(bar, self.step, record if shown else None)
                if self.bad_streak >= t.max_bad_steps:
                    last = ckpt.latest_complete(self.ckpt_dir)
                    raise TrainingError(
                        f"{self.bad_streak} optimizer steps in a row had a NaN/Inf loss "
                        f"(train.max_bad_steps={t.max_bad_steps}); "
                        f"stopping at step {self.step}. Last good checkpoint: {last if last else 'none'}. "
                        "Lower optim.lr, enable optim.grad_clip or use ds_fp32.json."
                    )
                # No checkpoint inside a run of bad steps: the last good one is what a resume needs.
                if (
                    t.ckpt_every > 0
                    and self.step % t.ckpt_every == 0
                    and self.step < self.total_steps
                    and self.bad_streak == 0
                ):
                    self.save()
                self.fault.maybe_fire(self.step, "step")
            newest = ckpt.latest_complete(self.ckpt_dir)
            if newest is None or ckpt.step_of(newest.name) != self.step:  # else resumed at the end: saved
                self.save()
            return self.export()
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()

    def export(self) -> Path | None:
        """Consolidated fp32 classifier weights -> ``model.safetensors``; metrics -> Parquet."""
        from safetensors.torch import save

        average_buffers(self.classifier)
        self._check_finite("no model.safetensors is written")
        digests = replica_digests(self.classifier)
        out = self.run_dir / "model.safetensors"
        if self.dist.is_main:
            resumes = self.run_dir / "resumes.jsonl"
            if len(set(digests)) != 1:
                raise TrainingError(
                    f"parameters differ between ranks at the end of training (digests {digests}): "
                    "replicas went out of sync"
                )
            atomic_write_json(
                self.run_dir / "summary.json",
                {
                    "steps": self.step,
                    "world_size": self.dist.world_size,
                    "skipped_steps": self.skipped_steps,
                    "param_digest_per_rank": digests,
                    "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                    "resumes": read_jsonl(resumes) if resumes.is_file() else [],
                },
            )
            state = {
                k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu()
                for k, v in self.classifier.state_dict().items()
            }
            metadata = {"format": "pt", "step": str(self.step), "arch": self.cfg.model.arch}
            atomic_write_bytes(out, save(state, metadata=metadata))
            self.metrics.export_parquet()
        barrier()
        return out if self.dist.is_main else None


def raise_if_any_rank_failed(
    failed: PuzzleCamError | None, on_failure: Callable[[], None] | None = None, context: str = ""
) -> None:
    """A collective: when any rank failed, every rank raises -- its own error, else the first failed
    rank's message (a UsageError or RunError by its exit status) -- so that no rank goes on to wait in
    a collective for one that gave up. ``on_failure`` runs first; ``context`` ends the message."""
    mine = None if failed is None else (failed.exit_code, str(failed))
    reports = [mine]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        reports = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(reports, mine)
    first = next(((rank, report) for rank, report in enumerate(reports) if report is not None), None)
    if first is None:
        return
    if on_failure is not None:
        on_failure()
    suffix = f"; {context}" if context else ""
    if failed is not None:
        raise type(failed)(f"{failed}{suffix}") from failed
    rank, (code, message) = first
    raise (UsageError if code == UsageError.exit_code else RunError)(f"rank {rank}: {message}{suffix}")


def replica_digests(module: torch.nn.Module) -> list[str]:
    """SHA-256 of this rank's parameter bytes, gathered from every rank (rank order)."""
    import hashlib

    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().contiguous().cpu().numpy().tobytes())
    mine = h.hexdigest()
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return [mine]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, mine)
    return out


class _FaultInjection:
    """Test hook for crash recovery: PUZZLECAM_FAULT_KILL="step=N[,rank=R][,phase=step|save]" SIGKILLs
    rank R (default 0) right after optimizer step N (phase=step, the default) or in the middle of the
    checkpoint save of step N, after its files are written and before COMPLETE (phase=save). It fires
    once per run directory (a marker file remembers it)."""

    def __init__(self, step: int | None, phase: str, marker: Path):
        self.step, self.phase, self.marker = step, phase, marker

    @classmethod
    def from_env(cls, run_dir: Path, rank: int) -> _FaultInjection:
        spec = os.environ.get("PUZZLECAM_FAULT_KILL", "")
        if not spec:
            return cls(None, "step", Path())
        try:
            fields = dict(item.split("=", 1) for item in spec.split(","))
            step = int(fields["step"]) if int(fields.get("rank", 0)) == rank else None
        except (ValueError, KeyError):
            raise ConfigError(f"PUZZLECAM_FAULT_KILL={spec!r}: expected step=N[,rank=R][,phase=step|save]") from None
        return cls(step, fields.get("phase", "step"), Path(run_dir) / f".fault_fired_rank{rank}")

    def maybe_fire(self, step: int, phase: str) -> None:
        if self.step is None or step != self.step or phase != self.phase or self.marker.exists():
            return
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(str(step))
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Train a Puzzle-CAM classifier (under deepspeed, torchrun or plain python).",
        epilog="Overrides: dotted key=value pairs applied after the config file, e.g. "
        "data.train_shards='shards/train-*.tar' train.max_steps=100 train.seed=1 train.mode=baseline",
    )
    p.add_argument("--config", required=True, help="run config YAML (launch/configs/*.yaml)")
    p.add_argument(
        "--run-dir",
        default=None,
        help="output directory (default runs/{name}): config.yaml, metrics, checkpoints, model.safetensors",
    )
    p.add_argument(
        "--resume",
        default="auto",
        help="auto: newest complete checkpoint of the run dir if any; none: start fresh; "
        "PATH: a checkpoint tag directory or a checkpoints/run directory",
    )
    p.add_argument(
        "--resume-force",
        action="store_true",
        help="resume even though the config changes what the run trains (optim.lr, train.mode, ...): "
        "the changes are logged and recorded in the run's resumes.jsonl",
    )
    p.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        dest="deepspeed_config",
        default=None,
        help="DeepSpeed JSON (precision); overrides train.deepspeed_config",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    return p


def run(args: argparse.Namespace) -> None:
    overrides = list(args.overrides)
    if args.deepspeed_config:
        overrides.append(f"train.deepspeed_config={args.deepspeed_config}")
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    cfg = load_config(args.config, overrides)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name
    trainer = Trainer(cfg, run_dir, resume=args.resume, resume_force=args.resume_force)
    if trainer.resumed_from is not None:
        log.info("resumed from %s at step %d", trainer.resumed_from, trainer.step)
    out = trainer.fit()
    if out is not None:
        log.info("done: %d steps; weights %s", trainer.step, out)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
