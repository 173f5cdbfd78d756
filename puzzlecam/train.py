"""The one Trainer of every stage: DeepSpeed data-parallel training of a Task, with exact resume.

``launch/train.py`` is a thin entry around :func:`main`. The same process runs under
``deepspeed``, ``torchrun`` or plain ``python`` (docs/training.md). The config's ``task`` says what
is trained (puzzlecam.tasks: the network, its parameter groups, data and losses); the Trainer owns
the rest. One optimizer step:

1. ``grad_accum_steps`` micro-batches, each: the Task's named losses of the batch (for
   classification: normalized images + tiles, two forward passes, L = L_cls + L_pcls + alpha(t) L_re)
   -> backward of the total (DeepSpeed averages gradients over ranks; under ZeRO 1/2 into their
   owners' partitions);
2. every rank learns whether any rank's loss was NaN/Inf (one all-reduce, which also averages the
   logged losses and sums the corrupt samples, the epoch's bounded by ``data.max_corrupt_fraction``); a
   bad step is skipped on every rank and counted, ``max_bad_steps`` in a row stop the run;
3. poly learning-rate decay per parameter group, clipping of the gradients' global norm
   (``optim.grad_clip``: by the Trainer at ZeRO stage 0, by DeepSpeed's ZeRO optimizer at 1/2; the
   norm is logged), SGD.

Every ``train.eval_every`` steps (and at the last) the Task evaluates the exported network on its
evaluation data, sharded over the ranks; the best score's weights are ``model_best.safetensors``, and
the best survives a resume (the checkpoint's client state; each checkpoint links the best weights of
its time). Every metrics record also goes to TensorBoard (puzzlecam.tensorboard_log); DeepSpeed's own
log lines go to the run directory (puzzlecam.deepspeed_logs). ``--dry-run`` resolves and checks the
run and prints its numbers without training.

Checkpoints (puzzlecam.checkpoint.Checkpointer) hold only finite state and are read without running
code; a resume is compared with the checkpoint's config first (puzzlecam.resume), and nothing in the run
directory changes until it is accepted. A resume on the checkpoint's world size is exact; on another
(elastic) the data continue at the epoch's global position. A finished run resumed with a larger
total continues, its schedules recomputed for the new total. The method and its losses:
docs/method.md; the run directory, checkpoints, resume (elastic too), ZeRO, evaluation, TensorBoard,
failures, exit status and logging: docs/training.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from puzzlecam.errors import ConfigError, PuzzleCamError, TrainingError

from . import checkpoint as ckpt
from .config import Config, dump_config, load_config, save_config, validate_for_run
from .deepspeed_logs import DeepSpeedLogs
from .metrics import Eta, MetricsLog, describe_evaluation, read_jsonl, show_step
from .precision import autocast_dtype, deepspeed_config, size_zero_buckets
from .resume import Comparison, check_resume
from .tasks import Evaluation, StepModule, Task, build_task
from .tensorboard_log import TensorBoardLog
from .utils.cli import run_command
from .utils.distributed import (
    average_buffers,
    barrier,
    init_distributed,
    raise_if_any_rank_failed,
    seed_everything,
    sum_across_ranks,
)
from .utils.files import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text
from .utils.progress import ProgressBar

log = logging.getLogger("puzzlecam.train")  # also under `python -m puzzlecam.train`

# A hook is called as hook(trainer, event, step) at "step" (after each optimizer step) and "save" (a
# checkpoint's files written, before COMPLETE); tests use it to inject crashes (tests/fault_injection.py).
Hook = Callable[["Trainer", str, int], None]

MODEL = "model.safetensors"
BEST_MODEL = "model_best.safetensors"  # in the run directory, and linked into each checkpoint
# The run directory's files besides checkpoints; `--resume none` moves them aside with the checkpoints
# (and the tensorboard/ folder).
RUN_FILES = (
    "config.yaml",
    MODEL,
    BEST_MODEL,
    "metrics.jsonl",
    "metrics.parquet",
    "summary.json",
    "resumes.jsonl",
    "deepspeed.log",
)


def poly_lr_factor(step: int, total_steps: int, power: float) -> float:
    """Poly decay (1 - t/T)^power, 1 at t=0 and 0 at t=T."""
    return max(0.0, 1.0 - step / max(total_steps, 1)) ** power


def check_run(cfg: Config, task: Task, world_size: int) -> dict[str, Any]:
    """The checks of a run that need its world size (ConfigError naming the keys); no process group needed.
    Returns the run's DeepSpeed config (puzzlecam.precision)."""
    validate_for_run(cfg, world_size, torch.cuda.is_available())
    ds_config = deepspeed_config(cfg)
    if not cfg.data.train_shards:
        raise ConfigError(
            "data.train_shards is empty: give the training shards, e.g. data.train_shards='shards/train-*.tar'"
        )
    if cfg.train.eval_every > 0 and task.evaluate is None:
        raise ConfigError(
            f"train.eval_every={cfg.train.eval_every} but task '{task.name}' has no evaluation: set train.eval_every=0"
        )
    return ds_config


def compile_options(t) -> dict[str, Any]:
    """torch.compile's options for the step (train.compile): one graph, static shapes (the loader's crops have
    one size and every micro-batch is full), CUDA graphs with train.cuda_graphs."""
    options: dict[str, Any] = {"fullgraph": True, "dynamic": False}
    if t.cuda_graphs:
        options["mode"] = "reduce-overhead"
    return options


def count_steps(cfg: Config, loader: Any) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps) of a run whose rank loader is ``loader``."""
    t = cfg.train
    per_epoch = len(loader) // t.grad_accum_steps
    if per_epoch == 0:
        raise ConfigError(
            f"the training data gives {len(loader)} micro-batches of {t.micro_batch_size} per rank per epoch, "
            f"fewer than train.grad_accum_steps={t.grad_accum_steps}: not one optimizer step per epoch"
        )
    return per_epoch, t.max_steps if t.max_steps > 0 else t.epochs * per_epoch


def evaluate_network(
    task: Task,
    network: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    channels_last: bool,
    rank: int,
    world_size: int,
) -> Evaluation:
    """The Task's evaluation of ``network`` (a collective): eval mode, no gradients, autocast as in training
    (``dtype``); the network is back in its mode afterwards."""
    was_training = network.training
    network.eval()
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    # The RNG states are left as they were (a DataLoader draws a seed): an evaluation changes no training.
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    try:
        with rng, torch.no_grad(), autocast:
            return task.evaluate(network, device, channels_last, rank, world_size)
    finally:
        network.train(was_training)


class Trainer:
    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        resume: str = "auto",
        resume_force: bool = False,
        hooks: Sequence[Hook] = (),
    ):
        self.started = time.monotonic()
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.hooks = list(hooks)
        # Before DeepSpeed is imported (reading a checkpoint may import it): its lines are held for the run dir.
        self.deepspeed_logs = route_deepspeed_logs()
        # Bad input fails before anything is started or built; nothing in the run directory changes
        # until a resume is accepted (docs/training.md, "What a resume compares").
        self.task = build_task(cfg)
        resume_from = ckpt.resolve_resume(resume, self.ckpt_dir)
        client = None
        if resume_from is not None:
            ckpt.check_files(resume_from)
            client = ckpt.read_client_state(resume_from)

        import deepspeed

        self.dist = init_distributed(use_deepspeed=True)
        self.device = self.dist.device
        t = cfg.train
        ds_config = check_run(cfg, self.task, self.dist.world_size)
        changes = None
        if client is not None:
            changes = check_resume(client, cfg, self.dist.world_size, resume_from, resume_force)
        self.zero_stage = t.zero_stage
        if self.zero_stage > 0:
            # DeepSpeed 0.19's ZeRO all-gathers the updated partitions with torch's deprecated
            # all_gather_into_tensor: torch's FutureWarning would print twice per step on every rank.
            warnings.filterwarnings(
                "ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning
            )
        self.dtype = autocast_dtype(cfg)
        self.channels_last = t.channels_last and self.device.type == "cuda"
        if self.device.type == "cpu":
            # Exact repeatability (resume == uninterrupted run) on CPU.
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            torch.backends.cudnn.benchmark = True  # fixed crop size: autotuned convolutions pay off

        # Identical initialization on every rank (DeepSpeed also broadcasts rank 0's weights).
        seed_everything(t.seed, 0)
        network = self.task.build_network()
        if self.channels_last:
            network = network.to(memory_format=torch.channels_last)
        network = network.to(self.device)
        self.model = self.task.exported(network)
        # DeepSpeed wraps the whole step up to the losses (its state dict is the network's).
        step_module = StepModule(self.task, network, self.dtype, self.channels_last)
        optimizer = torch.optim.SGD(
            self.task.param_groups(network),
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            nesterov=cfg.optim.nesterov,
            weight_decay=cfg.optim.weight_decay,
        )
        ds_config = size_zero_buckets(ds_config, sum(p.numel() for p in network.parameters()))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=step_module, optimizer=optimizer, config=ds_config
        )
        self.checkpointer = ckpt.Checkpointer(
            self.ckpt_dir, self.engine, self.dist.rank, self.dist.world_size, t.keep_last
        )
        if t.compile:
            step_module.compile_step(t.compile_backend, **compile_options(t))
        seed_everything(t.seed, self.dist.rank)

        self.loader = self.task.train_loader(self.dist.rank, self.dist.world_size)
        self.steps_per_epoch, self.total_steps = count_steps(cfg, self.loader)
        if client is not None and int(client["step"]) > self.total_steps:
            raise ConfigError(
                f"train.max_steps / train.epochs give {self.total_steps} steps, but checkpoint {resume_from} is at "
                f"step {client['step']}: to resume, give at least as many steps"
            )
        self.step = 0
        self.skipped_steps = 0
        self.bad_streak = 0
        # The best evaluation so far: the Task's metrics, the score's key and the step; None before one.
        self.best: dict[str, Any] | None = None
        self.launch_images, self.launch_step_seconds = 0, 0.0  # this launch's steps, for summary.json
        self.tensorboard: TensorBoardLog | None = None  # rank 0, while fit() runs
        self._batches = None

        if resume_from is not None:
            self._load(resume_from)
        if self.dist.is_main:
            self._prepare_run_dir(resume, resume_from, changes, resume_force)
        barrier()
        self.deepspeed_logs.to_file(self.run_dir)
        self.metrics = (
            MetricsLog(self.run_dir / "metrics.jsonl", resume_step=self.step if resume_from else None)
            if self.dist.is_main
            else None
        )
        self.resumed_from = resume_from

    def _prepare_run_dir(
        self, resume: str, resume_from: Path | None, changes: Comparison | None, resume_force: bool
    ) -> None:
        """Rank 0, once the run is set up (a resume accepted): the old run aside (``--resume none``),
        the resolved config, the record of a resume and its changes."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume == "none":
            # A fresh start must not leave older checkpoints for a later `--resume auto` to pick up, nor
            # old weights, metrics, summary and TensorBoard events beside the new config.
            aside = ckpt.set_aside(self.run_dir, RUN_FILES)
            events = self.run_dir / "tensorboard"
            if aside is not None and events.is_dir():
                events.rename(aside / events.name)
            if aside is not None:
                log.warning("--resume none: moved the existing checkpoints, weights and metrics to %s", aside)
        save_config(self.cfg, self.run_dir / "config.yaml")
        if resume_from is None:
            return
        self._restore_best_weights(resume_from)
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
        """A checkpoint of this step (puzzlecam.checkpoint.Checkpointer). Non-finite weights or statistics
        are not saved (a TrainingError), so every complete checkpoint is a finite one."""
        average_buffers(self.model)
        self._check_finite("nothing is saved (no checkpoint, no model.safetensors)")
        client_state = {
            "step": self.step,
            "epoch": self.loader.epoch,
            "skipped_steps": self.skipped_steps,
            "bad_streak": self.bad_streak,
            "world_size": self.dist.world_size,
            "task": self.task.name,
            "config": self.cfg.to_dict(),
            "best_evaluation": self.best,
            # Rank 0's data position, for inspection; every rank restores its own from trainer_rank*.pt
            # (on another world size, the global position they share).
            "data": self.loader.state_dict(),
        }
        tag_dir = self.ckpt_dir / ckpt.tag_for(self.step)

        def on_written():
            self._link_best_weights(tag_dir)
            self._run_hooks("save", self.step)

        return self.checkpointer.save(self.step, client_state, self.loader, on_written=on_written)

    def _link_best_weights(self, tag_dir: Path) -> None:
        """Rank 0: the best weights so far into the checkpoint (a hard link: no space), so that a resume
        from it restores the best of its time even when a later, lost step had replaced them."""
        best = self.run_dir / BEST_MODEL
        if not self.dist.is_main or self.best is None or not best.is_file():
            return
        kept = tag_dir / BEST_MODEL
        try:
            try:
                os.link(best, kept)
            except OSError:  # a file system without hard links
                copy_file(best, kept)
        except (OSError, PuzzleCamError) as e:  # the checkpoint itself is fine: not a failed save
            log.warning(
                "checkpoint %s keeps no copy of %s (%s): a resume from it keeps the current one", tag_dir, best, e
            )

    def _restore_best_weights(self, tag_dir: Path) -> None:
        """Rank 0, on resume: ``model_best.safetensors`` as it was at the checkpoint (the steps after it are
        trained again, and their evaluations with them)."""
        best, kept = self.run_dir / BEST_MODEL, Path(tag_dir) / BEST_MODEL
        if self.best is None:
            if best.is_file():  # written by an evaluation after the checkpoint
                best.unlink()
        elif kept.is_file() and not (best.is_file() and os.path.samefile(best, kept)):
            copy_file(kept, best)

    def _run_hooks(self, event: str, step: int) -> None:
        for hook in self.hooks:
            hook(self, event, step)

    def _check_finite(self, consequence: str) -> None:
        """A TrainingError when any weight or running statistic is NaN/Inf (the same verdict on every rank)."""
        state = self.model.state_dict()
        bad = [name for name, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        (count,) = sum_across_ranks([len(bad)])
        if count == 0:
            return
        shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise TrainingError(
            f"training diverged: {len(bad)} of {len(state)} model tensors are non-finite (NaN/Inf) at step "
            f"{self.step} ({shown}); {consequence}. The last finite checkpoint is "
            f"{ckpt.latest_complete(self.ckpt_dir) or 'none'}. Lower optim.lr, enable optim.grad_clip or use "
            "train.precision=fp32."
        )

    def _load(self, tag_dir: Path) -> None:
        """Restore everything from a checkpoint; when it fails on any rank, every rank raises."""
        client = self.checkpointer.load(tag_dir, self.loader, self.cfg.data.train_shards, self.cfg.train.seed)
        self.step = int(client["step"])
        self.skipped_steps = int(client.get("skipped_steps", 0))
        self.bad_streak = int(client.get("bad_streak", 0))
        self.best = client.get("best_evaluation")
        self._batches = None

    # ------------------------------------------------------------------------------------------
    # Training

    def _set_lr(self) -> float:
        factor = poly_lr_factor(self.step, self.total_steps, self.cfg.optim.poly_power)
        for g in self.optimizer.param_groups:
            g["lr"] = self.cfg.optim.lr * g.get("lr_scale", 1.0) * factor
        return self.cfg.optim.lr * factor

    def _backward_and_step(self, loss: torch.Tensor, bad: bool, last: bool) -> float | None:
        """One micro-batch's backward and DeepSpeed's step (the optimizer step at the ``last`` micro-batch);
        ``bad``: the step is skipped on every rank. Returns the gradients' global norm before clipping at
        the last micro-batch of a good step, else None."""
        if self.zero_stage > 0:
            # ZeRO reduces the gradients into their partitions during every backward, so each micro-batch
            # goes through it; a bad step's gradients are made NaN, and DeepSpeed's overflow check skips
            # the step on every rank. Its optimizer clips (optim.grad_clip) and measures the norm.
            self.engine.backward(loss * float("nan") if bad else loss)
            self.engine.step()
            return float(self.engine.get_global_grad_norm()) if last and not bad else None
        if not bad:
            self.engine.backward(loss)  # at the last micro-batch DeepSpeed all-reduces the gradients
        norm = None
        if last:
            if bad:
                self._drop_grads()
            else:
                norm = self._clip_grads()
        self.engine.step()
        return norm

    def _clip_grads(self) -> float:
        """ZeRO stage 0: clip the (all-reduced) gradients to optim.grad_clip; returns their global norm before clipping.

        Done here rather than by DeepSpeed so that a skipped step never reaches a clipping routine
        with no gradients, and the norm is logged. fp16: the GradScaler unscales first.
        """
        params = [p for p in self.engine.module.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return 0.0
        scaler = getattr(self.engine, "torch_autocast_z0_gradscaler", None)
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def _drop_grads(self) -> None:
        """ZeRO stage 0: make the coming optimizer step a no-op on every rank (a skipped non-finite step)."""
        scaler = getattr(self.engine, "torch_autocast_z0_gradscaler", None)
        # Trained parameters only: an Inf gradient left on a frozen one (AffinityNet's backbone) would stay
        # there, outside the optimizer, and make every later step's norm Inf.
        for p in (p for p in self.engine.module.parameters() if p.requires_grad):
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
        values = self.task.step_values(self.step, self.total_steps)
        sums = None  # per StepLosses field, then the count of non-finite losses
        data_wait = 0.0
        bad = False
        self.engine.train()
        grad_norm = float("nan")
        for micro in range(t.grad_accum_steps):
            if t.cuda_graphs:  # a new iteration: the previous one's graph outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            tw = time.perf_counter()
            batch = self._next_batch()
            data_wait += time.perf_counter() - tw
            losses = self.task.losses(self.engine, batch, values, self.device)
            parts = torch.stack(list(losses)).detach().float()  # total first, then every named term
            finite = torch.isfinite(parts[0])
            # One all-reduce: the sum of every rank's losses, the count of non-finite ones, the corrupt
            # samples met in the epoch so far and those skipped since the run began.
            corrupt = parts.new_tensor([sum(self.loader.epoch_corrupt), self.loader.skipped])
            vec = torch.cat([torch.where(finite, parts, torch.zeros_like(parts)), (~finite).float()[None], corrupt])
            vec = vec.to(self.device)
            if torch.distributed.is_initialized() and self.dist.world_size > 1:
                torch.distributed.all_reduce(vec)
            vec = vec.cpu().double()
            self._check_corrupt_fraction(int(vec[-2]))
            skipped_samples = int(vec[-1])
            vec = vec[:-2]
            bad = bad or bool(vec[-1] > 0)
            sums = vec if sums is None else sums + vec
            norm = self._backward_and_step(losses.total, bad, last=micro == t.grad_accum_steps - 1)
            grad_norm = grad_norm if norm is None else norm
        n = self.dist.world_size * t.grad_accum_steps
        self.step += 1
        if bad:
            self.skipped_steps += 1
            self.bad_streak += 1
        else:
            self.bad_streak = 0
        elapsed = time.perf_counter() - start
        self.launch_images += t.global_batch_size
        self.launch_step_seconds += elapsed
        names = ["loss"] + [f"loss_{name}" for name in losses._fields[1:]]  # loss, loss_cls, ...
        mean = (sums[:-1] / n).tolist() if not bad else [float("nan")] * len(names)
        return {
            "step": self.step,
            "epoch": self.loader.epoch,
            **dict(zip(names, mean, strict=True)),
            **values,
            "lr": lr,
            "images_per_s": t.global_batch_size / max(elapsed, 1e-9),
            "data_wait_pct": 100.0 * data_wait / max(elapsed, 1e-9),
            "skipped_samples": skipped_samples,
            "skipped_steps": self.skipped_steps,
            "grad_norm": grad_norm,
            "bad_step": bad,
            "time": time.time(),
        }

    def evaluate(self) -> dict[str, Any]:
        """The Task's evaluation now (every rank); returns its metrics for the step's record, with the
        best score so far. A better score than the best so far writes ``model_best.safetensors`` (rank 0)."""
        begin = time.monotonic()
        average_buffers(self.model)  # the statistics a checkpoint or the export would hold
        result = evaluate_network(
            self.task, self.model, self.device, self.dtype, self.channels_last, self.dist.rank, self.dist.world_size
        )
        metrics = {**result.metrics, "eval_seconds": time.monotonic() - begin}
        score = result.metrics[result.score]
        if self.best is None or score > self.best[self.best["score"]]:  # the same verdict on every rank
            self._check_finite(f"no {BEST_MODEL} is written")
            self.best = {"step": self.step, "score": result.score, **result.metrics}
            failed = None
            if self.dist.is_main:
                try:
                    self._write_weights(self.run_dir / BEST_MODEL, {"score": result.score, **result.metrics})
                except PuzzleCamError as e:  # a full disk: every rank stops, none waits for rank 0
                    failed = e
            raise_if_any_rank_failed(failed)
        best_key = "eval_best_" + result.score.removeprefix("eval_")
        metrics[best_key] = self.best[self.best["score"]]
        if self.tensorboard is not None:
            self.tensorboard.images(self.step, result.images)
        log.info("%s", describe_evaluation({"step": self.step, **metrics}, result.score, self.best))
        return metrics

    def _evaluation_due(self) -> bool:
        every = self.cfg.train.eval_every
        return every > 0 and (self.step % every == 0 or self.step == self.total_steps)

    def fit(self) -> Path | None:
        """Train to ``total_steps``; returns the exported weights' path (rank 0) or None."""
        t = self.cfg.train
        bar = ProgressBar("train", self.total_steps, completed=self.step, enabled=self.dist.is_main, info=True)
        eta = Eta(self.step, self.total_steps)
        self.tensorboard = (
            TensorBoardLog(self.run_dir, resume_step=self.step if self.resumed_from else None)
            if self.dist.is_main and t.tensorboard
            else None
        )
        try:
            while self.step < self.total_steps:
                record = self.train_step()
                evaluated = self._evaluation_due()
                if evaluated:
                    record.update(self.evaluate())
                shown = self.step % t.log_every == 0 or self.step == self.total_steps
                if self.metrics is not None and (shown or record["bad_step"] or evaluated):
                    self.metrics.write(record)
                    if self.tensorboard is not None:
                        self.tensorboard.scalars(record)
                show_step(bar, self.step, record if shown else None, self.total_steps, eta.seconds(self.step))
                if self.bad_streak >= t.max_bad_steps:
                    last = ckpt.latest_complete(self.ckpt_dir)
                    raise TrainingError(
                        f"{self.bad_streak} optimizer steps in a row had a NaN/Inf loss "
                        f"(train.max_bad_steps={t.max_bad_steps}); "
                        f"stopping at step {self.step}. Last good checkpoint: {last if last else 'none'}. "
                        "Lower optim.lr, enable optim.grad_clip or use train.precision=fp32."
                    )
                # No checkpoint inside a run of bad steps: the last good one is what a resume needs.
                if (
                    t.ckpt_every > 0
                    and self.step % t.ckpt_every == 0
                    and self.step < self.total_steps
                    and self.bad_streak == 0
                ):
                    self.save()
                self._run_hooks("step", self.step)
            newest = self.checkpointer.latest()
            if newest is None or ckpt.step_of(newest.name) != self.step:  # else resumed at the end: saved
                self.save()
            return self.export()
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
            if self.tensorboard is not None:
                self.tensorboard.close()

    def _write_weights(self, path: Path, metadata: dict[str, Any]) -> None:
        """Rank 0: the Task's exported module as consolidated fp32 safetensors, with the step, the task and
        ``metadata`` (as text) in its header."""
        from safetensors.torch import save

        state = {
            k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu()
            for k, v in self.model.state_dict().items()
        }
        header = {"format": "pt", "step": str(self.step), "task": self.task.name, **self.task.export_metadata()}
        header.update({key: str(value) for key, value in metadata.items()})
        atomic_write_bytes(path, save(state, metadata=header))

    def export(self) -> Path | None:
        """The Task's exported module -> ``model.safetensors``; metrics -> Parquet; ``summary.json``."""
        average_buffers(self.model)
        self._check_finite(f"no {MODEL} is written")
        digests = replica_digests(self.model)
        out = self.run_dir / MODEL
        if self.dist.is_main:
            if len(set(digests)) != 1:
                raise TrainingError(
                    f"parameters differ between ranks at the end of training (digests {digests}): "
                    "replicas went out of sync"
                )
            atomic_write_json(self.run_dir / "summary.json", self._summary(digests))
            self._write_weights(out, {})
            self.metrics.export_parquet()
        barrier()
        return out if self.dist.is_main else None

    def _summary(self, digests: list[str]) -> dict[str, Any]:
        resumes = self.run_dir / "resumes.jsonl"
        records = read_jsonl(self.metrics.path)
        last = records[-1] if records else {}
        return {
            "steps": self.step,
            "world_size": self.dist.world_size,
            "skipped_steps": self.skipped_steps,
            # This launch's (a resumed run's summary describes the launch that finished it).
            "wall_time_s": time.monotonic() - self.started,
            "images_per_s": self.launch_images / self.launch_step_seconds if self.launch_step_seconds else None,
            "final_losses": {k: v for k, v in last.items() if k == "loss" or k.startswith("loss_")},
            "best_evaluation": self.best,
            "param_digest_per_rank": digests,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "resumes": read_jsonl(resumes) if resumes.is_file() else [],
        }


def copy_file(source: Path, target: Path) -> None:
    with open(source, "rb") as f:
        atomic_write(target, lambda out: shutil.copyfileobj(f, out))


def route_deepspeed_logs() -> DeepSpeedLogs:
    """DeepSpeed's lines to the run directory; to the console too when this rank logs at debug."""
    rank = int(os.environ.get("RANK", "0") or 0)
    return DeepSpeedLogs(rank, console=logging.getLogger("puzzlecam").isEnabledFor(logging.DEBUG))


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


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Train the config's task (classification: the Puzzle-CAM classifier) under deepspeed, "
        "torchrun or plain python.",
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
        help="an optional DeepSpeed JSON merged over the dict train.precision builds; overrides train.deepspeed_config",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve the config, index the data, print the resolved config, world size, steps per epoch and "
        "total steps (and what --resume would resume), then exit: nothing is trained or written",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    return p


def run(args: argparse.Namespace, hooks: Sequence[Hook] = ()) -> None:
    overrides = list(args.overrides)
    if args.deepspeed_config:
        overrides.append(f"train.deepspeed_config={args.deepspeed_config}")
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    cfg = load_config(args.config, overrides)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name
    if args.dry_run:
        dry_run(cfg, run_dir, args.resume, args.resume_force)
        return
    trainer = Trainer(cfg, run_dir, resume=args.resume, resume_force=args.resume_force, hooks=hooks)
    if trainer.resumed_from is not None:
        log.info("resumed from %s at step %d", trainer.resumed_from, trainer.step)
    out = trainer.fit()
    if out is not None:
        log.info("done: %d steps; weights %s", trainer.step, out)


def dry_run(cfg: Config, run_dir: Path, resume: str, resume_force: bool) -> None:
    """What a run would do, on stdout (rank 0 of a launch): the checks of a run, then its numbers. No process
    group, no network, nothing written."""
    rank = int(os.environ.get("RANK", "0") or 0)
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    route_deepspeed_logs()  # reading a checkpoint may import DeepSpeed: its lines are not output
    task = build_task(cfg)
    check_run(cfg, task, world_size)
    loader = task.train_loader(rank, world_size)
    steps_per_epoch, total_steps = count_steps(cfg, loader)
    if cfg.train.eval_every > 0:
        from puzzlecam.data import eval_loader

        evaluated = eval_loader(cfg.data.eval_shards, rank=0, world_size=1).num_samples
        evaluated = "an unknown number of" if evaluated is None else evaluated  # URLs without a manifest
    resume_from = ckpt.resolve_resume(resume, run_dir / "checkpoints")
    if resume_from is not None:
        ckpt.check_files(resume_from)
        client = ckpt.read_client_state(resume_from)
        changes = check_resume(client, cfg, world_size, resume_from, resume_force)
        elastic = [c for c in changes.allowed if c.key == "world_size"]
        written_by = f"; written by {elastic[0].old} processes: an elastic resume" if elastic else ""
        resuming = f"{resume_from} (step {client['step']}{written_by})"
    else:
        resuming = "no (a fresh run)"
    if rank != 0:
        return
    t = cfg.train
    lines = [
        f"world size: {world_size}",
        f"micro-batches per rank per epoch: {len(loader)} of {t.micro_batch_size} images",
        f"steps per epoch: {steps_per_epoch}",
        f"total steps: {total_steps} ({'train.max_steps' if t.max_steps > 0 else f'{t.epochs} train.epochs'})",
        f"evaluation: every {t.eval_every} steps and at the last, {evaluated} samples of data.eval_shards"
        if t.eval_every > 0
        else "evaluation: off (train.eval_every=0)",
        f"resume: {resuming}",
        f"run directory: {run_dir}",
    ]
    print(dump_config(cfg) + "\n".join(lines))


def main(argv: list[str] | None = None, hooks: Sequence[Hook] = ()) -> int:
    return run_command(build_parser(), lambda args: run(args, hooks), argv)


if __name__ == "__main__":
    sys.exit(main())
