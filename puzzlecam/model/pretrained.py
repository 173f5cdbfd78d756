"""Load published ImageNet weights into a backbone, strictly (docs/model.md, "Pretrained weights").

A torchvision ResNet state dict or a ResNeSt release file (``.pth`` saved with
``torch.save(model.state_dict())``, or a ``.safetensors`` file with the same names) fits our backbone
of the same arch exactly except for ``fc.weight`` / ``fc.bias``, which are ignored. Anything else that
does not fit (a missing key, an unexpected key, a shape mismatch) raises
:class:`PretrainedMismatchError` naming the file and listing the keys, with a note for the known
traps (a reduced ``model.width``; a resnest50 file, whose stem is 32 wide, against another depth).
Files saved before BatchNorm had ``num_batches_tracked`` load too: those counters are then left at
their current value. Nothing is downloaded.

A puzzlecam export (a run's ``model.safetensors``: ``backbone.*`` plus its head, e.g. ``classifier.*``)
loads too: its ``backbone.*`` weights, at any ``model.width``. The CPU demo starts AffinityNet from its
stage-1 classifier this way, having no ImageNet file (docs/demo.md); the method's stage 2 starts from
ImageNet.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from puzzlecam.errors import PretrainedMismatchError, UsageError

from .resnest import RESNEST_ARCHS

IGNORED_PREFIXES = ("fc.",)
EXPORT_BACKBONE_PREFIX = "backbone."  # a puzzlecam run's export: only these keys are the backbone's
_OPTIONAL_SUFFIX = ".num_batches_tracked"
_MAX_LISTED = 20
_RESNEST_STEM = "conv1.0.weight"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat name -> tensor mapping from a .pth/.pt (weights_only) or .safetensors file."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"model.pretrained: weights file {p} does not exist (nothing is downloaded)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p), device="cpu")
    else:
        try:  # the weights-only unpickler: a file that would run code is refused, not run
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            reason = " ".join(str(e).split()).split(". ")[0]  # torch's messages run to paragraphs
            raise PretrainedMismatchError(
                f"model.pretrained: weights file {p} cannot be read as a torch state dict ({reason})"
            ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise PretrainedMismatchError(
            f"model.pretrained: weights file {p} must hold a flat state dict (parameter name -> tensor) "
            f"as saved by torch.save(resnet.state_dict()), got {type(state).__name__}"
        )
    return dict(state)


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(shown) + more


def _stem_note(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], arch: str | None) -> str:
    """The ResNeSt stem trap: a resnest50 file has a 32-channel stem, the other depths 64 (ResNeSt issue #180)."""
    if _RESNEST_STEM not in state or _RESNEST_STEM not in own:
        return ""
    file_stem, own_stem = state[_RESNEST_STEM].shape[0], own[_RESNEST_STEM].shape[0]
    if file_stem == own_stem:
        return ""
    depths = [name for name, (_, stem) in RESNEST_ARCHS.items() if stem == file_stem]
    if not depths:
        return ""
    return (
        f"\n  note: the file's stem ({_RESNEST_STEM}) has {file_stem} output channels, that of a "
        f"{' / '.join(depths)} file, and {arch}'s has {own_stem}: use the {arch} file, or set model.arch to the "
        "file's depth"
    )


def load_pretrained(model_or_backbone: nn.Module, path: str | Path) -> nn.Module:
    """Load a published-format file into ``model_or_backbone`` (a Classifier uses its ``.backbone``).

    Strict: every backbone key must be present with the same shape (``*.num_batches_tracked`` may
    be absent), and only ``fc.*`` may be extra. Returns the backbone.
    """
    backbone = getattr(model_or_backbone, "backbone", model_or_backbone)
    state = read_state_dict(path)
    export = any(k.startswith(EXPORT_BACKBONE_PREFIX) for k in state)
    if export:
        state = {k[len(EXPORT_BACKBONE_PREFIX) :]: v for k, v in state.items() if k.startswith(EXPORT_BACKBONE_PREFIX)}
    else:
        state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    own = backbone.state_dict()

    missing = [k for k in own if k not in state and not k.endswith(_OPTIONAL_SUFFIX)]
    unexpected = sorted(k for k in state if k not in own)
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        msg = f"pretrained weights file {path} does not fit the backbone"
        arch = getattr(backbone, "arch", None)
        if arch is not None:
            msg += f" ({arch}, width {backbone.width})"
        if missing:
            msg += _listing("missing keys", missing)
        if unexpected:
            msg += _listing("unexpected keys", unexpected)
        if mismatched:
            msg += _listing("shape mismatches", mismatched)
        if export:
            msg += "\n  note: the file is a puzzlecam export: its backbone.* keys must fit model.arch and model.width"
        elif getattr(backbone, "width", 64) != 64:
            msg += "\n  note: ImageNet files fit only model.width=64 (the published widths)"
        else:
            msg += _stem_note(state, own, arch)
        raise PretrainedMismatchError(msg)

    for k in own:  # files older than BatchNorm's num_batches_tracked buffer
        if k not in state:
            state[k] = own[k]
    backbone.load_state_dict(state, strict=True)
    return backbone


def export_backbone(src: str | Path, dst: str | Path) -> int:
    """Write the backbone of a puzzlecam export (``model.safetensors``: ``backbone.*`` keys) as a torchvision /
    ResNeSt-layout state dict (``torch.save``; names without the prefix, as ImageNet files have them), which
    ``model.pretrained`` and other code read; atomically. Returns the number of tensors."""
    from puzzlecam.utils.files import atomic_write

    state = read_state_dict(src)
    backbone = {k[len(EXPORT_BACKBONE_PREFIX) :]: v for k, v in state.items() if k.startswith(EXPORT_BACKBONE_PREFIX)}
    if not backbone:
        raise UsageError(f"{src} holds no {EXPORT_BACKBONE_PREFIX}* tensors: it is not a puzzlecam run's export")
    atomic_write(dst, lambda f: torch.save(backbone, f))
    return len(backbone)
