"""``python -m puzzlecam.convert --kind classifier SRC DST``: the original code's weights as ours (docs/convert.md).

The original code (shjo-april/PuzzleCAM, its ``experiments.zip``) saves ``torch.save(model.state_dict())``.
Its ``Backbone`` registers the network as ``model`` and the same modules again as ``stage1`` =
``Sequential(conv1, bn1, relu, maxpool)`` and ``stage2..stage5`` = ``Sequential(layer1..layer4)``, so every
backbone tensor is in the file twice: ``model.layer1.0.conv1.weight`` is ``stage2.0.0.conv1.weight``.

The conversion:

1. reads SRC with the weights-only unpickler (:func:`puzzlecam.checkpoint.safe_load`: a file that would run
   code is refused, never run) and checks it is a flat name -> tensor mapping (a ``module.`` prefix that
   ``nn.DataParallel`` adds to every name is removed);
2. refuses non-finite values, then maps every ``stage*`` alias to its ``model.*`` name, checks that all names
   of one tensor hold equal tensors and keeps one;
3. renames ``model.*`` to our ``backbone.*`` (``classifier.weight`` keeps its name);
4. finds the arch and width whose model has exactly these names and shapes, comparing with each arch
   ``puzzlecam.model`` builds, built on the meta device (no weights allocated);
5. writes DST (safetensors, fp32, loads strictly into ``build_model``) and ``config.yaml`` beside it (the
   ``model`` section: arch, width, output stride 16, the number of classes), so that
   ``python -m puzzlecam.infer --weights DST`` works directly. Existing outputs are kept unless
   ``--overwrite``; a refused input writes nothing.

``--kind affinity`` converts the original's AffinityNet the same way: its ``backbone.0..4.*`` (a ModuleList over
stage1..5) and ``fc_edge1..6.*`` (the same modules as ``edge_layers.0..5.*``, our names) are aliases too, its
``path_indices_*`` buffers (tables recomputed from the radius) are dropped, and the output feeds
``python -m puzzlecam.rw --weights``.

``--kind deeplab`` converts the original's DeepLabv3_Plus (stage 3): ``model.*`` / ``stage1..5.*`` as above, and
its head (``core/deeplab_utils.py``: ``aspp.aspp1..4.{atrous_conv,bn}``, ``aspp.global_avg_pool.{1,2}``,
``aspp.{conv1,bn1}``, ``decoder.{conv1,bn1}``, ``decoder.classifier.*``) renamed to ours
(:data:`DEEPLAB_NAMES`). The head's norm, its widths and the number of classes are read from the file: a
GroupNorm head (the original's ``--use_gn True``, its default) gives ``segmentation.head_norm: group``; a
BatchNorm head (``--use_gn False``, its running statistics in the file) gives ``head_norm: batch``, which in
eval mode computes the same logits. The output feeds ``python -m puzzlecam.segment --weights``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import typing
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml

from puzzlecam.checkpoint import safe_load
from puzzlecam.config import ModelConfig, SegmentationConfig
from puzzlecam.deepspeed_logs import DeepSpeedLogs
from puzzlecam.errors import UsageError
from puzzlecam.utils.cli import run_command
from puzzlecam.utils.files import atomic_write_bytes, atomic_write_text, output_directory, remove_quietly

log = logging.getLogger("puzzlecam.convert")  # not __name__: that is "__main__" under python -m

CONFIG_NAME = "config.yaml"
# Every network of the original is built at output stride 16 (docs/convert.md).
OUTPUT_STRIDE = 16

# The original's aliases of ``model.*`` (its Backbone's stage1..stage5 Sequentials); relu and maxpool hold nothing.
STAGE_ALIASES = {
    "stage1.0.": "model.conv1.",
    "stage1.1.": "model.bn1.",
    "stage2.0.": "model.layer1.",
    "stage3.0.": "model.layer2.",
    "stage4.0.": "model.layer3.",
    "stage5.0.": "model.layer4.",
}
# AffinityNet adds two ModuleLists over the same modules: backbone = [stage1..stage5] and
# edge_layers = [fc_edge1..fc_edge6]; ours keeps the name edge_layers.
AFFINITY_ALIASES = {
    **{f"backbone.{i}.": f"stage{i + 1}." for i in range(5)},
    **{f"fc_edge{i + 1}.": f"edge_layers.{i}." for i in range(6)},
}
# The original DeepLabv3+'s head (core/deeplab_utils.py: ASPP, Decoder) under our names (puzzlecam.model.deeplab):
# not aliases, each tensor is in the file once. aspp.global_avg_pool and decoder.classifier are Sequentials with
# the same indices as ours (pool, conv, norm, ReLU; conv, norm, ReLU, dropout, ..., conv).
DEEPLAB_NAMES = {
    **{f"aspp.aspp{i + 1}.atrous_conv.": f"aspp.branches.{i}.0." for i in range(4)},
    **{f"aspp.aspp{i + 1}.bn.": f"aspp.branches.{i}.1." for i in range(4)},
    "aspp.global_avg_pool.": "aspp.image_pool.",
    "aspp.conv1.": "aspp.project.0.",
    "aspp.bn1.": "aspp.project.1.",
    "decoder.conv1.": "decoder.low_level.0.",
    "decoder.bn1.": "decoder.low_level.1.",
}
DEEPLAB_CLASSES = "decoder.classifier.8.weight"  # the last 1x1 conv: (num_classes, head channels, 1, 1)
DEEPLAB_LOW_LEVEL = "decoder.low_level.0.weight"  # (low-level channels, layer1's channels, 1, 1)
AFFINITY_BUFFER_PREFIX = "path_indices_"  # the original's path index tables: recomputed here, not weights
_DATA_PARALLEL_PREFIX = "module."
# Names that only another network of the original holds: (prefixes, its --kind, what it is).
_OTHER_KINDS = (
    (("fc_edge", "edge_layers.", "path_indices_"), "affinity", "an AffinityNet checkpoint"),
    (("aspp.", "decoder."), "deeplab", "a DeepLabv3+ checkpoint"),
    (("classifier.",), "classifier", "a classifier checkpoint"),
)


class KindModel(typing.NamedTuple):
    task: str  # the task our network trains under (config.yaml's task)
    head: str  # our name of the head tensor whose dim 1 is the backbone's output channels
    original_head: str  # that tensor's name in the original's file (after the stage aliases)
    what: str  # the network's name in messages
    saves: str  # what the original's file of this network holds, for messages


KIND_MODELS = {
    "classifier": KindModel(
        "classification",
        "classifier.weight",
        "classifier.weight",
        "classifier",
        "model.*, stage1..5.* and classifier.weight",
    ),
    "affinity": KindModel(
        "affinity",
        "edge_layers.4.0.weight",
        "edge_layers.4.0.weight",
        "AffinityNet",
        "model.*, stage1..5.*, backbone.*, fc_edge1..6.* and edge_layers.*",
    ),
    "deeplab": KindModel(
        "segmentation",
        "aspp.branches.0.0.weight",
        "aspp.aspp1.atrous_conv.weight",
        "DeepLabv3+",
        "model.*, stage1..5.*, aspp.* and decoder.*",
    ),
}
KINDS = tuple(KIND_MODELS)
_SHOWN = 5  # names listed per kind of difference


# ---------------------------------------------------------------------------------------------
# Reading and de-duplicating


def _not_a_torch_file(path: Path) -> str | None:
    """Why ``path`` cannot be a torch.save file (a zip archive holding data.pkl, or an older pickle), or None."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return None
        inside = [n for n in names if n.endswith(".pth")]
        example = f" (it holds {', '.join(inside[:2])}{', ...' if len(inside) > 2 else ''})" if inside else ""
        return f"is a zip archive, not a torch checkpoint{example}: extract it and convert one .pth file at a time"
    with open(path, "rb") as f:
        if f.read(1) == b"\x80":  # a pickle: torch.save before torch 1.6
            return None
    return "is not a torch checkpoint file (torch.save writes a zip archive or a pickle)"


def read_original(path: Path) -> dict[str, torch.Tensor]:
    """The flat name -> tensor mapping of an original checkpoint (weights-only; ``module.`` stripped)."""
    if not path.is_file():
        raise UsageError(f"SRC {path}: no such file")
    problem = _not_a_torch_file(path)
    if problem is not None:
        raise UsageError(f"SRC {path} {problem}")
    # safe_load imports DeepSpeed (its allow-list): its import-time line is not this command's output.
    DeepSpeedLogs(rank=0, console=log.isEnabledFor(logging.DEBUG))
    state = safe_load(path, map_location="cpu")
    if not isinstance(state, Mapping):
        raise UsageError(
            f"SRC {path} holds a {type(state).__name__}, not a state dict: expected the original code's "
            "torch.save(model.state_dict()) file (parameter name -> tensor)"
        )
    wrong = [f"{k!r}: {type(v).__name__}" for k, v in state.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if wrong or not state:
        what = f"entries that are not tensors ({', '.join(wrong[:_SHOWN])})" if wrong else "nothing"
        raise UsageError(
            f"SRC {path} holds {what}: expected the original code's torch.save(model.state_dict()) file "
            "(parameter name -> tensor)"
        )
    if all(k.startswith(_DATA_PARALLEL_PREFIX) for k in state):  # saved through nn.DataParallel
        return {k[len(_DATA_PARALLEL_PREFIX) :]: v for k, v in state.items()}
    return dict(state)


def canonical_name(name: str, kind: str = "classifier") -> str:
    """``model.*`` for a ``stage*`` alias of the original's Backbone (and, for AffinityNet, ``backbone.*``
    for its stages and ``edge_layers.*`` for ``fc_edge*``); any other name unchanged."""
    if kind == "affinity":
        for alias, target in AFFINITY_ALIASES.items():
            if name.startswith(alias):
                name = target + name[len(alias) :]
                break
    for alias, target in STAGE_ALIASES.items():
        if name.startswith(alias):
            return target + name[len(alias) :]
    return name


def _difference(a: torch.Tensor, b: torch.Tensor) -> str | None:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.dtype != b.dtype:
        return f"dtypes {a.dtype} vs {b.dtype}"
    if torch.equal(a, b):
        return None
    return f"largest difference {(a.double() - b.double()).abs().max().item():.3g}"


def drop_aliases(
    state: Mapping[str, torch.Tensor], src: Path, kind: str = "classifier"
) -> tuple[dict[str, torch.Tensor], int]:
    """(one tensor per canonical name, how many alias entries were dropped); aliases that differ are refused.

    The values must be finite (checked first: NaN never equals itself)."""
    kept: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}  # canonical name -> the file's name that was kept
    dropped = 0
    for name, tensor in state.items():
        canonical = canonical_name(name, kind)
        if canonical not in kept:
            kept[canonical], source[canonical] = tensor, name
            continue
        problem = _difference(kept[canonical], tensor)
        if problem is not None:
            raise UsageError(
                f"SRC {src}: {source[canonical]} and {name} must hold the same tensor (the original code saves "
                f"every backbone module twice, as model.* and stage1..5.*), but they differ ({problem}): the file "
                "was changed after it was saved, or is not the original code's checkpoint; nothing written"
            )
        dropped += 1
    return kept, dropped


def check_finite(state: Mapping[str, torch.Tensor], src: Path) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UsageError(
            f"SRC {src}: {len(bad)} tensor(s) hold NaN or Inf ({', '.join(bad[:_SHOWN])}): the run that saved it "
            "diverged; nothing written"
        )


# ---------------------------------------------------------------------------------------------
# Our names and the arch


def _a(what: str) -> str:
    """``what`` with its article: "a classifier", "an AffinityNet"."""
    return f"{'an' if what[0] in 'AEIOU' else 'a'} {what}"


def _refuse_other_kind(names: list[str], src: Path, kind: str) -> None:
    for prefixes, other, what in _OTHER_KINDS:
        found = [n for n in names if n.startswith(prefixes)]
        if found and other != kind:
            raise UsageError(
                f"SRC {src} is {what} (it holds {', '.join(found[:3])}, ...), not {_a(KIND_MODELS[kind].what)}: "
                f"convert it with --kind {other}"
            )


def our_name(name: str, kind: str) -> str:
    """A de-duplicated name of the original's network as ours: ``model.*`` -> ``backbone.*``, DeepLabv3+'s
    head by :data:`DEEPLAB_NAMES`; anything else unchanged."""
    if name.startswith("model."):
        return "backbone." + name[len("model.") :]
    if kind == "deeplab":
        for original, ours in DEEPLAB_NAMES.items():
            if name.startswith(original):
                return ours + name[len(original) :]
    return name


def network_state(state: Mapping[str, torch.Tensor], src: Path, kind: str) -> dict[str, torch.Tensor]:
    """The original network's de-duplicated names as ours (:func:`our_name`); AffinityNet's path index buffers
    dropped (anything that fits no network is reported by :func:`detect_model`)."""
    _refuse_other_kind(list(state), src, kind)
    model = KIND_MODELS[kind]
    if model.original_head not in state:
        raise UsageError(
            f"SRC {src} has no {model.original_head}: not {_a(model.what)} "
            f"checkpoint of the original code (its {model.what} saves {model.saves})"
        )
    return {
        our_name(k, kind): v
        for k, v in state.items()
        if not (kind == "affinity" and k.startswith(AFFINITY_BUFFER_PREFIX))
    }


def configurable_archs() -> tuple[str, ...]:
    """Every ``model.arch`` the config accepts."""
    return typing.get_args(typing.get_type_hints(ModelConfig)["arch"])


@functools.cache
def model_shapes(
    arch: str, width: int, num_classes: int, kind: str = "classifier", head: tuple[str, int, int] | None = None
) -> dict[str, tuple[int, ...]] | None:
    """name -> shape of the state dict of our network of ``kind``, built on the meta device; None if
    puzzlecam.model does not build it (an arch the config names before its backbone exists, a width the arch
    refuses). ``head``: DeepLabv3+'s (head_norm, head_channels, low_level_channels)."""
    from puzzlecam.model import build_deeplab, build_model
    from puzzlecam.model.affinity import build_affinity_net

    cfg = ModelConfig(arch=arch, width=width, num_classes=num_classes)
    try:
        with torch.device("meta"):
            if kind == "deeplab":
                model = build_deeplab(cfg, SegmentationConfig(*(head or ("group", 256, 48))))
            else:
                model = (build_affinity_net if kind == "affinity" else build_model)(cfg)
    except ValueError as e:
        log.debug("not comparing with %s at width %d: %s", arch, width, e)
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def known_archs() -> list[str]:
    """The configurable archs that puzzlecam.model builds (at width 64)."""
    return [arch for arch in configurable_archs() if model_shapes(arch, 64, 1) is not None]


def _differences(expected: Mapping[str, tuple], got: Mapping[str, tuple]) -> dict[str, list[str]]:
    return {
        "missing": [k for k in expected if k not in got],
        "unexpected": [k for k in got if k not in expected],
        "shape mismatches": [
            f"{k}: file {got[k]} vs model {expected[k]}" for k in expected if k in got and got[k] != expected[k]
        ],
    }


def _describe(differences: dict[str, list[str]]) -> str:
    parts = []
    for what, items in differences.items():
        if items:
            more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
            parts.append(f"{len(items)} {what} ({', '.join(items[:_SHOWN])}{more})")
    return "; ".join(parts)


def detect_head(shapes: Mapping[str, tuple[int, ...]]) -> tuple[SegmentationConfig, int]:
    """(DeepLabv3+'s head settings, its number of classes) from the names and shapes of its state dict: a head
    with running statistics has BatchNorm (the original's ``--use_gn False``), else GroupNorm; the widths are
    the ASPP's and the low-level projection's output channels. A missing tensor leaves the default, and the
    key is then reported by :func:`detect_model`."""
    head_keys = [k for k in shapes if k.startswith(("aspp.", "decoder."))]
    batch = any(k.endswith(".running_mean") for k in head_keys)
    default, head = SegmentationConfig(), KIND_MODELS["deeplab"].head
    seg = SegmentationConfig(
        head_norm="batch" if batch else "group",
        head_channels=shapes[head][0] if head in shapes else default.head_channels,
        low_level_channels=shapes[DEEPLAB_LOW_LEVEL][0] if DEEPLAB_LOW_LEVEL in shapes else default.low_level_channels,
    )
    num_classes = shapes[DEEPLAB_CLASSES][0] if DEEPLAB_CLASSES in shapes else 21  # VOC's, the original's default
    return seg, num_classes


def detect_model(shapes: Mapping[str, tuple[int, ...]], src: Path, kind: str = "classifier") -> ModelConfig:
    """The model config (arch, width, number of classes) whose network of ``kind`` (for DeepLabv3+ with the head
    of :func:`detect_head`) has exactly these names and shapes.

    The backbone's output channels come from the head's first tensor (``classifier.weight``, which also gives
    the number of classes; AffinityNet's last stage branch ``edge_layers.4.0.weight``; DeepLabv3+'s first ASPP
    branch); each arch's width follows from its output channels at width 64 (they scale with the width)."""
    head = KIND_MODELS[kind].head
    head_settings = None
    if kind == "classifier":
        num_classes = shapes[head][0]
    elif kind == "deeplab":
        seg, num_classes = detect_head(shapes)
        head_settings = (seg.head_norm, seg.head_channels, seg.low_level_channels)
    else:
        num_classes = ModelConfig().num_classes
    channels = shapes[head][1]
    closest: tuple[int, str, dict[str, list[str]]] | None = None
    archs = known_archs()
    for arch in archs:
        at_64 = model_shapes(arch, 64, num_classes, kind, head_settings)
        if at_64 is None or (64 * channels) % at_64[head][1]:
            continue
        width = 64 * channels // at_64[head][1]
        expected = model_shapes(arch, width, num_classes, kind, head_settings) if width >= 1 else None
        if expected is None:
            continue
        differences = _differences(expected, shapes)
        count = sum(len(v) for v in differences.values())
        if count == 0:
            return ModelConfig(arch=arch, width=width, output_stride=OUTPUT_STRIDE, num_classes=num_classes)
        if closest is None or count < closest[0]:
            closest = (count, f"{arch} at width {width}", differences)
    nearest = f"; closest: {closest[1]}: {_describe(closest[2])}" if closest else ""
    head_shape = {
        "classifier": f"a classifier of {channels} input channels and {num_classes} classes",
        "affinity": f"an AffinityNet whose last stage has {channels} channels",
        "deeplab": f"a DeepLabv3+ whose ASPP reads {channels} channels",
    }[kind]
    raise UsageError(
        f"SRC {src} fits none of the archs puzzlecam.model builds ({', '.join(archs)}) with {head_shape}{nearest}"
    )


class Converted(typing.NamedTuple):
    state: dict[str, torch.Tensor]  # our network's state dict (fp32)
    model: ModelConfig
    segmentation: SegmentationConfig | None  # DeepLabv3+'s head; None for the other kinds
    dropped: int  # alias entries checked equal and dropped


def convert_checkpoint(src: Path, kind: str = "classifier") -> Converted:
    """An original checkpoint as our network's state dict and the config sections that build that network."""
    state = read_original(src)
    check_finite(state, src)
    state, dropped = drop_aliases(state, src, kind)
    state = network_state(state, src, kind)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    cfg = detect_model(shapes, src, kind)
    seg = detect_head(shapes)[0] if kind == "deeplab" else None
    ours = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    return Converted(ours, cfg, seg, dropped)


# ---------------------------------------------------------------------------------------------
# Writing


def config_text(converted: Converted, src: Path, kind: str = "classifier") -> str:
    """The config.yaml written beside DST: the task, the model section and for DeepLabv3+ the segmentation
    section's head (everything else at its default)."""
    cfg = converted.model
    model = {"arch": cfg.arch, "width": cfg.width, "output_stride": cfg.output_stride}
    sections: dict = {"task": KIND_MODELS[kind].task, "model": model}
    if kind in ("classifier", "deeplab"):
        model["num_classes"] = cfg.num_classes
    if kind == "deeplab":
        model["norm"] = "frozen"  # the original's --mode fix (FixedBatchNorm backbone), the recipe of design.md §9
        seg = converted.segmentation
        sections["segmentation"] = {
            "head_norm": seg.head_norm,
            "head_channels": seg.head_channels,
            "low_level_channels": seg.low_level_channels,
        }
    return (
        f"# Written by python -m puzzlecam.convert from {src.name} (the original code's weights; docs/convert.md).\n"
        + yaml.safe_dump(sections, sort_keys=False)
    )


def write_outputs(converted: Converted, src: Path, dst: Path, kind: str = "classifier") -> Path:
    """DST (with the trainer's header keys: task, arch) and config.yaml beside it; if the config cannot be
    written, the new DST is removed again."""
    from safetensors.torch import save

    header = {"format": "pt", "task": KIND_MODELS[kind].task, "arch": converted.model.arch, "converted_from": src.name}
    config = dst.parent / CONFIG_NAME
    atomic_write_bytes(dst, save(converted.state, metadata=header))
    try:
        atomic_write_text(config, config_text(converted, src, kind))
    except BaseException:
        remove_quietly(dst)
        raise
    return config


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m puzzlecam.convert",
        description="Convert a checkpoint of the original Puzzle-CAM code (shjo-april/PuzzleCAM, experiments.zip: "
        "torch.save(model.state_dict()) files) into our safetensors, plus a config.yaml beside it naming the "
        "detected arch, so that `python -m puzzlecam.infer --weights DST` works directly (docs/convert.md).",
    )
    p.add_argument(
        "--kind",
        choices=KINDS,
        help="which network SRC holds: classifier (stage 1: Classifier / Classifier_For_Puzzle; DST feeds "
        "puzzlecam.infer), affinity (stage 2: AffinityNet; DST feeds puzzlecam.rw), deeplab (stage 3: "
        "DeepLabv3_Plus; DST feeds puzzlecam.segment)",
    )
    p.add_argument("src", type=Path, metavar="SRC", help="the original's checkpoint, e.g. experiments/models/TAG.pth")
    p.add_argument(
        "dst", type=Path, metavar="DST", help=f"output .safetensors file; {CONFIG_NAME} is written beside it"
    )
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing DST and {CONFIG_NAME} beside it")
    p.add_argument(
        "--to-torchvision",
        action="store_true",
        help="the other direction, instead of --kind: SRC is a puzzlecam run's model.safetensors, DST a .pth of its "
        "backbone in the torchvision / ResNeSt layout (what model.pretrained reads, like an ImageNet file)",
    )
    return p


def check_flags(args: argparse.Namespace) -> None:
    """Refuse what needs no reading of SRC: a bad DST, outputs in the way."""
    if args.dst.suffix != ".safetensors":
        raise UsageError(f"DST {args.dst} must end in .safetensors (the format puzzlecam.infer --weights reads)")
    if args.dst.resolve() == args.src.resolve():
        raise UsageError(f"DST {args.dst} is SRC: choose another output file")
    if not args.overwrite:
        for path in (args.dst, args.dst.parent / CONFIG_NAME):
            if path.exists():
                raise UsageError(f"{path} exists: pass --overwrite to replace it, or choose another DST directory")


def export_to_torchvision(args: argparse.Namespace) -> None:
    from puzzlecam.model.pretrained import export_backbone

    if args.kind is not None:
        raise UsageError("--to-torchvision reads a puzzlecam export, not the original's checkpoints: drop --kind")
    if args.dst.suffix not in (".pth", ".pt"):
        raise UsageError(f"DST {args.dst} must end in .pth or .pt (a torch.save state dict, as ImageNet files are)")
    if args.dst.exists() and not args.overwrite:
        raise UsageError(f"{args.dst} exists: pass --overwrite to replace it")
    with output_directory(args.dst.parent, flag="DST"):
        tensors = export_backbone(args.src, args.dst)
    print(f"wrote the backbone of {args.src} ({tensors} tensors) to {args.dst} (torchvision / ResNeSt layout)")


def run(args: argparse.Namespace) -> None:
    if args.to_torchvision:
        export_to_torchvision(args)
        return
    if args.kind is None:
        raise UsageError("--kind is required: classifier, affinity or deeplab (or --to-torchvision)")
    check_flags(args)
    with output_directory(args.dst.parent, flag="DST"):  # created by the first file written into it
        converted = convert_checkpoint(args.src, args.kind)
        config = write_outputs(converted, args.src, args.dst, args.kind)
    log.info("%s: %d alias entries checked equal and dropped", args.src, converted.dropped)
    cfg = converted.model
    classes = f", {cfg.num_classes} classes" if args.kind in ("classifier", "deeplab") else ""
    head = f", head_norm {converted.segmentation.head_norm}" if converted.segmentation else ""
    print(
        f"converted {args.src} -> {args.dst} ({args.kind}: {cfg.arch}, width {cfg.width}{classes}{head}, "
        f"{len(converted.state)} tensors) and {config}"
    )


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
