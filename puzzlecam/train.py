"""The one Trainer of every stage: DeepSpeed data-parallel training of a Task, with exact resume.

``launch/train.py`` is a thin entry around :func:`main`. The same process runs under
``deepspeed``, ``torchrun`` or plain ``python`` (docs/training.md). The config's ``task`` says what
is trained (puzzlecam.tasks: the network, its parameter groups, data and losses); the Trainer owns
the rest. One optimizer step:

1. ``grad_accum_steps`` micro-batches, each: the Task's named losses of the batch (for
   classification: normalized images + tiles, two forward passes, L = L_cls + L_pcls + alpha(t) L_re)
   -> backward of the total (DeepSpeed averages gradients over ranks);
2. every rank learns whether any rank's loss was NaN/Inf (one all-reduce, which also averages the
   logged losses and sums the epoch's corrupt samples, bounded by ``data.max_corrupt_fraction``); a
   bad step is skipped on every rank and counted, ``max_bad_steps`` in a row stop the run;
3. poly learning-rate decay per parameter group, explicit clipping of the all-reduced gradients
   (``optim.grad_clip``; the norm is logged), SGD.

Checkpoints (puzzlecam.checkpoint.Checkpointer) hold only finite state and are read without running
code; a resume is compared with the checkpoint's config first (puzzlecam.resume), and nothing in the run
directory changes until it is accepted. The method and its losses: docs/method.md; the run
directory, checkpoints, resume, failures, exit status and logging: docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from puzzlecam.errors import ConfigError, TrainingError

from . import checkpoint as ckpt
from .config import Config, load_config, save_config, validate_for_run
from .metrics import MetricsLog, read_jsonl, show_step
from .precision import autocast_dtype, deepspeed_config
from .resume import Comparison, check_resume
from .tasks import build_task
from .utils.cli import run_command
from .utils.distributed import average_buffers, barrier, init_distributed, seed_everything, sum_across_ranks
from .utils.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from .utils.progress import ProgressBar

log = logging.getLogger("puzzlecam.train")  # also under `python -m puzzlecam.train`

# A hook is called as hook(trainer, event, step) at "step" (after each optimizer step) and "save" (a
# checkpoint's files written, before COMPLETE); tests use it to inject crashes (tests/fault_injection.py).
Hook = Callable[["Trainer", str, int], None]

# The run directory's files besides checkpoints; `--resume none` moves them aside with the checkpoints.
RUN_FILES = ("config.yaml", "model.safetensors", "metrics.jsonl", "metrics.parquet", "summary.json", "resumes.jsonl")


def poly_lr_factor(step: int, total_steps: int, power: float) -> float:
    """Poly decay (1 - t/T)^power, 1 at t=0 and 0 at t=T."""
    return max(0.0, 1.0 - step / max(total_steps, 1)) ** power


class Trainer:
    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        resume: str = "auto",
        resume_force: bool = False,
        hooks: Sequence[Hook] = (),
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.hooks = list(hooks)
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
        validate_for_run(cfg, self.dist.world_size, torch.cuda.is_available())
        if not cfg.data.train_shards:
            raise ConfigError(
                "data.train_shards is empty: give the training shards, e.g. data.train_shards='shards/train-*.tar'"
            )
        changes = None
        if client is not None:
            changes = check_resume(client, cfg, self.dist.world_size, resume_from, resume_force)
        ds_config = deepspeed_config(cfg)
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
        optimizer = torch.optim.SGD(
            self.task.param_groups(network),
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            nesterov=cfg.optim.nesterov,
            weight_decay=cfg.optim.weight_decay,
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=network, optimizer=optimizer, config=ds_config)
        self.checkpointer = ckpt.Checkpointer(self.ckpt_dir, self.engine, self.dist.rank, t.keep_last)
        if t.compile:
            self.engine.compile()
        seed_everything(t.seed, self.dist.rank)

        self.loader = self.task.train_loader(self.dist.rank, self.dist.world_size)
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
            # Rank 0's data position, for inspection; every rank restores its own from trainer_rank*.pt.
            "data": self.loader.state_dict(),
        }
        return self.checkpointer.save(
            self.step, client_state, self.loader, on_written=lambda: self._run_hooks("save", self.step)
        )

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
        client = self.checkpointer.load(tag_dir, self.loader, self.cfg.data.train_shards)
        self.step = int(client["step"])
        self.skipped_steps = int(client.get("skipped_steps", 0))
        self.bad_streak = int(client.get("bad_streak", 0))
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
        values = self.task.step_values(self.step, self.total_steps)
        sums = None  # per StepLosses field, then the count of non-finite losses
        data_wait = 0.0
        bad = False
        self.engine.train()
        grad_norm = float("nan")
        for micro in range(t.grad_accum_steps):
            tw = time.perf_counter()
            batch = self._next_batch()
            data_wait += time.perf_counter() - tw
            losses = self.task.losses(self.engine, batch, values, self.device, self.dtype, self.channels_last)
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

    def export(self) -> Path | None:
        """The Task's exported module as consolidated fp32 weights -> ``model.safetensors``; metrics -> Parquet."""
        from safetensors.torch import save

        average_buffers(self.model)
        self._check_finite("no model.safetensors is written")
        digests = replica_digests(self.model)
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
                for k, v in self.model.state_dict().items()
            }
            metadata = {"format": "pt", "step": str(self.step), "task": self.task.name, **self.task.export_metadata()}
            atomic_write_bytes(out, save(state, metadata=metadata))
            self.metrics.export_parquet()
        barrier()
        return out if self.dist.is_main else None


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
    trainer = Trainer(cfg, run_dir, resume=args.resume, resume_force=args.resume_force, hooks=hooks)
    if trainer.resumed_from is not None:
        log.info("resumed from %s at step %d", trainer.resumed_from, trainer.step)
    out = trainer.fit()
    if out is not None:
        log.info("done: %d steps; weights %s", trainer.step, out)


def main(argv: list[str] | None = None, hooks: Sequence[Hook] = ()) -> int:
    return run_command(build_parser(), lambda args: run(args, hooks), argv)


if __name__ == "__main__":
    sys.exit(main())
