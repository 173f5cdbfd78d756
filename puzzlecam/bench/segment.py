"""``python -m puzzlecam.bench segment``: multi-scale + flip segmentation inference, reference against batched.

Each mode runs puzzlecam.segment's per-image work (``segment_probabilities``, then the argmax; no CRF, no data
loading, no PNG) on the same random uint8 images with a randomly initialized DeepLabv3+ of ``--arch`` /
``--width`` / ``--head-channels``:

* ``reference``: how the original runs it: fp32, NCHW, one forward per scale and per flip.
* ``batched``: the image and its flip as one batch of 2 per scale (what puzzlecam.segment does), fp32.
* ``channels_last``: batched, the network and its inputs in channels_last, fp32.
* ``bf16``: batched under bf16 autocast (the logits are summed in fp32), channels_last on a GPU.

Reported per mode: images/s (median over --repeats passes over the images, after --warmup untimed images),
peak memory (CUDA: max allocated; CPU: peak RSS of the process since the mode started), and the check against
the reference: the largest probability difference and the share of pixels with the same label.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from puzzlecam.bench.kernels import versions
from puzzlecam.bench.rw import map_large_allocations
from puzzlecam.bench.train import peak_mib, reset_peak
from puzzlecam.config import ConfigError, ModelConfig, SegmentationConfig
from puzzlecam.errors import RunError, UsageError
from puzzlecam.infer import parse_scales
from puzzlecam.segment import DEFAULT_SCALES, segment_logits
from puzzlecam.utils.cli import run_command
from puzzlecam.utils.distributed import init_distributed
from puzzlecam.utils.files import atomic_write_json

log = logging.getLogger(__name__)

MODES = ("reference", "batched", "channels_last", "bf16")
# A mode agrees with the reference when at least this share of pixels gets the same label (bf16 moves near-ties).
MIN_AGREEMENT = {"reference": 1.0, "batched": 0.999, "channels_last": 0.999, "bf16": 0.95}


@dataclass
class Row:
    mode: str
    passes_per_forward: int
    dtype: str
    memory_format: str
    images_per_s: float | None = None
    ms_per_image: float | None = None
    peak_mib: float | None = None
    max_prob_diff: float | None = None  # against the reference
    same_label: float | None = None  # share of pixels, against the reference
    speedup: float | None = None
    check: str = "ok"


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--size: expected HxW like 375x500, got {text!r}") from None
    if h < 16 or w < 16:
        raise UsageError(f"--size: each side must be at least 16 (one stride-16 cell), got {text!r}")
    return h, w


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def build_network(args, device: torch.device):
    from puzzlecam.model.deeplab import build_deeplab

    try:
        model_cfg = ModelConfig(arch=args.arch, width=args.width, num_classes=21, norm="frozen")
        seg_cfg = SegmentationConfig(head_channels=args.head_channels, low_level_channels=args.low_level_channels)
        torch.manual_seed(0)
        return build_deeplab(model_cfg, seg_cfg).to(device).eval()
    except (ConfigError, ValueError, KeyError) as e:
        raise UsageError(f"--arch {args.arch} --width {args.width} --head-channels {args.head_channels}: {e}") from None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(mode: str, model, images, scales, flip: bool, args, device) -> tuple[Row, list[torch.Tensor]]:
    gpu = device.type == "cuda"
    channels_last = mode == "channels_last" or (mode == "bf16" and gpu)
    pair = mode != "reference"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if mode == "bf16" else None
    row = Row(
        mode,
        passes_per_forward=2 if pair and flip else 1,
        dtype="bf16" if mode == "bf16" else "fp32",
        memory_format="channels_last" if channels_last else "contiguous",
    )
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def one(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = segment_logits(
            model, image, scales, flip, autocast, pair_per_forward=pair, channels_last=channels_last
        )
        probs = torch.softmax(logits, dim=0)
        return probs, probs.argmax(0)

    for image in images[: args.warmup]:
        one(image)
    reset_peak(device)
    outputs, seconds = [], []
    for repeat in range(args.repeats):
        _sync(device)
        start = time.perf_counter()
        results = [one(image) for image in images]
        _sync(device)
        seconds.append(time.perf_counter() - start)
        if repeat == 0:
            outputs = results
    row.peak_mib = peak_mib(device)
    per_image = statistics.median(seconds) / len(images)
    row.ms_per_image, row.images_per_s = 1000 * per_image, 1 / per_image
    return row, outputs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m puzzlecam.bench segment",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default: cuda when available")
    p.add_argument("--arch", default=None, help="backbone, any model.arch (default: resnet101 on GPU, resnet18 on CPU)")
    p.add_argument("--width", type=int, default=None, help="model.width: 64 = ImageNet widths (default 64 GPU, 16 CPU)")
    p.add_argument(
        "--head-channels",
        type=int,
        default=None,
        help="ASPP / decoder width (default 256 on GPU, the original's; 32 CPU)",
    )
    p.add_argument(
        "--low-level-channels", type=int, default=None, help="decoder low-level projection (default 48 GPU, 8 CPU)"
    )
    p.add_argument("--size", default=None, help="image HxW (default 375x500, VOC's; 94x125 on CPU)")
    p.add_argument(
        "--scales", default=",".join(map(str, DEFAULT_SCALES)), help="comma-separated scales (default 0.5,1.0,1.5,2.0)"
    )
    p.add_argument("--no-flip", action="store_true", help="skip the flipped passes")
    p.add_argument("--images", type=int, default=None, help="images per timed pass (default 8 on GPU, 2 on CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the images; the median counts (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed images per mode first (default 3 GPU, 1 CPU)")
    p.add_argument(
        "--modes",
        default=None,
        help=f"comma-separated, from {', '.join(MODES)} (default: all on GPU; reference,batched,channels_last on CPU, "
        "where bf16 autocast is emulated and slow)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the figures (device, versions, date) here")
    return p


def run(args: argparse.Namespace) -> None:
    device = init_distributed(None if args.device == "auto" else args.device, single_process_group=False).device
    gpu = device.type == "cuda"
    args.arch = args.arch or ("resnet101" if gpu else "resnet18")
    args.width = args.width if args.width is not None else (64 if gpu else 16)
    args.head_channels = args.head_channels if args.head_channels is not None else (256 if gpu else 32)
    args.low_level_channels = args.low_level_channels if args.low_level_channels is not None else (48 if gpu else 8)
    size = _size(args.size or ("375x500" if gpu else "94x125"))
    args.images = args.images if args.images is not None else (8 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    modes = [m.strip() for m in (args.modes or ",".join(MODES if gpu else MODES[:3])).split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        raise UsageError(f"--modes: expected a comma-separated subset of {','.join(MODES)}, got {args.modes!r}")
    if "reference" in modes:
        modes = ["reference"] + [m for m in modes if m != "reference"]
    for flag, value, low in (
        ("--images", args.images, 1),
        ("--repeats", args.repeats, 1),
        ("--warmup", args.warmup, 0),
    ):
        if value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    scales = parse_scales(args.scales)
    flip = not args.no_flip
    if not gpu and not map_large_allocations():
        log.warning("could not set glibc's mmap threshold: CPU peak memory may miss reused heap memory")
    model = build_network(args, device)
    gen = torch.Generator().manual_seed(0)
    images = [
        torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=gen).to(device) for _ in range(args.images)
    ]
    rows: list[Row] = []
    reference = None
    for mode in modes:
        log.info("mode %s", mode)
        row, outputs = run_mode(mode, model, images, scales, flip, args, device)
        rows.append(row)
        if mode == "reference":
            reference = outputs
        elif reference is not None:
            row.max_prob_diff = max(
                (p - q).abs().max().item() for (p, _), (q, _) in zip(outputs, reference, strict=True)
            )
            same = sum((a == b).sum().item() for (_, a), (_, b) in zip(outputs, reference, strict=True))
            row.same_label = same / sum(b.numel() for _, b in reference)
            row.speedup = rows[0].ms_per_image / row.ms_per_image
            if row.same_label < MIN_AGREEMENT[mode]:
                row.check = f"labels agree on {100 * row.same_label:.2f} % < {100 * MIN_AGREEMENT[mode]:.1f} %"
    device_name = (
        torch.cuda.get_device_name(device)
        if gpu
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    title = (
        f"segmentation inference: DeepLabv3+ {args.arch} width {args.width} head {args.head_channels}, {size[0]}x"
        f"{size[1]}, scales {','.join(map(str, scales))}{' + flip' if flip else ''}, on {device_name}"
    )
    table = Table(title=title)
    columns = (
        "mode",
        "passes/forward",
        "dtype",
        "layout",
        "images/s",
        "ms/image",
        "peak MiB",
        "max |dp|",
        "same label",
    )
    for col in (*columns, "speedup", "check"):
        table.add_column(col, justify="left" if col in ("mode", "dtype", "layout", "check") else "right")
    for r in rows:
        table.add_row(
            r.mode,
            str(r.passes_per_forward),
            r.dtype,
            r.memory_format,
            _fmt(r.images_per_s, ".2f"),
            _fmt(r.ms_per_image, ".1f"),
            _fmt(r.peak_mib, ".0f"),
            _fmt(r.max_prob_diff, ".1e"),
            "-" if r.same_label is None else f"{100 * r.same_label:.3f} %",
            _fmt(r.speedup, ".2f"),
            r.check if r.check == "ok" else f"[red]{r.check}[/red]",
        )
    Console(width=max(150, Console().width)).print(table)
    print(
        "per image: every scale (and flip) through the network, logits resized and summed, softmax, argmax; "
        "peak MiB: CUDA max allocated, CPU peak RSS of the process; checks against the reference mode."
    )
    if args.json:
        atomic_write_json(
            args.json,
            {
                "device": device_name,
                "device_type": device.type,
                "versions": versions(),
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "settings": {
                    "arch": args.arch,
                    "width": args.width,
                    "head_channels": args.head_channels,
                    "low_level_channels": args.low_level_channels,
                    "size": list(size),
                    "scales": list(scales),
                    "flip": flip,
                    "images": args.images,
                    "repeats": args.repeats,
                    "warmup": args.warmup,
                },
                "results": [asdict(r) for r in rows],
            },
        )
        log.info("wrote %s", args.json)
    failed = [r for r in rows if r.check != "ok"]
    if failed:
        raise RunError(f"{len(failed)} mode(s) failed their check against the reference (see the table)")


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
