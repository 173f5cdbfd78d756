"""What a resume compares: the checkpoint's run config against this run's (docs/training.md, "What a
resume compares").

A key that changes what the run trains (the model, the data and its augmentation, the losses, the
optimizer, the seed, the global batch) refuses the resume; the error names each such key with both
values. The keys of :data:`ALLOWED` may change and are reported: they extend a run, change how often
it logs or saves, how it reads its data or which code path computes it, not what it computes. The
batch layout (micro-batch, accumulation) may change only with the world size, when the global batch
stays. ``--resume-force`` accepts refused changes knowingly; the trainer records every resume, with
its changes, in the run directory (``resumes.jsonl``).

The world size may change (an elastic resume; reported as ``world_size``) where the checkpoint's
optimizer state can be loaded on the new one: a ZeRO stage 1/2 checkpoint holds one optimizer
partition per rank, which DeepSpeed 0.19 loads only on as many ranks (its universal checkpoints,
which re-partition, carry Adam's state, not SGD's momentum), and ZeRO stage 0 keeps the whole state in
rank 0's file; so a ZeRO checkpoint resumes on its own world size only, and ``train.zero_stage`` may
change between 1 and 2 (the same partitions) but not to or from 0. These are refused even with
``--resume-force``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from puzzlecam.config import Config, upgrade_legacy_keys
from puzzlecam.errors import UsageError

# Keys that may change on resume: what is trained stays the same.
ALLOWED = frozenset(
    {
        "name",
        "model.pretrained",  # read when a run starts; a resume loads the checkpoint's weights
        "data.train_shards",  # shards may move; the loader checks that they hold the same samples
        "data.num_workers",
        "data.max_corrupt_fraction",
        "train.epochs",  # extend (or shorten) the run
        "train.max_steps",
        "train.precision",  # how the arithmetic runs, not what is trained
        "train.deepspeed_config",
        "train.zero_stage",  # between 1 and 2 (check_resume refuses what cannot be loaded)
        "train.eval_every",
        "train.tensorboard",
        "data.eval_shards",
        "train.ops_backend",
        "train.channels_last",
        "train.compile",
        "train.cuda_graphs",
        "train.compile_backend",
        "train.log_every",
        "train.ckpt_every",
        "train.keep_last",
        "train.max_bad_steps",
    }
)
ALLOWED_SECTIONS = ("infer.",)  # inference settings: not read by training
# Allowed when the world size changes and train.global_batch_size stays.
BATCH_LAYOUT = ("train.micro_batch_size", "train.grad_accum_steps")


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key} (checkpoint {self.old!r}, now {self.new!r})"


@dataclass
class Comparison:
    allowed: list[Change] = field(default_factory=list)
    refused: list[Change] = field(default_factory=list)

    def as_record(self, forced: bool) -> dict[str, dict[str, list]]:
        """``{"allowed": {key: [old, new]}, "forced": {...}}`` for the run's record of resumes."""
        return {"allowed": _pairs(self.allowed), "forced": _pairs(self.refused) if forced else {}}


def _pairs(changes: list[Change]) -> dict[str, list]:
    return {c.key: [c.old, c.new] for c in changes}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def compare_configs(saved: dict[str, Any], current: Config, saved_world_size: int, world_size: int) -> Comparison:
    """Sort the differences between a checkpoint's config (its dict) and ``current`` into allowed and
    refused, in schema order. A key the checkpoint's config predates counts as its default; a key it
    has that is no longer a setting is ignored (nothing reads it)."""
    old = _flatten(upgrade_legacy_keys(saved))  # a checkpoint written before a key was renamed
    new, default = _flatten(current.to_dict()), _flatten(Config().to_dict())
    layout_may_change = (
        world_size != saved_world_size
        and old.get("train.global_batch_size", default["train.global_batch_size"]) == new["train.global_batch_size"]
    )
    comparison = Comparison()
    for key, value in new.items():
        before = old.get(key, default[key])
        if before == value:
            continue
        allowed = key in ALLOWED or key.startswith(ALLOWED_SECTIONS) or (key in BATCH_LAYOUT and layout_may_change)
        (comparison.allowed if allowed else comparison.refused).append(Change(key, before, value))
    return comparison


def check_resume(client: dict[str, Any], current: Config, world_size: int, tag_dir: Path, force: bool) -> Comparison:
    """The checkpoint's client state against this run: a UsageError when its optimizer state cannot be
    loaded on this world size or ZeRO stage, or when a refused key changed and ``force`` is off; else the
    comparison (to report and record), a changed world size among its allowed changes."""
    saved_world_size = int(client.get("world_size", world_size))
    saved_zero = int(client["config"].get("train", {}).get("zero_stage", 0))  # older checkpoints: stage 0
    zero = current.train.zero_stage
    if (saved_zero == 0) != (zero == 0):
        raise UsageError(
            f"checkpoint {tag_dir} was written with train.zero_stage={saved_zero}, this run has {zero}: ZeRO stage 0 "
            "keeps the optimizer state in one file, stages 1 and 2 one partition per rank, and one cannot be loaded "
            f"as the other; resume with train.zero_stage={'1 or 2' if saved_zero else 0}"
        )
    if saved_zero > 0 and saved_world_size != world_size:
        raise UsageError(
            f"checkpoint {tag_dir} was written by {saved_world_size} processes under ZeRO stage {saved_zero}, this run "
            f"has {world_size}: its optimizer state is partitioned over {saved_world_size} ranks, and DeepSpeed loads "
            f"ZeRO partitions only on as many (its universal checkpoints re-partition Adam's state, not SGD's "
            f"momentum); resume on {saved_world_size} processes"
        )
    comparison = compare_configs(client["config"], current, saved_world_size, world_size)
    if saved_world_size != world_size:
        comparison.allowed.insert(0, Change("world_size", saved_world_size, world_size))
    if comparison.refused and not force:
        raise UsageError(
            f"cannot resume from {tag_dir}: the config changes what the run trains: "
            f"{', '.join(str(c) for c in comparison.refused)}; start a new run (--resume none, or another "
            "--run-dir), or accept the change knowingly with --resume-force"
        )
    return comparison
