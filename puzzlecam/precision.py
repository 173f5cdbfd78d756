"""``train.precision`` -> the DeepSpeed config dict and the autocast dtype (docs/training.md, "Precision").

``fp32``: no autocast. ``bf16`` / ``fp16``: ``torch_autocast`` (convolutions in half precision;
weights, BatchNorm statistics, losses and the gradients' reduction stay fp32; fp16 with DeepSpeed's
dynamic loss scaling, CUDA only). DeepSpeed's own ``fp16`` / ``bf16`` sections, which cast the whole
model, are never used.

``train.zero_stage`` (docs/training.md, "ZeRO"): 0 is plain data parallel and the Trainer clips the
all-reduced gradients itself; 1 and 2 partition the optimizer state (and, at 2, the gradients) over the
ranks, so DeepSpeed's ZeRO optimizer clips (``gradient_clipping`` = ``optim.grad_clip``), since no rank
holds every gradient. fp16 is refused under ZeRO: DeepSpeed's ZeRO optimizer measures and clips the
gradients before its GradScaler unscales them.

An optional user JSON (``train.deepspeed_config`` / ``--deepspeed_config``) is merged over the built
dict for what this file does not decide (communication settings, ZeRO bucket sizes, say; left out, the
buckets are sized to the model, see :func:`size_zero_buckets`). It may not
set what the run config decides: the optimizer, the schedule, clipping, the precision, the ZeRO stage,
the batch sizes (unless equal).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from puzzlecam.config import Config
from puzzlecam.errors import ConfigError

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_DEEPSPEED_AUTOCAST_NAMES = {"bf16": "bfloat16", "fp16": "float16"}
# Keys of a user JSON that the run config decides: key -> the setting to use instead.
_DECIDED_BY_THE_RUN_CONFIG = {
    "optimizer": "the optimizer is torch SGD built from the run config (optim.*)",
    "scheduler": "the learning-rate schedule is poly decay from the run config (optim.poly_power)",
    "gradient_clipping": "set optim.grad_clip in the run config",
    "torch_autocast": "set train.precision (fp32 | bf16 | fp16) in the run config",
    "fp16": "set train.precision: DeepSpeed's fp16 section casts the whole model, BatchNorm statistics included",
    "bf16": "set train.precision: DeepSpeed's bf16 section casts the whole model, BatchNorm statistics included",
}


def autocast_dtype(cfg: Config) -> torch.dtype:
    """The dtype the network's convolutions run in (fp32 when there is no autocast)."""
    return AUTOCAST_DTYPES[cfg.train.precision] or torch.float32


def _read_user_json(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config {p} does not exist (train.deepspeed_config / --deepspeed_config)")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {p} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"DeepSpeed config {p} must hold a JSON object, got {type(ds).__name__}")
    return ds


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed dict of this run: precision, batch sizes, the ZeRO stage and who clips; a user JSON
    merged over it. A ConfigError names the key (or the file and key of a JSON) that contradicts the run config."""
    t = cfg.train
    if t.zero_stage > 0 and t.precision == "fp16":
        raise ConfigError(
            f"train.precision=fp16 with train.zero_stage={t.zero_stage} is not supported: DeepSpeed's ZeRO optimizer "
            "clips the gradients before its GradScaler unscales them; use train.precision=bf16 (or train.zero_stage=0)"
        )
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "zero_optimization": {"stage": t.zero_stage},
        # Stage 0: the Trainer clips (optim.grad_clip) after the all-reduce; ZeRO: its optimizer does,
        # over the partitioned gradients.
        "gradient_clipping": cfg.optim.grad_clip if t.zero_stage > 0 else 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if t.precision != "fp32":
        # No "lower precision safe" modules: under ZeRO DeepSpeed would reduce the convolutions' gradients
        # in the autocast dtype; they are reduced in fp32 at every stage, as stage 0 does.
        ds["torch_autocast"] = {
            "enabled": True,
            "dtype": _DEEPSPEED_AUTOCAST_NAMES[t.precision],
            "lower_precision_safe_modules": [],
        }
    if not t.deepspeed_config:
        return ds
    path = t.deepspeed_config
    user = _read_user_json(path)
    for key, why in _DECIDED_BY_THE_RUN_CONFIG.items():
        if key in user:
            raise ConfigError(f"DeepSpeed config {path}: remove '{key}' ({why})")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in user and user[key] != ds[key]:
            raise ConfigError(
                f"DeepSpeed config {path}: '{key}' is {user[key]} but the run config gives {ds[key]}; "
                "remove it from the JSON (the run config's train.* batch settings decide)"
            )
    zero = user.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"DeepSpeed config {path}: 'zero_optimization' must be a JSON object, got {zero!r}")
    if zero.get("stage", t.zero_stage) != t.zero_stage:
        raise ConfigError(
            f"DeepSpeed config {path}: zero_optimization.stage={zero['stage']} but train.zero_stage={t.zero_stage}; "
            "remove it from the JSON and set train.zero_stage (0, 1 or 2) in the run config"
        )
    return _merge(ds, user)


# DeepSpeed's ZeRO bucket sizes (elements) when its config leaves them out.
DEEPSPEED_DEFAULT_BUCKET = 500_000_000
_BUCKET_KEYS = ("reduce_bucket_size", "allgather_bucket_size")


def size_zero_buckets(ds: dict[str, Any], num_parameters: int) -> dict[str, Any]:
    """``ds`` with ZeRO's gradient and all-gather buckets no larger than the model (rounded up to even, which
    DeepSpeed requires), where a user JSON does not set them. DeepSpeed allocates its gradient buckets at their
    full size (5e8 elements, 2 GB in fp32, per rank and per bucket); a bucket that holds the whole model reduces
    and gathers the same values in the same order, so a smaller one changes the memory, not the arithmetic."""
    zero = ds.get("zero_optimization", {})
    if zero.get("stage", 0) == 0:
        return ds
    size = min(DEEPSPEED_DEFAULT_BUCKET, num_parameters + num_parameters % 2)
    return {**ds, "zero_optimization": {**{k: size for k in _BUCKET_KEYS}, **zero}}
