"""Multi-scale + flip CAM inference into a CAM store (docs/inference.md).

``python -m puzzlecam.infer --weights RUN/model.safetensors --shards PATTERN --out DIR``

* The architecture comes from ``config.yaml`` beside the weights (or ``--config``); the weights are
  loaded strictly (no pretrained file is read).
* Per image and scale s: the image is resized to (round(H*s), round(W*s)) with bicubic
  interpolation on float tensors (``F.interpolate(mode="bicubic", align_corners=False,
  antialias=True)``, clamped to [0, 1] like an 8-bit image; antialiasing matches PIL's bicubic
  downscaling), normalized with the ImageNet mean/std, and run together with its horizontal flip
  as one batch. ``puzzlecam.ops.multiscale_cam`` fuses the scales (relu, flip back, resize, sum,
  labelled classes only, max-normalize).
* Output: ``{id}.npz`` (keys = channel indices 0..19, cam, hr_cam; float16; an id that is not a
  safe file name is stored under an escaped name, see puzzlecam.camstore) and, at the end,
  ``index.parquet`` (rank 0, after a barrier, from the files present) and ``infer.json`` (the
  settings). Images without labelled classes get empty arrays. Nothing is created before the first
  file is written: a run refused at the start leaves no ``--out`` behind.
* Under torchrun the images are divided across ranks (each written by exactly one). A rerun skips
  images whose file loads completely; files are written atomically (puzzlecam.utils.files).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from puzzlecam import ops
from puzzlecam.camstore import CAM_META_NAME, RW_META_NAME, changed_settings, finish_store, is_complete, write_cam
from puzzlecam.config import Config, ConfigError, load_config
from puzzlecam.errors import InferenceError
from puzzlecam.puzzle import strided_size
from puzzlecam.utils.cli import run_command
from puzzlecam.utils.distributed import barrier, init_distributed
from puzzlecam.utils.files import output_directory, remove_stale_temporaries
from puzzlecam.utils.progress import ProgressBar

log = logging.getLogger("puzzlecam.infer")  # not __name__: that is "__main__" under python -m

META_NAME = CAM_META_NAME


# ---------------------------------------------------------------------------------------------
# Model


# task -> what its network is called in messages
_NETWORKS = {"classification": "classifier", "affinity": "AffinityNet", "segmentation": "DeepLabv3+ network"}


def load_trained(
    weights: str | Path, config: str | Path | None, device: str | torch.device, task: str, command: str
) -> tuple[torch.nn.Module, Config]:
    """(the network of ``task`` in eval mode on ``device``, its Config) from a trainer's model.safetensors and the
    config.yaml beside it (or ``config``); a config of another task or weights that do not fit are refused in
    one line naming the file, ``command`` being the command that asked."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    what = _NETWORKS[task]
    weights = Path(weights)
    if not weights.is_file():
        raise InferenceError(f"--weights {weights}: no such file")
    config = Path(config) if config is not None else weights.parent / "config.yaml"
    if not config.is_file():
        raise InferenceError(f"no config {config} describing the {what} of {weights}; pass --config FILE")
    try:
        cfg = load_config(config, ["model.pretrained=null"])  # the weights file has everything
    except ConfigError as e:
        raise InferenceError(f"config {config}: {e}") from None
    if cfg.task != task:
        raise InferenceError(
            f"--weights {weights}: its config {config} says task {cfg.task!r}; {command} needs the weights of "
            f"a{'n' if what[0] in 'AEIOU' else ''} {what} (task: {task})"
        )
    model = _build_network(cfg, task)
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise InferenceError(f"--weights {weights} is not a readable safetensors file: {e}") from None
    missing, unexpected = _key_diff(model.state_dict(), state)
    problem = f"missing keys {missing[:10]}, unexpected keys {unexpected[:10]}" if missing or unexpected else None
    if problem is None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:  # shape mismatches
            problem = " ".join(str(e).split())  # one line
    if problem is not None:  # another task's or architecture's weights
        raise InferenceError(
            f"--weights {weights} does not fit the {what} of {config} ({cfg.model.arch}, width "
            f"{cfg.model.width}): {problem}"
        )
    return model.to(device).eval(), cfg


def _build_network(cfg: Config, task: str) -> torch.nn.Module:
    from puzzlecam.model import build_model
    from puzzlecam.model.affinity import build_affinity_net
    from puzzlecam.model.deeplab import build_deeplab

    if task == "affinity":
        return build_affinity_net(cfg.model)
    if task == "segmentation":
        return build_deeplab(cfg.model, cfg.segmentation)
    return build_model(cfg.model)


def load_classifier(weights: str | Path, config: str | Path | None = None, device: str | torch.device = "cpu"):
    """(classifier in eval mode on ``device``, Config) from a trainer's model.safetensors and config.yaml."""
    return load_trained(weights, config, device, "classification", "puzzlecam.infer")


def _key_diff(expected: dict, got: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))


# ---------------------------------------------------------------------------------------------
# One group of images


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def normalize(images: torch.Tensor, size: tuple[int, int], mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, h, w): bicubic resize to ``size``, clamp to [0, 1], ImageNet mean/std."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp_(0.0, 1.0)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


@torch.no_grad()
def infer_same_size(
    model, images: torch.Tensor, keys: list[torch.Tensor], scales, flip: bool, autocast, backend: str = "auto"
):
    """CAMs of images of one size: images uint8 (B, H, W, 3) on the model's device.

    Each scale runs the B images and (with ``flip``) their mirror images as one batch of 2B.
    Returns one (cam, hr_cam) pair per image (fp32, on the device).
    """
    from puzzlecam.data import IMAGENET_MEAN, IMAGENET_STD

    device = images.device
    mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=torch.float32)
    std = torch.tensor(IMAGENET_STD, device=device, dtype=torch.float32)
    b, h, w, _ = images.shape
    maps: list[list[torch.Tensor]] = [[] for _ in range(b)]
    flipped: list[list[torch.Tensor]] = [[] for _ in range(b)]
    for scale in scales:
        x = normalize(images, scaled_size((h, w), scale), mean, std)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        with autocast:
            _, cams = model(x)
        cams = cams.float()
        for i in range(b):
            maps[i].append(cams[i])
            if flip:
                flipped[i].append(cams[b + i])
    return [
        ops.multiscale_cam(maps[i], flipped[i] if flip else None, keys[i], (h, w), backend=backend) for i in range(b)
    ]


# ---------------------------------------------------------------------------------------------
# Bookkeeping


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_meta(out: Path, meta: dict, overwrite: bool) -> None:
    """Refuse to mix CAMs of different weights or settings in one store (unless --overwrite), and to write
    CAMs into a random-walk store."""
    if (out / RW_META_NAME).is_file():
        raise InferenceError(
            f"--out {out} is a random-walk store (it holds {RW_META_NAME}, written by puzzlecam.rw): "
            "write the CAMs to another directory"
        )
    differs = [] if overwrite else changed_settings(out, META_NAME, meta, ("weights_sha256", "scales", "flip"))
    if differs:
        raise InferenceError(
            f"--out {out} already holds CAMs made with other {', '.join(differs)} (see {out / META_NAME}); "
            "use another --out or pass --overwrite to recompute every image"
        )


# ---------------------------------------------------------------------------------------------
# CLI


def parse_scales(spec: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in spec.split(",") if s.strip())
    except ValueError:
        raise InferenceError(f"--scales {spec!r}: expected comma-separated numbers, e.g. 1.0,0.5,1.5,2.0") from None
    if not scales or any(not s > 0 for s in scales):
        raise InferenceError(f"--scales {spec!r}: expected one or more positive numbers")
    return scales


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m puzzlecam.infer",
        description="Multi-scale + flip CAM inference: writes {id}.npz (keys, cam, hr_cam; float16) and index.parquet. "
        "Run under torchrun to divide the images across processes; a rerun skips completed images.",
    )
    p.add_argument("--weights", type=Path, required=True, help="a trainer's model.safetensors (classifier state dict)")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="config.yaml describing the architecture (default: the one beside --weights)",
    )
    p.add_argument(
        "--shards",
        required=True,
        help="webdataset shard pattern of the images, e.g. 'data/voc/train-{000000..000002}.tar'",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (the CAM store)")
    p.add_argument(
        "--scales", default=None, help="comma-separated scales (default: the config's infer.scales, 1.0,0.5,1.5,2.0)"
    )
    p.add_argument("--no-flip", action="store_true", help="skip the horizontally flipped passes")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images batched together when they have the same size (default: infer.batch_size, 1); "
        "each image brings its flip",
    )
    add_store_run_flags(
        p,
        precision="autocast dtype of the forward passes (default fp32); fusion is fp32",
        backend="puzzlecam.ops backend of the multi-scale fusion (default auto)",
    )
    return p


def add_store_run_flags(p: argparse.ArgumentParser, precision: str, backend: str | None) -> None:
    """The flags every store-writing network pass shares (puzzlecam.infer, puzzlecam.rw, puzzlecam.segment):
    --device, --precision, --backend, --num-workers, --overwrite; ``precision`` and ``backend`` are their help
    texts (no --backend where ``backend`` is None: a command without puzzlecam.ops calls)."""
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or cuda:N (default: cuda when available; under torchrun cuda:LOCAL_RANK)",
    )
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help=precision)
    if backend is not None:
        p.add_argument("--backend", choices=ops.BACKENDS, default="auto", help=backend)
    p.add_argument("--num-workers", type=int, default=2, help="data loader workers decoding the shards (default 2)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="recompute every image even if its file is complete (and allow other settings)",
    )


def start_ranks(device_flag: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of a store-writing run: a process group under torchrun, none for a plain
    run; a bare ``cuda`` becomes cuda:LOCAL_RANK (a bad --device is refused there)."""
    dist_info = init_distributed(device_flag, single_process_group=False)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if dist_info.device.type == "cpu" and local_world > 1:  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return dist_info.rank, dist_info.world_size, dist_info.device


def claim_out(out: Path | list[Path], rank: int, check) -> None:
    """``check()`` (which refuses an --out of other settings) on every rank, then rank 0 removes the temporary
    files a crashed run left in ``out`` (a directory or several): no rank is writing yet, and none has removed
    anything before every rank has checked."""
    check()
    barrier()
    if rank == 0:
        for directory in [out] if isinstance(out, Path) else out:
            remove_stale_temporaries(directory)  # never a complete file
    barrier()


def autocast_for(device: torch.device, precision: str):
    """The autocast context of --precision (fp32: none)."""
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def check_flags(args) -> None:
    """Refuse bad flag values before any work, naming the flag."""
    if args.batch_size is not None and args.batch_size < 1:
        raise InferenceError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise InferenceError(f"--num-workers must be 0 or more, got {args.num_workers}")


def run(args) -> None:
    check_flags(args)
    with output_directory(args.out):  # created by the first file written into it
        _infer(args)


def _infer(args) -> None:
    from puzzlecam.data import eval_loader

    rank, world, device = start_ranks(args.device)
    model, cfg = load_classifier(args.weights, args.config, device)
    scales = parse_scales(args.scales) if args.scales is not None else tuple(cfg.infer.scales)
    flip = cfg.infer.flip and not args.no_flip
    batch_size = args.batch_size if args.batch_size is not None else cfg.infer.batch_size
    if batch_size < 1:
        raise InferenceError(
            f"infer.batch_size of the config must be at least 1, got {batch_size} (or pass --batch-size)"
        )
    meta = {
        "weights": str(args.weights),
        "weights_sha256": _file_digest(args.weights),
        "arch": cfg.model.arch,
        "num_classes": cfg.model.num_classes,  # the key bound of every reader (camstore.store_num_classes)
        "scales": list(scales),
        "flip": flip,
        "shards": args.shards,
        "resize": "bicubic (F.interpolate, antialias, clamped to [0, 1])",
        "precision": args.precision,
    }
    claim_out(args.out, rank, lambda: _check_meta(args.out, meta, args.overwrite))
    autocast = autocast_for(device, args.precision)
    loader = eval_loader(args.shards, num_workers=args.num_workers, rank=rank, world_size=world)
    written = skipped = empty = 0
    pending: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def flush() -> int:
        groups: dict[tuple[int, int], list] = {}
        for item in pending:
            groups.setdefault(tuple(item[1].shape[:2]), []).append(item)
        for items in groups.values():
            images = torch.stack([img for _, img, _ in items]).to(device, non_blocking=True)
            keys = [k.to(device) for _, _, k in items]
            for (image_id, _, k), (cam, hr_cam) in zip(
                items, infer_same_size(model, images, keys, scales, flip, autocast, args.backend), strict=True
            ):
                write_cam(args.out, image_id, k.cpu().numpy(), cam.cpu().numpy(), hr_cam.cpu().numpy())
        n = len(pending)
        pending.clear()
        return n

    with ProgressBar(f"CAMs (rank 0 of {world})", len(loader) or None, enabled=rank == 0) as progress:
        for batch in loader:
            image_id = batch["id"][0]
            image = batch["image"][0]
            h, w = image.shape[:2]
            if not args.overwrite and is_complete(args.out, image_id, size=(h, w)):
                skipped += 1
            else:
                keys = batch["labels"][0].nonzero().flatten()
                if keys.numel() == 0:  # nothing to localize: empty arrays, all background
                    small = strided_size((h, w), 4)
                    write_cam(
                        args.out, image_id, keys.numpy(), torch.zeros(0, *small).numpy(), torch.zeros(0, h, w).numpy()
                    )
                    empty += 1
                    written += 1
                else:
                    pending.append((image_id, image, keys))
                    if len(pending) >= batch_size:
                        written += flush()
            progress.advance()
        written += flush()

    counts = {"written": written, "skipped_complete": skipped, "no_labels": empty, "corrupt_samples": loader.skipped}
    finish_store(args.out, META_NAME, {**meta, "samples": loader.num_samples}, counts, "CAMs")


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
