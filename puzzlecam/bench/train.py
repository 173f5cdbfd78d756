"""``python -m puzzlecam.bench train``: the full training step of a task, reference against fast.

Both modes run the same step as the Trainer on the same random uint8 batches. ``--task classification``
(the default; puzzlecam.tasks.classification): uint8 batch -> normalized images + tiles on the device -> two
forward passes -> L_cls + L_pcls + alpha L_re -> backward -> SGD nesterov with the four parameter groups.
``--task segmentation`` (puzzlecam.tasks.segmentation): DeepLabv3+ (frozen backbone norms, GroupNorm head of
``--head-channels``) on the images -> logits at the crop size -> the fp32 pixel cross entropy against random
label maps (255 outside each image's valid region) -> backward -> SGD with the four groups. The modes:

* ``reference``: how the original research code runs: fp32 (TF32 off, as on the GPUs it was
  written for; ``--reference-tf32`` allows it), NCHW, the pure-torch reference ops, eager.
* ``fast``: bf16 autocast on GPU (fp32 on CPU unless ``--fast-dtype bf16``), channels_last, the
  fused ops (``backend=auto``: Triton on CUDA, the C++ extension on CPU), cudnn autotuning, fused
  SGD where torch has it, and ``--compile`` for torch.compile.

Reported per mode: images/s (median over timed steps; one image = one crop, with its tiles for classification)
and peak memory (CUDA: max allocated; CPU: peak RSS of the process since the mode started).
Data loading is left out of both (see ``python -m puzzlecam.bench data``). DeepSpeed is not needed.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from puzzlecam.config import Config, ModelConfig, SegmentationConfig
from puzzlecam.errors import UsageError
from puzzlecam.model import build_deeplab, build_model, param_groups
from puzzlecam.tasks.classification import PuzzleNet, forward_losses
from puzzlecam.tasks.segmentation import segmentation_losses
from puzzlecam.utils.cli import run_command
from puzzlecam.utils.distributed import init_distributed
from puzzlecam.utils.files import atomic_write_json

log = logging.getLogger(__name__)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process.
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batches(count: int, batch_size: int, size: int, device: torch.device, seed: int) -> list[dict]:
    """Loader-shaped uint8 batches (random content, random valid regions, 1-3 labels each, label maps of
    classes 0..20 with 255 outside the valid region)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        labels = torch.zeros(batch_size, 20)
        for b in range(batch_size):
            labels[b, torch.randperm(20, generator=g)[: int(torch.randint(1, 4, (1,), generator=g))]] = 1.0
        valid = torch.randint(size // 2, size + 1, (batch_size, 2), generator=g)
        image = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, generator=g)
        label = torch.randint(0, 21, (batch_size, size, size), generator=g)
        for b, (h, w) in enumerate(valid.tolist()):
            label[b, h:], label[b, :, w:] = 255, 255
        batch = {"image": image, "valid": valid, "labels": labels, "label": label}
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def bench_config(args, mode: str) -> Config:
    """The run config the step of ``mode`` reads: the model, and the ops backend (reference or fused)."""
    cfg = Config()
    cfg.model = ModelConfig(arch=args.arch, width=args.width, output_stride=16, norm="train")
    if args.task == "segmentation":  # the recipe's: frozen backbone norms, GroupNorm head
        cfg.model = ModelConfig(arch=args.arch, width=args.width, output_stride=16, norm="frozen", num_classes=21)
        cfg.segmentation = SegmentationConfig(head_channels=args.head_channels)
    cfg.train.mode = "puzzle"
    cfg.train.ops_backend = "auto" if mode == "fast" else "reference"
    return cfg


def bench_network(args, cfg: Config) -> torch.nn.Module:
    """The network the step trains: the classifier (``--task classification``) or DeepLabv3+."""
    if args.task == "segmentation":
        return build_deeplab(cfg.model, cfg.segmentation)
    return build_model(cfg.model)


def run_mode(mode: str, args, device: torch.device, batches: list[dict]) -> dict:
    fast = mode == "fast"
    cfg = bench_config(args, mode)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = fast
        tf32 = fast or args.reference_tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
    dtype = torch.float32
    if fast and (device.type == "cuda" or args.fast_dtype == "bf16") and args.fast_dtype != "fp32":
        dtype = torch.bfloat16
    channels_last = fast and (device.type == "cuda" or args.channels_last_cpu)

    torch.manual_seed(0)
    classifier = bench_network(args, cfg)
    if channels_last:
        classifier = classifier.to(memory_format=torch.channels_last)
    classifier = classifier.to(device)
    groups = param_groups(classifier, cfg.optim.lr, cfg.optim.weight_decay, keep_empty=False)
    extra = {}
    if fast and device.type == "cuda":
        extra["fused"] = True
    try:
        opt = torch.optim.SGD(
            groups, lr=cfg.optim.lr, momentum=0.9, nesterov=True, weight_decay=cfg.optim.weight_decay, **extra
        )
    except (TypeError, RuntimeError):  # torch without fused SGD
        opt = torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=0.9, nesterov=True, weight_decay=cfg.optim.weight_decay)
    net: torch.nn.Module = PuzzleNet(classifier)
    if fast and args.compile:
        net.classifier = torch.compile(classifier)
    backend = cfg.train.ops_backend

    def losses_of(batch: dict):
        if args.task == "segmentation":  # autocast around the network only: the loss is fp32 either way
            return segmentation_losses(net.classifier, batch, device, dtype, channels_last, backend)
        return forward_losses(net, batch, cfg, alpha=2.0, device=device, dtype=dtype, channels_last=channels_last)

    def step(batch: dict) -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            losses = losses_of(batch)
        opt.zero_grad(set_to_none=True)
        losses.total.backward()
        opt.step()
        return losses.total

    reset_peak(device)
    for i in range(args.warmup):
        step(batches[i % len(batches)])
    _sync(device)
    times = []
    last = None
    for i in range(args.steps):
        t0 = time.perf_counter()
        last = step(batches[i % len(batches)])
        _sync(device)
        times.append(time.perf_counter() - t0)
    loss = float(last.detach())
    median = statistics.median(times)
    return {
        "mode": mode,
        "images_per_s": args.batch_size / median,
        "step_ms": 1000 * median,
        "peak_mib": peak_mib(device),
        "dtype": str(dtype).replace("torch.", ""),
        "channels_last": channels_last,
        "ops_backend": cfg.train.ops_backend,
        "compile": bool(fast and args.compile),
        "final_loss": loss,
    }


def check_model(arch: str, width: int, batch_size: int, image_size: int, args=None) -> int:
    """The benchmarked network's parameter count; a model puzzlecam.model does not build, or that cannot train
    on this batch, is a UsageError naming the flag. Built and run on the meta device: no weights, no compute."""
    for flag, value, at_width in (("--arch", repr(arch), 64), ("--width", width, width)):
        try:
            with torch.device("meta"):
                model = build_model(ModelConfig(arch=arch, width=at_width))
        except ValueError as e:
            raise UsageError(f"{flag} {value}: {e}") from None
    if args is not None and args.task == "segmentation":
        try:
            with torch.device("meta"):
                model = bench_network(args, bench_config(args, "reference"))
        except ValueError as e:
            raise UsageError(f"--head-channels {args.head_channels}: {e}") from None
    try:  # the full-image pass: ResNeSt's split attention batch-normalizes one value per image and channel
        model.train()(torch.empty(batch_size, 3, image_size, image_size, device="meta"))
    except ValueError as e:
        raise UsageError(f"--batch-size {batch_size}: {arch} cannot train on it ({e})") from None
    return sum(p.numel() for p in model.parameters())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m puzzlecam.bench train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.add_argument(
        "--task",
        choices=("classification", "segmentation"),
        default="classification",
        help="the step timed: stage 1's Puzzle-CAM step (default) or stage 3's DeepLabv3+ step",
    )
    p.add_argument(
        "--head-channels",
        type=int,
        default=None,
        help="--task segmentation: the ASPP / decoder width (default: 256 on GPU, the original's; 32 on CPU)",
    )
    p.add_argument("--arch", default=None, help="backbone, any model.arch (default: resnet50 on GPU, resnet18 on CPU)")
    p.add_argument(
        "--width", type=int, default=None, help="model.width: 64 = the ImageNet widths (default: 64 on GPU, 16 on CPU)"
    )
    p.add_argument("--image-size", type=int, default=None, help="crop size (default: 512 on GPU, 96 on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: 16 on GPU, 8 on CPU)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode (default 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 10 with --compile)")
    p.add_argument("--modes", default="reference,fast", help="comma-separated modes to run (default reference,fast)")
    p.add_argument("--compile", action="store_true", help="fast mode: torch.compile the network")
    p.add_argument(
        "--fast-dtype",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="fast mode precision (auto: bf16 on GPU, fp32 on CPU)",
    )
    p.add_argument("--channels-last-cpu", action="store_true", help="fast mode on CPU: use channels_last too")
    p.add_argument(
        "--reference-tf32", action="store_true", help="reference mode on GPU: allow TF32 (default off: true fp32)"
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p


def run(args: argparse.Namespace) -> None:
    # One process, no group (unless a launcher started it); a bad --device is a usage error.
    device = init_distributed(None if args.device == "auto" else args.device, single_process_group=False).device
    gpu = device.type == "cuda"
    args.arch = args.arch or ("resnet50" if gpu else "resnet18")
    args.width = args.width if args.width is not None else (64 if gpu else 16)
    args.image_size = args.image_size if args.image_size is not None else (512 if gpu else 96)
    args.batch_size = args.batch_size if args.batch_size is not None else (16 if gpu else 8)
    args.warmup = args.warmup if args.warmup is not None else (10 if args.compile else 5)
    args.head_channels = args.head_channels if args.head_channels is not None else (256 if gpu else 32)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - {"reference", "fast"}
    if unknown:
        raise UsageError(f"--modes: unknown mode(s) {sorted(unknown)}; choose from reference, fast")
    if args.image_size < 32 or args.image_size % 32:
        raise UsageError(
            f"--image-size must be a positive multiple of 32 (2x2 tiles at output stride 16), got {args.image_size}"
        )
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    params = check_model(args.arch, args.width, args.batch_size, args.image_size, args)
    batches = make_batches(4, args.batch_size, args.image_size, device, seed=0)
    name = torch.cuda.get_device_name(device) if gpu else platform.processor() or platform.machine()
    what = f"DeepLabv3+ (head {args.head_channels})" if args.task == "segmentation" else "Puzzle-CAM"
    print(
        f"{what} train step: {args.arch} width {args.width} ({params / 1e6:.1f}M parameters), "
        f"{args.batch_size} x {args.image_size}px, "
        f"{args.steps} timed steps after {args.warmup} warm-up, on {device} ({name}), torch {torch.__version__}"
    )
    results = [run_mode(m, args, device, batches) for m in modes]

    passes = "forward, pixel cross entropy" if args.task == "segmentation" else "forward x2, losses"
    table = Table(title=f"full training step ({passes}, backward, SGD)")
    for col in ("mode", "images/s", "step ms", "peak MiB", "dtype", "channels_last", "ops", "compile"):
        table.add_column(col)
    for r in results:
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        table.add_row(
            r["mode"],
            f"{r['images_per_s']:.1f}",
            f"{r['step_ms']:.1f}",
            peak,
            r["dtype"],
            str(r["channels_last"]),
            r["ops_backend"],
            str(r["compile"]),
        )
    Console(width=max(Console().width, 110)).print(table)
    by = {r["mode"]: r for r in results}
    if "reference" in by and "fast" in by:
        print(f"fast / reference: {by['fast']['images_per_s'] / by['reference']['images_per_s']:.2f}x images/s")
    if args.json:
        atomic_write_json(
            args.json,
            {
                "device": str(device),
                "device_name": name,
                "torch": torch.__version__,
                "task": args.task,
                "arch": args.arch,
                "width": args.width,
                "head_channels": args.head_channels if args.task == "segmentation" else None,
                "params": params,
                "image_size": args.image_size,
                "batch_size": args.batch_size,
                "results": results,
            },
        )
        log.info("wrote %s", args.json)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
