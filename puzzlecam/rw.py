"""Random-walk refinement of CAMs into a store of the CAM store's layout (docs/inference.md).

``python -m puzzlecam.rw --weights AFFINITY/model.safetensors --cams CAMSTORE --shards PATTERN --out STORE``

* The AffinityNet comes from ``config.yaml`` beside the weights (or ``--config``; its ``task`` must be
  ``affinity``); the weights are loaded strictly.
* Per image: the edge map is the sigmoid of the mean of the edge logits of the image and of its
  horizontal flip (flipped back), at stride 4, size ((H-1)//4+1, (W-1)//4+1). The normalized image
  (and its flip) is zero-padded at the bottom and right to a multiple of the output stride (and to
  at least ``--pad-size``), and the logits are cropped back: images of any size.
* The stride-4 CAMs of the CAM store (``cam``) are propagated by ``puzzlecam.ops.random_walk``
  (beta, exp_times, radius); the result is upsampled x4 (bilinear, align_corners False), cropped to
  (H, W) and divided by its single global max over classes and pixels.
* Output: ``{id}.npz`` as the CAM store (``keys`` of the CAM store; ``cam`` the stride-4 walk result;
  ``hr_cam`` the final map; float16), ``index.parquet`` and ``rw.json`` (the settings), so that
  evaluate, labels and viz read it unchanged. Images without labelled classes get empty arrays.
* Under torchrun the images are divided across ranks (each written by exactly one). A rerun skips
  images whose file loads completely; files are written atomically (puzzlecam.utils.files).
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from puzzlecam import ops
from puzzlecam.camstore import (
    CAM_STRIDE,
    RW_META_NAME,
    CamStoreError,
    cam_path,
    changed_settings,
    finish_store,
    is_complete,
    read_cam,
    shown_id,
    store_num_classes,
    write_cam,
)
from puzzlecam.errors import InferenceError, PuzzleCamError
from puzzlecam.infer import META_NAME as INFER_META_NAME
from puzzlecam.infer import (
    _file_digest,
    add_store_run_flags,
    autocast_for,
    claim_out,
    load_trained,
    normalize,
    start_ranks,
)
from puzzlecam.puzzle import strided_size
from puzzlecam.utils.cli import run_command
from puzzlecam.utils.distributed import raise_if_any_rank_failed
from puzzlecam.utils.files import output_directory
from puzzlecam.utils.progress import ProgressBar

log = logging.getLogger("puzzlecam.rw")  # not __name__: that is "__main__" under python -m

# Settings that change the maps: a store never mixes two of them (unless --overwrite).
SETTINGS = ("weights_sha256", "cams", "beta", "exp_times", "radius", "pad_size")
MAX_LISTED_IDS = 20
MAX_EXP_TIMES = 16  # the most puzzlecam.ops.random_walk takes (65,536 steps)


# ---------------------------------------------------------------------------------------------
# Model


def load_affinity_net(weights: str | Path, config: str | Path | None = None, device: str | torch.device = "cpu"):
    """(AffinityNet in eval mode on ``device``, Config) from an affinity run's model.safetensors and config.yaml."""
    return load_trained(weights, config, device, "affinity", "puzzlecam.rw")


# ---------------------------------------------------------------------------------------------
# One image


def padded_size(size: tuple[int, int], multiple: int, at_least: int = 0) -> tuple[int, int]:
    """(H, W) rounded up to a multiple of ``multiple``, each side at least ``at_least``."""
    return tuple(max(-(-s // multiple) * multiple, at_least) for s in size)


@torch.no_grad()
def edge_map(model, image: torch.Tensor, multiple: int, pad_size: int = 0, autocast=None) -> torch.Tensor:
    """Edge map (h, w) at stride 4 of one uint8 image (H, W, 3) on the model's device, in (0, 1).

    The image and its horizontal flip run as one batch of 2, normalized, zero-padded at the bottom
    and right to :func:`padded_size`; each logit map is cropped to ((H-1)//4+1, (W-1)//4+1), the
    flipped one flipped back, and the sigmoid of their mean is returned (fp32).
    """
    from puzzlecam.data import IMAGENET_MEAN, IMAGENET_STD

    device = image.device
    mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=torch.float32)
    std = torch.tensor(IMAGENET_STD, device=device, dtype=torch.float32)
    h, w = image.shape[:2]
    x = normalize(image[None], (h, w), mean, std)
    x = torch.cat([x, x.flip(-1)])
    ph, pw = padded_size((h, w), multiple, pad_size)
    x = F.pad(x, (0, pw - w, 0, ph - h))  # zeros after normalization, as the reference pads
    with autocast or nullcontext():
        logits = model(x)
    sh, sw = strided_size((h, w), CAM_STRIDE)
    logits = logits.float()[:, 0, :sh, :sw]
    return torch.sigmoid((logits[0] + logits[1].flip(-1)) / 2)


def refine(
    cams: torch.Tensor,
    edge: torch.Tensor,
    size: tuple[int, int],
    beta: float,
    exp_times: int,
    radius: int,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(walk, rw) of the stride-4 ``cams`` (K, h, w) with ``edge`` (h, w): the walk's result at stride 4
    and the final map (K, H, W): upsampled x4 (bilinear, align_corners False), cropped to ``size``,
    divided by its global max (an all-zero walk stays zero)."""
    walk = ops.random_walk(cams, edge, beta=beta, exp_times=exp_times, radius=radius, backend=backend)
    up = F.interpolate(walk[None], scale_factor=4, mode="bilinear", align_corners=False)[0, :, : size[0], : size[1]]
    peak = up.max()
    return walk, up / peak if peak > 0 else up


# ---------------------------------------------------------------------------------------------
# Bookkeeping


def _check_out(args, meta: dict) -> None:
    """Refuse an --out that is the CAM store itself, holds a CAM store, or holds rw maps of other settings."""
    if args.out.resolve() == args.cams.resolve():
        raise InferenceError(f"--out {args.out} is --cams: the random-walk maps need a store of their own")
    if (args.out / INFER_META_NAME).is_file():
        raise InferenceError(
            f"--out {args.out} holds a CAM store of puzzlecam.infer ({INFER_META_NAME}); give the random-walk "
            "maps another --out"
        )
    differs = [] if args.overwrite else changed_settings(args.out, RW_META_NAME, meta, SETTINGS)
    if differs:
        raise InferenceError(
            f"--out {args.out} already holds random-walk maps made with other {', '.join(differs)} "
            f"(see {args.out / RW_META_NAME}); use another --out or pass --overwrite to recompute every image"
        )


def _listed(ids: list[str]) -> str:
    shown = ", ".join(shown_id(i) for i in ids[:MAX_LISTED_IDS])
    return shown + (f", ... ({len(ids) - MAX_LISTED_IDS} more)" if len(ids) > MAX_LISTED_IDS else "")


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m puzzlecam.rw",
        description="Random-walk refinement of a CAM store with an AffinityNet: writes {id}.npz (keys, cam = the "
        "stride-4 walk, hr_cam = the full-size map divided by its global max; float16), index.parquet and rw.json, "
        "a store that puzzlecam.evaluate, labels and viz read like a CAM store. Run under torchrun to divide the "
        "images across processes; a rerun skips completed images.",
    )
    p.add_argument(
        "--weights", type=Path, required=True, help="an affinity run's model.safetensors (AffinityNet state dict)"
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="config.yaml of the AffinityNet, with task: affinity (default: the one beside --weights)",
    )
    p.add_argument(
        "--cams", type=Path, required=True, help="CAM store of puzzlecam.infer: its stride-4 'cam' maps are walked"
    )
    p.add_argument(
        "--shards",
        required=True,
        help="webdataset shard pattern of the images, e.g. 'data/voc/train-{000000..000002}.tar'; "
        "every image needs a CAM in --cams",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (the random-walk store)")
    p.add_argument("--beta", type=float, default=10.0, help="power of the affinities (default 10)")
    p.add_argument(
        "--exp-times",
        type=int,
        default=8,
        help=f"the walk takes 2^exp-times steps of the transition matrix, 0..{MAX_EXP_TIMES} (default 8: 256 steps)",
    )
    p.add_argument(
        "--radius", type=int, default=5, help="neighbourhood radius of the affinities, at stride 4, >= 2 (default 5)"
    )
    p.add_argument(
        "--pad-size",
        type=int,
        default=0,
        help="zero-pad each image (after normalization, bottom and right) to at least this many pixels per side; "
        "it is always padded to a multiple of the output stride. 512 is what the original code does (it fits no "
        "larger image); the edge head's GroupNorm statistics then include the padding as in training on 512 crops "
        "(default 0: the multiple only)",
    )
    add_store_run_flags(
        p,
        precision="autocast dtype of the AffinityNet's forward pass (default fp32); the walk is fp32",
        backend="puzzlecam.ops backend of the random walk (default auto: cpp on CPU, cuda on a GPU)",
    )
    return p


def check_flags(args) -> None:
    """Refuse bad flag values before any work, naming the flag."""
    if not args.beta > 0 or args.beta == float("inf"):
        raise InferenceError(f"--beta must be a positive number, got {args.beta}")
    if not 0 <= args.exp_times <= MAX_EXP_TIMES:
        raise InferenceError(f"--exp-times must be in 0..{MAX_EXP_TIMES} (2^exp-times steps), got {args.exp_times}")
    if args.radius < 2:
        raise InferenceError(f"--radius must be at least 2 (radius 1 has no neighbour), got {args.radius}")
    if args.pad_size < 0:
        raise InferenceError(f"--pad-size must be 0 or more, got {args.pad_size}")
    if args.num_workers < 0:
        raise InferenceError(f"--num-workers must be 0 or more, got {args.num_workers}")
    if not args.cams.is_dir():
        raise InferenceError(f"--cams {args.cams}: no such directory (a CAM store of puzzlecam.infer)")


def run(args) -> None:
    check_flags(args)
    with output_directory(args.out):  # created by the first file written into it
        _rw(args)


def _rw(args) -> None:
    from puzzlecam.data import eval_loader

    rank, world, device = start_ranks(args.device)
    try:
        ops.resolve_backend("random_walk", args.backend, device)
    except RuntimeError as e:
        raise InferenceError(f"--backend {args.backend}: {e}") from None
    model, cfg = load_affinity_net(args.weights, args.config, device)
    meta = {
        "weights": str(args.weights),
        "weights_sha256": _file_digest(args.weights),
        "arch": cfg.model.arch,
        "cams": str(args.cams.resolve()),
        "num_classes": store_num_classes(args.cams),  # the CAM store's: the walk keeps its keys
        "beta": args.beta,
        "exp_times": args.exp_times,
        "radius": args.radius,
        "pad_size": args.pad_size,
        "shards": args.shards,
        "precision": args.precision,
    }
    claim_out(args.out, rank, lambda: _check_out(args, meta))
    autocast = autocast_for(device, args.precision)
    loader = eval_loader(args.shards, num_workers=args.num_workers, rank=rank, world_size=world)
    written = skipped = empty = 0
    missing: list[str] = []
    failed: PuzzleCamError | None = None
    with ProgressBar(f"random walk (rank 0 of {world})", len(loader) or None, enabled=rank == 0) as progress:
        for batch in loader:
            image_id = batch["id"][0]
            image = batch["image"][0]
            size = tuple(image.shape[:2])
            progress.advance()
            if not args.overwrite and is_complete(args.out, image_id, size=size):
                skipped += 1
                continue
            if not cam_path(args.cams, image_id).is_file():
                missing.append(image_id)  # all listed at the end
                continue
            try:
                record = read_cam(args.cams, image_id, size=size, num_classes=meta["num_classes"])
            except CamStoreError as e:
                failed = e  # a refused CAM file: stop this rank, then every rank (below)
                break
            if len(record.keys) == 0:  # nothing to refine: empty arrays, all background
                write_cam(args.out, image_id, record.keys, record.cam, record.hr_cam)
                empty += 1
            else:
                edge = edge_map(model, image.to(device), cfg.model.output_stride, args.pad_size, autocast)
                cams = torch.from_numpy(record.cam).to(device, torch.float32)
                walk, rw = refine(cams, edge, size, args.beta, args.exp_times, args.radius, args.backend)
                write_cam(args.out, image_id, record.keys, walk.cpu().numpy(), rw.cpu().numpy())
            written += 1
    if failed is None and missing:
        failed = InferenceError(
            f"--cams {args.cams} has no CAM for {len(missing)} image(s) of --shards: {_listed(missing)} "
            "(CAMs of other shards? run puzzlecam.infer on these shards first)"
        )
    raise_if_any_rank_failed(failed, context="the random-walk maps written so far are complete; a rerun skips them")

    counts = {"written": written, "skipped_complete": skipped, "no_labels": empty, "corrupt_samples": loader.skipped}
    finish_store(args.out, RW_META_NAME, {**meta, "samples": loader.num_samples}, counts, "random walk")


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
