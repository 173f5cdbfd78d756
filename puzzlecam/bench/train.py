"""``python -m puzzlecam.bench train``: the full training step of a task, reference against fast.

Both modes run the same step as the Trainer on the same random uint8 batches. ``--task classification``
(the default; puzzlecam.tasks.classification): uint8 batch -> normalized images + tiles on the device -> two
forward passes -> L_cls + L_pcls + alpha L_re -> backward -> SGD nesterov with the four parameter groups.
``--task segmentation`` (puzzlecam.tasks.segmentation): DeepLabv3+ (frozen backbone norms, GroupNorm head of
``--head-channels``) on the images -> logits at the crop size -> the fp32 pixel cross entropy against random
label maps (255 outside each image's valid region) -> backward -> SGD with the four groups. The modes:

* ``reference``: how the original research code runs: fp32 (TF32 off, as on the GPUs it was
  written for; ``--reference-tf32`` allows it), NCHW, the pure-torch reference ops, eager.
* ``plain``: the strongest step a user assembles from plain PyTorch: the same pure-torch reference ops
  under bf16 autocast (GPU; fp32 on CPU unless ``--fast-dtype bf16``), channels_last, TF32, cudnn
  autotuning, fused SGD where torch has it, and the whole step under ``torch.compile`` (Inductor).
* ``fast``: what ``train.compile`` + ``train.cuda_graphs`` run: plain's settings with the fused ops
  (``backend=auto``: Triton on CUDA, the C++ extension on CPU) inside the compiled step, and CUDA graphs
  (torch.compile mode ``reduce-overhead``) on a GPU.

The step is the Trainer's: :class:`puzzlecam.tasks.StepModule` (input preparation, the passes, the loss terms)
then the Task's losses, backward, SGD. ``--no-compile`` leaves plain and fast eager (the default on CPU, where
Inductor's C++ builds take minutes), ``--no-cuda-graphs`` leaves out the graphs.

Reported per mode: images/s (median over timed steps; one image = one crop, with its tiles for classification),
peak memory (CUDA: max allocated; CPU: peak RSS of the process since the mode started) and MFU: the step's
matmul / convolution FLOPs (counted once on the eager reference step by torch's FlopCounterMode, 2 per
multiply-accumulate, forward and backward as autograd runs them: puzzlecam.bench.flops) per second over the
GPU's dense datasheet peak in the mode's matmul precision (bf16 for plain and fast on a GPU, fp32 -- TF32 with
``--reference-tf32`` -- for the reference). Data loading is left out (see ``python -m puzzlecam.bench data``).
DeepSpeed is not needed.
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

from puzzlecam.bench import flops as flop_count
from puzzlecam.config import Config, ModelConfig, SegmentationConfig
from puzzlecam.errors import UsageError
from puzzlecam.model import build_deeplab, build_model
from puzzlecam.tasks import StepModule, build_task
from puzzlecam.train import compile_options
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


MODES = ("reference", "plain", "fast")


def bench_config(args, mode: str) -> Config:
    """The run config the step of ``mode`` reads: the task, the model, the ops backend (reference or fused) and
    the compile settings."""
    cfg = Config()
    cfg.model = ModelConfig(arch=args.arch, width=args.width, output_stride=16, norm="train")
    if args.task == "segmentation":  # the recipe's: frozen backbone norms, GroupNorm head
        cfg.task = "segmentation"
        cfg.model = ModelConfig(arch=args.arch, width=args.width, output_stride=16, norm="frozen", num_classes=21)
        cfg.segmentation = SegmentationConfig(head_channels=args.head_channels)
    cfg.train.mode = "puzzle"
    cfg.train.ops_backend = "auto" if mode == "fast" else "reference"
    cfg.train.compile = mode != "reference" and args.compile
    cfg.train.cuda_graphs = mode == "fast" and cfg.train.compile and args.cuda_graphs
    return cfg


def bench_network(args, cfg: Config) -> torch.nn.Module:
    """The network the step trains: the classifier (``--task classification``) or DeepLabv3+."""
    if args.task == "segmentation":
        return build_deeplab(cfg.model, cfg.segmentation)
    return build_model(cfg.model)


def mode_settings(mode: str, args, device: torch.device) -> tuple[torch.dtype, bool]:
    """(autocast dtype, channels_last) of ``mode``."""
    if mode == "reference":
        return torch.float32, False
    gpu = device.type == "cuda"
    bf16 = args.fast_dtype == "bf16" or (args.fast_dtype == "auto" and gpu)
    return (torch.bfloat16 if bf16 else torch.float32), (gpu or args.channels_last_cpu)


def make_step(mode: str, args, device: torch.device):
    """(one training step on a batch -> its total loss, the config, the step module) of ``mode``."""
    cfg = bench_config(args, mode)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = mode != "reference"
        tf32 = mode != "reference" or args.reference_tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
    dtype, channels_last = mode_settings(mode, args, device)
    task = build_task(cfg)
    torch.manual_seed(0)
    network = task.build_network()
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    network = network.to(device)
    extra = {"fused": True} if mode != "reference" and device.type == "cuda" else {}
    o = cfg.optim
    try:
        opt = torch.optim.SGD(
            task.param_groups(network), lr=o.lr, momentum=0.9, nesterov=True, weight_decay=o.weight_decay, **extra
        )
    except (TypeError, RuntimeError):  # torch without fused SGD
        opt = torch.optim.SGD(
            task.param_groups(network), lr=o.lr, momentum=0.9, nesterov=True, weight_decay=o.weight_decay
        )
    module = StepModule(task, network, dtype, channels_last)
    if cfg.train.compile:
        module.compile_step(cfg.train.compile_backend, **compile_options(cfg.train))
    values = {"alpha": 2.0}

    def step(batch: dict) -> torch.Tensor:
        if cfg.train.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            losses = task.losses(module, batch, values, device)
        opt.zero_grad(set_to_none=True)
        losses.total.backward()
        opt.step()
        return losses.total.detach()

    return step, cfg, module


def count_flops(args, device: torch.device, batch: dict) -> int:
    """Matmul / convolution FLOPs of one reference step (forward and backward; puzzlecam.bench.flops)."""
    cfg = bench_config(args, "reference")
    task = build_task(cfg)
    module = StepModule(task, task.build_network().to(device), torch.float32, False)
    return flop_count.step_flops(lambda: task.losses(module, batch, {"alpha": 2.0}, device).total)


# Names (substrings) of puzzlecam's own kernels and ops in a profile: the Triton kernels, the extension's ops.
OUR_KERNELS = ("_re_loss_kernel", "_prepare_inputs_kernel", "_tile_copy_kernel", "_affinity_kernel", "puzzlecam::")


def profile_steps(step, batches: list[dict], device: torch.device, path: Path, steps: int = 3) -> dict:
    """Profile ``steps`` steps (torch.profiler): the top kernels by self device time (self CPU time on CPU) go to
    ``path``; returns the total per step and the share of puzzlecam's own kernels and ops (OUR_KERNELS)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            step(batches[i % len(batches)])
        _sync(device)
    events = prof.key_averages()

    def self_time(e) -> float:  # microseconds
        if cuda:
            return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
        return float(e.self_cpu_time_total)

    # On a GPU the device time of kernels (CPU-side ops have none); on CPU every op's self time.
    timed = [e for e in events if self_time(e) > 0]
    total = sum(self_time(e) for e in timed)
    ours = sum(self_time(e) for e in timed if any(k in e.key for k in OUR_KERNELS))
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(events.table(sort_by=sort_by, row_limit=40) + "\n")
    return {
        "profiled_steps": steps,
        "profile_ms_per_step": total / 1000 / steps,
        "puzzlecam_ops_ms_per_step": ours / 1000 / steps,
        "puzzlecam_ops_share": ours / total if total else None,
        "profile_table": str(path),
    }


def run_mode(mode: str, args, device: torch.device, batches: list[dict], step_flops: int) -> dict:
    step, cfg, _ = make_step(mode, args, device)
    dtype, channels_last = mode_settings(mode, args, device)
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
    loss = float(last)
    median = statistics.median(times)
    tf32 = mode != "reference" or args.reference_tf32
    peak = flop_count.peak_flops(device, dtype, tf32=tf32) if device.type == "cuda" else None
    profiled = {}
    if args.profile:
        profiled = profile_steps(step, batches, device, Path(args.profile) / f"profile_{args.task}_{mode}.txt")
    return {
        "mode": mode,
        "images_per_s": args.batch_size / median,
        "step_ms": 1000 * median,
        "peak_mib": peak_mib(device),
        "dtype": str(dtype).replace("torch.", ""),
        "channels_last": channels_last,
        "ops_backend": cfg.train.ops_backend,
        "compile": cfg.train.compile,
        "cuda_graphs": cfg.train.cuda_graphs,
        "tflops": step_flops / median / 1e12,
        "mfu": flop_count.mfu(step_flops, median, peak),
        "peak_tflops": None if peak is None else peak / 1e12,
        "final_loss": loss,
        **profiled,
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
    p.add_argument(
        "--modes",
        default=",".join(MODES),
        help="comma-separated modes to run, of reference, plain, fast (default all three; see above)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="plain and fast: torch.compile the whole step (default: on a GPU yes, on CPU no)",
    )
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fast on a GPU with --compile: CUDA graphs (torch.compile mode reduce-overhead; default yes)",
    )
    p.add_argument(
        "--fast-dtype",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="plain and fast precision (auto: bf16 on GPU, fp32 on CPU)",
    )
    p.add_argument("--channels-last-cpu", action="store_true", help="plain and fast on CPU: use channels_last too")
    p.add_argument(
        "--reference-tf32", action="store_true", help="reference mode on GPU: allow TF32 (default off: true fp32)"
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="after timing, profile 3 steps of each mode (torch.profiler): the top kernels go to DIR/profile_TASK_"
        "MODE.txt, and the table gets the share of the step's device time (CPU time on CPU) in puzzlecam's own "
        "kernels and ops",
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
    args.compile = gpu if args.compile is None else args.compile
    args.cuda_graphs = args.cuda_graphs and gpu
    args.warmup = args.warmup if args.warmup is not None else (10 if args.compile else 5)
    args.head_channels = args.head_channels if args.head_channels is not None else (256 if gpu else 32)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise UsageError(f"--modes: unknown mode(s) {sorted(unknown)}; choose from {', '.join(MODES)}")
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
    step_flops = count_flops(args, device, batches[0])
    results = [run_mode(m, args, device, batches, step_flops) for m in modes]

    passes = "forward, pixel cross entropy" if args.task == "segmentation" else "forward x2, losses"
    table = Table(title=f"full training step ({passes}, backward, SGD); {step_flops / 1e9:.1f} GFLOP per step")
    columns = ("mode", "images/s", "step ms", "TFLOP/s", "MFU", "peak MiB", "dtype", "channels_last", "ops")
    for col in (*columns, "compile", "CUDA graphs"):
        table.add_column(col)
    for r in results:
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        table.add_row(
            r["mode"],
            f"{r['images_per_s']:.1f}",
            f"{r['step_ms']:.1f}",
            f"{r['tflops']:.2f}",
            "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
            peak,
            r["dtype"],
            str(r["channels_last"]),
            r["ops_backend"],
            str(r["compile"]),
            str(r["cuda_graphs"]),
        )
    Console(width=max(Console().width, 130)).print(table)
    for r in results:
        if r.get("puzzlecam_ops_share") is not None:
            print(
                f"{r['mode']}: puzzlecam's kernels and ops {r['puzzlecam_ops_ms_per_step']:.3f} ms of "
                f"{r['profile_ms_per_step']:.1f} ms profiled per step ({100 * r['puzzlecam_ops_share']:.2f}%; "
                f"{r['profile_table']})"
            )
    print(
        "MFU: the step's matmul/conv FLOPs (FlopCounterMode on the eager reference step) per second over the GPU's "
        "dense datasheet peak in the mode's precision; '-' where no peak is known (CPU, other GPUs)."
    )
    by = {r["mode"]: r for r in results}
    for a, b in (("fast", "reference"), ("plain", "reference"), ("fast", "plain")):
        if a in by and b in by:
            print(f"{a} / {b}: {by[a]['images_per_s'] / by[b]['images_per_s']:.2f}x images/s")
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
                "step_gflop": step_flops / 1e9,
                "flops_counted": "matmul/conv FLOPs of one eager reference step, forward + backward "
                "(torch.utils.flop_counter.FlopCounterMode; puzzlecam.bench.flops)",
                "results": results,
            },
        )
        log.info("wrote %s", args.json)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
