"""Every setting in one typed place.

A run's configuration is a tree of dataclasses (:class:`Config`). It is read from YAML files
(``launch/configs/*.yaml``), then dotted command-line overrides (``optim.lr=0.05``) are applied.
An unknown key (with the real keys it may have meant), a value of the wrong type or out of its range
(:func:`validate`, also across keys) is rejected with a :class:`ConfigError` naming the dotted key and
what was expected. :func:`save_config` writes the resolved config; reading it back
with :func:`load_config` gives an identical object.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from puzzlecam.errors import ConfigError
from puzzlecam.utils.files import atomic_write_text

log = logging.getLogger(__name__)

_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass
class ModelConfig:
    arch: Literal[
        "resnet18", "resnet34", "resnet50", "resnet101", "resnest50", "resnest101", "resnest200", "resnest269"
    ] = "resnet50"
    # Channels of the stem / first stage; 64 is torchvision's ResNet, smaller values give the
    # reduced-width variant for CPU runs (pretrained files then do not fit).
    width: int = 64
    output_stride: Literal[16, 32] = 16
    # "train": ordinary BatchNorm; "frozen": running statistics used and never updated; "sync": BatchNorm
    # whose batch statistics are computed over all ranks (the global batch, as one process would see it).
    norm: Literal["train", "frozen", "sync"] = "train"
    num_classes: int = 20
    # torchvision-format ImageNet weights (a local file; nothing is downloaded).
    pretrained: str | None = None


@dataclass
class DataConfig:
    # Local shards (a brace/glob pattern or a directory), or URLs streamed through webdataset (pipe:CMD,
    # http(s)://...; they need shuffle_buffer > 0 and a manifest.parquet beside them or data.samples_per_epoch:
    # docs/data.md "Remote shards").
    train_shards: str = ""
    # Shards of the in-training evaluation (train.eval_every); they need masks.
    eval_shards: str = ""
    crop_size: int = 512
    # Rescale so that the long side is uniform in [min_long_side, max_long_side] (bicubic).
    min_long_side: int = 320
    max_long_side: int = 640
    hflip: bool = True
    num_workers: int = 4
    # 0 = exact full shuffle per epoch; N > 0 = shards in seeded order, shuffled in windows of N
    # samples (for slow-seek storage; remote shards, URLs, need it: the window within each shard).
    shuffle_buffer: int = 0
    # Remote shards (URLs): the samples of an epoch, when no manifest.parquet is served beside them (0: read it
    # from the manifest). Every rank then yields samples_per_epoch // (world size x micro_batch_size) batches.
    samples_per_epoch: int = 0
    # Stop the run when more than this fraction of an epoch's samples could not be decoded (each is
    # skipped, logged and counted); the error names the shards with the most.
    max_corrupt_fraction: float = 0.01


@dataclass
class PuzzleConfig:
    num_pieces: int = 2
    level: Literal["feature", "cam"] = "feature"
    kind: Literal["l1", "l2"] = "l1"
    # How L_re is reduced (the original's re_loss_option): "masking" = mean over all B*C*h*w of the error
    # times the label; "selection" = per image, the mean over its labelled classes' maps, then the batch
    # mean; "none" = the plain mean. The fused kernels implement masking and none.
    re_reduction: Literal["masking", "selection", "none"] = "masking"
    alpha_max: float = 4.0
    # Fraction of training over which alpha ramps linearly from 0 to alpha_max.
    alpha_schedule: float = 0.5
    # Weight of the original's optional "conf" term: the Shannon entropy of sigmoid(tile logits)
    # (-sum_c v log(v + 1e-5), averaged over the n*n*B tiles); 0 = off. The original adds it with weight 1.
    conf_weight: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 0.1
    # The paper's reference code passed weight decay into SGD's momentum slot by mistake (effective
    # momentum 1e-4); configs state which one they use.
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    # Max global gradient norm; 0 disables clipping.
    grad_clip: float = 0.0


@dataclass
class TrainConfig:
    mode: Literal["puzzle", "baseline"] = "puzzle"
    epochs: int = 15
    # When > 0, stop after this many optimizer steps (and size the schedules by it).
    max_steps: int = 0
    # Images per optimizer step over all ranks = micro_batch_size * grad_accum_steps * world size.
    global_batch_size: int = 32
    micro_batch_size: int = 32
    grad_accum_steps: int = 1
    seed: int = 0
    # fp32, or autocast in bf16 / fp16 (fp16 with dynamic loss scaling; CUDA only). Weights, BatchNorm
    # statistics and losses stay fp32 in every mode.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # An optional DeepSpeed JSON merged over the dict train.precision builds (--deepspeed_config too).
    deepspeed_config: str = ""
    # DeepSpeed ZeRO: 0 = plain data parallel; 1 partitions the optimizer state over the ranks, 2 the
    # gradients too (docs/training.md, "ZeRO").
    zero_stage: int = 0
    ops_backend: Literal["auto", "triton", "cpp", "cuda", "reference"] = "auto"
    channels_last: bool = True
    # torch.compile the whole step (input preparation, the network's passes, the losses) as one graph,
    # fullgraph (docs/training.md, "The compiled step").
    compile: bool = False
    # torch.compile's backend: inductor (generated kernels), or aot_eager / eager to debug a graph without
    # code generation (the tests use aot_eager on CPU, where Inductor's C++ builds take minutes).
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    # CUDA graphs for the compiled step (torch.compile mode "reduce-overhead"): needs train.compile and a CUDA
    # device; the loader's fixed crop size and micro-batch keep the shapes static.
    cuda_graphs: bool = False
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    # Stop after this many consecutive non-finite losses (each skipped and counted).
    max_bad_steps: int = 5
    # Evaluate on data.eval_shards every this many optimizer steps (and at the end); 0 = off.
    eval_every: int = 0
    # TensorBoard event files under the run directory (scalars of every metrics record, CAM overlays).
    tensorboard: bool = True


@dataclass
class AffinityConfig:
    """Stage 2 (``task: affinity``, docs/training.md "Tasks")."""

    # Pairs of the loss: every pixel and its neighbours closer than this (at the edge map's stride 4);
    # the original trains with 10 (152 directions).
    radius: int = 10


@dataclass
class SegmentationConfig:
    """Stage 3 (``task: segmentation``, docs/training.md "Tasks"): DeepLabv3+ (docs/model.md, "DeepLabv3+").
    ``model.num_classes`` counts the background there (21 for VOC)."""

    # Norm of the ASPP and decoder: "group" = GroupNorm(4, C) (the original's --use_gn True), "batch" =
    # BatchNorm with this rank's batch statistics, "sync" = BatchNorm over all ranks' batch.
    head_norm: Literal["group", "batch", "sync"] = "group"
    # Width of the ASPP branches and the decoder's 3x3 convs (the original's 256), and of the decoder's
    # low-level projection (48); smaller values only for CPU runs.
    head_channels: int = 256
    low_level_channels: int = 48
    # The map that trains the network: "label" = the label.png that puzzlecam.data label-shards adds (the
    # pseudo-labels), "mask" = the shards' ground-truth seg.png (an upper bound, and tests).
    labels: Literal["label", "mask"] = "label"
    # The head's dropout in training (0.5 after the ASPP and the decoder's first conv, 0.1 after its second, as
    # the original). false turns it off: each rank draws its own masks, so only then do N processes train
    # exactly as one (the equivalence test); not for real runs.
    dropout: bool = True


@dataclass
class InferConfig:
    scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    flip: bool = True
    batch_size: int = 1


@dataclass
class Config:
    name: str = "run"
    # What the run trains: stage 1 (classification), stage 2 (affinity) or stage 3 (segmentation).
    task: Literal["classification", "affinity", "segmentation"] = "classification"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    puzzle: PuzzleConfig = field(default_factory=PuzzleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    infer: InferConfig = field(default_factory=InferConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


# ---------------------------------------------------------------------------------------------
# Typed conversion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of {tp.__name__} settings, got {value!r}")
        return _from_dict(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        for a in allowed:
            if value == a and type(value) is type(a):
                return a
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin in (tuple, list):
        (elem,) = typing.get_args(tp)[:1]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
        items = [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept plain numeric spellings for float keys.
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this module does not know
        raise ConfigError(f"config key '{key}' has an unsupported type {tp!r}")
    raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in hints:
            hint = _did_you_mean(key)
            raise ConfigError(f"unknown config key '{key}'{hint}; expected one of: {', '.join(names)}")
        kwargs[k] = _coerce(v, hints[k], key)
    obj = cls(**kwargs)
    return obj


def _all_keys(cls: Any = None, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema (``optim.lr``, ``train.max_steps``, ...)."""
    cls = Config if cls is None else cls
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        dotted = f"{prefix}{name}"
        keys += _all_keys(tp, dotted + ".") if dataclasses.is_dataclass(tp) else [dotted]
    return keys


def _did_you_mean(key: str) -> str:
    """`` (did you mean 'optim.lr'?)`` for a key with the same or a similar leaf elsewhere, else ``""``."""
    import difflib

    leaf = key.rsplit(".", 1)[-1]
    known = _all_keys()
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    close = same_leaf or difflib.get_close_matches(key, known, n=3, cutoff=0.75)
    return f" (did you mean {' or '.join(repr(k) for k in close)}?)" if close else ""


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# Public API


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a (possibly partial) nested dict."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(data).__name__}")
    cfg = _from_dict(Config, upgrade_legacy_keys(data))
    validate(cfg)
    return cfg


def upgrade_legacy_keys(data: dict[str, Any]) -> dict[str, Any]:
    """Read configs written before a key was renamed (the config.yaml of an earlier run, say).

    ``puzzle.masking: true | false`` became ``puzzle.re_reduction: masking | none``; the shipped DeepSpeed
    JSONs ``launch/configs/ds_{fp32,bf16,fp16}.json`` became ``train.precision``.
    """
    data = _upgrade_shipped_deepspeed_json(data)
    puzzle = data.get("puzzle")
    if not isinstance(puzzle, dict) or "masking" not in puzzle:
        return data
    if "re_reduction" in puzzle:
        raise ConfigError(
            "config keys 'puzzle.masking' (the old name) and 'puzzle.re_reduction' are both set: keep re_reduction"
        )
    masking = puzzle["masking"]
    if not isinstance(masking, bool):
        raise ConfigError(f"config key 'puzzle.masking' must be bool (it is now puzzle.re_reduction), got {masking!r}")
    upgraded = {k: v for k, v in puzzle.items() if k != "masking"}
    upgraded["re_reduction"] = "masking" if masking else "none"
    return {**data, "puzzle": upgraded}


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.lr=0.05"`` -> ``("optim.lr", 0.05)``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=0.05)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value {raw!r}: {e}") from None
    return key, (raw if _expects_str(key) and not isinstance(value, str) and value is not None else value)


def _expects_str(dotted: str) -> bool:
    cls: Any = Config
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        cls = hints[part]
    return cls is str or cls == (str | None)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to a nested dict (validation happens later)."""
    out = _to_plain(data) if dataclasses.is_dataclass(data) else dict(data)
    for item in overrides:
        key, value = parse_override(item)
        parts = key.split(".")
        node, schema = out, Config
        for i, p in enumerate(parts[:-1]):
            hints = typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}
            schema = hints.get(p)
            child = node.get(p)
            if (schema is not None and not dataclasses.is_dataclass(schema)) or (
                child is not None and not isinstance(child, dict)
            ):
                raise ConfigError(f"override {item!r}: '{'.'.join(parts[: i + 1])}' is not a section")
            if child is None:
                child = node[p] = {}
            node = child
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (defaults when ``path`` is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(loaded).__name__}")
        data = _drop_unused_keys(loaded, p)
    data = apply_overrides(data, overrides or [])
    try:
        return config_from_dict(data)
    except ConfigError as e:
        where = f" (in {path})" if path is not None else ""
        raise ConfigError(f"{e}{where}") from None


_SHIPPED_DEEPSPEED_JSONS = {"ds_fp32.json": "fp32", "ds_bf16.json": "bf16", "ds_fp16.json": "fp16"}


def _upgrade_shipped_deepspeed_json(data: dict[str, Any]) -> dict[str, Any]:
    train = data.get("train")
    if not isinstance(train, dict) or not isinstance(train.get("deepspeed_config"), str):
        return data
    precision = _SHIPPED_DEEPSPEED_JSONS.get(Path(train["deepspeed_config"]).name)
    if precision is None or Path(train["deepspeed_config"]).is_file():
        return data
    upgraded = {k: v for k, v in train.items() if k != "deepspeed_config"}
    upgraded.setdefault("precision", precision)
    return {**data, "train": upgraded}


_DROPPED_KEYS = (("train", "epoch_size"),)


def _drop_unused_keys(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """A config file written before ``train.epoch_size`` went (it was read by nothing) still loads; the key
    is dropped with a warning. As an override it is an unknown key."""
    out = dict(data)
    for section, key in _DROPPED_KEYS:
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section] = {k: v for k, v in out[section].items() if k != key}
            log.warning("config file %s: ignoring '%s.%s' (no longer a setting: nothing read it)", path, section, key)
    return out


# ---------------------------------------------------------------------------------------------
# Ranges and cross-field checks

# dotted key -> (check, what is expected); every key whose type alone does not bound it.
_RANGES: dict[str, tuple[Any, str]] = {
    "model.width": (lambda v: v >= 1, "at least 1"),
    "model.num_classes": (lambda v: v >= 1, "at least 1"),
    "data.crop_size": (lambda v: v >= 1, "at least 1 (pixels)"),
    "data.min_long_side": (lambda v: v >= 1, "at least 1 (pixels)"),
    "data.max_long_side": (lambda v: v >= 1, "at least 1 (pixels)"),
    "data.num_workers": (lambda v: v >= 0, "0 or more"),
    "data.shuffle_buffer": (lambda v: v >= 0, "0 or more"),
    "data.samples_per_epoch": (lambda v: v >= 0, "0 (from the manifest) or more"),
    "data.max_corrupt_fraction": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    "puzzle.num_pieces": (lambda v: v >= 1, "at least 1 (pieces per side)"),
    "puzzle.alpha_max": (lambda v: v >= 0, "0 or more"),
    "puzzle.alpha_schedule": (lambda v: v >= 0, "0 or more (a fraction of training; 0 = constant alpha)"),
    "puzzle.conf_weight": (lambda v: v >= 0, "0 or more (0 = off)"),
    "optim.lr": (lambda v: v > 0, "positive"),
    "optim.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.weight_decay": (lambda v: v >= 0, "0 or more"),
    "optim.poly_power": (lambda v: v >= 0, "0 or more"),
    "optim.grad_clip": (lambda v: v >= 0, "0 or more (0 = no clipping)"),
    "train.epochs": (lambda v: v >= 0, "0 or more"),
    "train.max_steps": (lambda v: v >= 0, "0 or more (0 = train.epochs decides)"),
    "train.global_batch_size": (lambda v: v >= 1, "at least 1"),
    "train.micro_batch_size": (lambda v: v >= 1, "at least 1"),
    "train.grad_accum_steps": (lambda v: v >= 1, "at least 1"),
    "train.log_every": (lambda v: v >= 1, "at least 1 (optimizer steps)"),
    "train.ckpt_every": (lambda v: v >= 0, "0 or more (0 = only at the end)"),
    "train.keep_last": (lambda v: v >= 1, "at least 1"),
    "train.max_bad_steps": (lambda v: v >= 1, "at least 1"),
    "train.eval_every": (lambda v: v >= 0, "0 or more (optimizer steps; 0 = off)"),
    "train.seed": (lambda v: v >= 0, "0 or more"),
    "train.zero_stage": (lambda v: v in (0, 1, 2), "0, 1 or 2 (ZeRO stage 3 is not supported)"),
    "affinity.radius": (lambda v: v >= 2, "at least 2 (pixels of the stride-4 edge map; the original's 10)"),
    "segmentation.head_channels": (lambda v: v >= 4 and v % 4 == 0, "a multiple of 4, at least 4 (GroupNorm(4, C))"),
    "segmentation.low_level_channels": (
        lambda v: v >= 4 and v % 4 == 0,
        "a multiple of 4, at least 4 (GroupNorm(4, C))",
    ),
    "infer.batch_size": (lambda v: v >= 1, "at least 1"),
    "infer.scales": (lambda v: len(v) >= 1 and all(s > 0 for s in v), "one or more positive scales"),
}


def _value(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> None:
    """Range and cross-field checks; a ConfigError names the key(s), the value(s) and what is expected."""
    for key, (ok, expected) in _RANGES.items():
        value = _value(cfg, key)
        if not ok(value):
            raise ConfigError(f"config key '{key}' must be {expected}, got {value!r}")
    d, t = cfg.data, cfg.train
    if d.min_long_side > d.max_long_side:
        raise ConfigError(
            f"config key 'data.min_long_side' ({d.min_long_side}) must not exceed 'data.max_long_side' "
            f"({d.max_long_side}): the long side is drawn from [min_long_side, max_long_side]"
        )
    n = cfg.puzzle.num_pieces
    if cfg.task == "classification" and t.mode == "puzzle" and d.crop_size % n:
        raise ConfigError(
            f"config key 'data.crop_size' ({d.crop_size}) must be divisible by 'puzzle.num_pieces' ({n}): "
            "the crop is cut into n x n tiles"
        )
    if cfg.task == "segmentation" and cfg.model.num_classes < 2:
        raise ConfigError(
            f"config key 'model.num_classes' is {cfg.model.num_classes} but task 'segmentation' needs at least 2: "
            "it counts the background (21 for VOC: background + 20 classes)"
        )
    if cfg.task == "affinity":
        _validate_affinity(cfg)
    if t.eval_every > 0 and not d.eval_shards:
        raise ConfigError(
            f"config key 'train.eval_every' is {t.eval_every} but 'data.eval_shards' is empty: give the evaluation "
            "shards (they need masks), e.g. data.eval_shards='shards/train-*.tar', or set train.eval_every=0"
        )
    if t.epochs == 0 and t.max_steps == 0:
        raise ConfigError(
            "config keys 'train.epochs' and 'train.max_steps' are both 0: set one of them (no step to train)"
        )


def _validate_affinity(cfg: Config) -> None:
    """The crop's edge map (stride 4) must hold pairs of affinity.radius: W >= 2r - 1 and H >= r."""
    r, crop = cfg.affinity.radius, cfg.data.crop_size
    edge = -(-crop // 4)
    if edge < 2 * r - 1:
        raise ConfigError(
            f"config key 'data.crop_size' ({crop}) gives a {edge}x{edge} edge map (stride 4), too small for the "
            f"pairs of 'affinity.radius' ({r}), which need {2 * r - 1} columns: use data.crop_size >= "
            f"{4 * (2 * r - 2) + 1} or a smaller affinity.radius"
        )


def validate_for_run(cfg: Config, world_size: int, cuda_available: bool) -> None:
    """The checks that need the run's facts (its world size, its devices); ConfigError naming the keys."""
    validate(cfg)
    t = cfg.train
    got = t.micro_batch_size * t.grad_accum_steps * world_size
    if got != t.global_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} but train.micro_batch_size ({t.micro_batch_size}) x "
            f"train.grad_accum_steps ({t.grad_accum_steps}) x world size ({world_size}) = {got}; "
            "change one of them so that the product equals the global batch"
        )
    if t.precision == "fp16" and not cuda_available:
        raise ConfigError("train.precision=fp16 needs a CUDA GPU (dynamic loss scaling); use bf16 or fp32 on CPU")
    if t.cuda_graphs and not t.compile:
        raise ConfigError(
            "train.cuda_graphs=true captures the compiled step: set train.compile=true too (or train.cuda_graphs=false)"
        )
    if t.cuda_graphs and t.compile_backend != "inductor":
        raise ConfigError(
            f"train.cuda_graphs=true runs Inductor's CUDA graphs: set train.compile_backend=inductor (it is "
            f"{t.compile_backend})"
        )
    if t.cuda_graphs and not cuda_available:
        raise ConfigError("train.cuda_graphs=true needs a CUDA GPU; set train.cuda_graphs=false on CPU")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, dump_config(cfg))
