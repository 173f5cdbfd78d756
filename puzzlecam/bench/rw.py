"""``python -m puzzlecam.bench rw``: the sparse random walk per backend against the original's dense one, and
the fused affinity loss per backend against the eager reference (docs/affinity.md).

Random walk (``--sizes``, default 48x48 and the VOC-sized 94x125, ``--classes`` 3, beta 10, 256 steps):
every backend of ``puzzlecam.ops.random_walk`` and the original's dense hw x hw method
(``puzzlecam.affinity.random_walk_dense``). Each backend is checked first against the dense result where
the dense method runs, else against the float64 sparse reference, then timed. The dense method runs
only up to ``--dense-max-pixels``; above that its time and memory are extrapolated from the largest size
it ran at (time x (n / n0)^3, memory x (n / n0)^2, n = h * w) and marked as such.

Affinity loss (``--loss-batch`` x 1 x ``--loss-size``^2 edge maps, radius 10: a 512 px crop at stride 4):
forward + backward of ``puzzlecam.affinity.affinity_loss`` through every backend of
``puzzlecam.ops.affinity_sums``, checked against the reference (the four terms and the edge gradient).

Times are medians; peak memory is above the memory before the call (CUDA: max allocated; CPU: peak
resident set size of the process, with glibc set to map every allocation over 64 KiB on its own so that
freed memory reused by the next call is counted). Triton under its CPU interpreter is never timed.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import logging
import math
import platform
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from puzzlecam import ops
from puzzlecam.affinity import affinity_loss, random_walk_dense, random_walk_reference
from puzzlecam.bench.kernels import Timer, versions
from puzzlecam.bench.train import peak_mib, reset_peak
from puzzlecam.errors import RunError, UsageError
from puzzlecam.utils.cli import run_command
from puzzlecam.utils.distributed import init_distributed
from puzzlecam.utils.files import atomic_write_json
from puzzlecam.utils.progress import ProgressBar

log = logging.getLogger(__name__)

WALK_TOLERANCE = 1e-3  # max |error| / max |expected|: fp32 over 256 steps (or 8 squarings) of the walk
LOSS_TOLERANCE = 1e-4  # the same for the loss terms and the edge gradient (fp32 sums of ~10^7 pairs)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@dataclass
class Row:
    part: str  # "walk" or "loss"
    size: str  # walk: the stride-4 map h x w; loss: batch x edge map side
    backend: str
    check: str = "skipped"
    against: str = ""  # what the result was checked against
    max_rel_error: float | None = None
    ms: float | None = None  # walk: one image; loss: forward + backward of the batch
    peak_mib: float | None = None
    speedup: float | None = None  # walk: over the dense method; loss: over the reference
    extrapolated: bool = False
    note: str = ""


def _size(text: str, flag: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"{flag}: expected HxW sizes like 94x125, got {text!r}") from None
    if h < 1 or w < 1:
        raise UsageError(f"{flag}: sizes must be positive, got {text!r}")
    return h, w


def _rel_error(got, want) -> float:
    scale = max(t.abs().max().item() for t in want)
    return max((g.double() - e.double()).abs().max().item() for g, e in zip(got, want, strict=True)) / max(scale, 1e-30)


def map_large_allocations() -> bool:
    """Make glibc serve (and return on free) every allocation over 64 KiB with its own mapping, so that the
    peak RSS during a call counts what it allocates; without this, freed heap memory is reused unseen."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024))
    except (OSError, AttributeError):  # not glibc
        return False


def call_with_peak(fn, device: torch.device):
    """(fn(), the MiB the call needed above what was in use before it)."""
    reset_peak(device)
    base = peak_mib(device)  # right after the reset the peak is the current use
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = peak_mib(device)
    return out, None if base is None or peak is None else peak - base


def _backends(op: str, device: torch.device) -> list[str]:
    """ops' backends for ``op`` on ``device``, the reference first; the interpreter (Triton on CPU) left out."""
    names = [b for b in ops.available_backends(op, device) if not (b == "triton" and device.type == "cpu")]
    return sorted(names, key=lambda b: b != "reference")


def _check(row: Row, fn, device, want, tolerance: float) -> bool:
    """Run ``fn`` once (its peak memory measured), compare with ``want``; fill the row's check."""
    try:
        got, row.peak_mib = call_with_peak(fn, device)
    except Exception as exc:
        row.check, row.note = "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        return False
    row.max_rel_error = max(_rel_error([g], [e]) for g, e in zip(got, want, strict=True))
    if not row.max_rel_error <= tolerance:  # NaN fails too
        row.check = f"max error {row.max_rel_error:.2g} x max > {tolerance:g}"
        return False
    row.check = "ok"
    return True


# ---------------------------------------------------------------------------------------------
# Random walk


def _walk_inputs(h: int, w: int, classes: int, device: torch.device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    cams = torch.rand(classes, h, w, generator=gen)
    edge = torch.rand(h, w, generator=gen) ** 3  # mostly weak edges: affinities that carry the walk
    return cams.to(device), edge.to(device)


def bench_walk(args, device, timer: Timer, sizes, bar) -> list[Row]:
    rows: list[Row] = []
    settings = dict(beta=args.beta, exp_times=args.exp_times, radius=args.radius)
    dense_runs = [s for s in sizes if s[0] * s[1] <= args.dense_max_pixels]
    extrapolated = [s for s in sizes if s[0] * s[1] > args.dense_max_pixels]
    if extrapolated and not dense_runs:  # a size to extrapolate from
        side = math.isqrt(args.dense_max_pixels)
        dense_runs = [(side, side)]
        sizes = dense_runs + sizes
    calibration: tuple[Row, int] | None = None  # the largest dense run and its pixel count
    for h, w in sorted(sizes, key=lambda s: s[0] * s[1]):
        name = f"{h}x{w}"
        bar.update(description=f"random walk {name}")
        cams, edge = _walk_inputs(h, w, args.classes, device, seed=h * 1000 + w)
        size_rows = []
        if (h, w) in dense_runs:
            dense = Row("walk", name, "dense", check="oracle", against="the original's definition")
            run_dense = functools.partial(random_walk_dense, cams, edge, **settings)
            want, dense.peak_mib = call_with_peak(run_dense, device)
            dense.ms = timer.median_ms(run_dense, args.dense_repeats, warmup=1 if device.type == "cuda" else 0)
            calibration = (dense, h * w)
            against = "dense"
        else:
            measured, n0 = calibration
            ratio = h * w / n0
            dense = Row("walk", name, "dense", check="extrapolated", extrapolated=True)
            dense.ms = measured.ms * ratio**3
            dense.peak_mib = None if measured.peak_mib is None else measured.peak_mib * ratio**2
            dense.note = f"from {measured.size}: time x (n/n0)^3 = x{ratio**3:.0f}, memory x (n/n0)^2 = x{ratio**2:.0f}"
            want = random_walk_reference(cams.double(), edge.double(), **settings)
            against = "reference fp64"
        for backend in _backends("random_walk", device):
            row = Row("walk", name, backend, against=against)
            size_rows.append(row)
            walk = functools.partial(ops.random_walk, cams, edge, **settings, backend=backend)
            if _check(row, lambda walk=walk: [walk()], device, [want], WALK_TOLERANCE):
                row.ms = timer.median_ms(walk, args.repeats, args.warmup)
                row.speedup = dense.ms / row.ms
        rows += [dense, *size_rows]
    bar.advance()
    return rows


# ---------------------------------------------------------------------------------------------
# Affinity loss


def _loss_inputs(batch: int, side: int, device: torch.device, seed: int):
    """Edge maps of distinct values (no ties in path maxima) and blocky label maps with a 255 band."""
    gen = torch.Generator().manual_seed(seed)
    edge = torch.sigmoid(torch.randn(batch, 1, side, side, generator=gen))
    block = max(1, side // 8)
    coarse = torch.randint(0, 3, (batch, 1, 8, 8), generator=gen).float()
    ignore = torch.rand(batch, 1, 8, 8, generator=gen) < 0.15
    seg = F.interpolate(torch.where(ignore, 255.0, coarse), scale_factor=block, mode="nearest")
    seg = F.pad(seg, (0, side - seg.shape[-1], 0, side - seg.shape[-2]), value=255)[:, 0].long()
    return edge.to(device), seg.to(device)


def _loss_fwd_bwd(edge, seg, radius, backend):
    leaf = edge.detach().requires_grad_(True)
    losses = affinity_loss(leaf, seg, radius, backend=backend)
    (grad,) = torch.autograd.grad(losses.total, leaf)
    return [t.detach() for t in losses] + [grad]


def bench_loss(args, device, timer: Timer, bar) -> list[Row]:
    bar.update(description=f"affinity loss {args.loss_batch} x {args.loss_size}^2")
    edge, seg = _loss_inputs(args.loss_batch, args.loss_size, device, seed=7)
    name = f"{args.loss_batch}x{args.loss_size}x{args.loss_size}"
    want = _loss_fwd_bwd(edge, seg, args.loss_radius, "reference")
    rows = []
    for backend in _backends("affinity_sums", device):
        row = Row("loss", name, backend, against="reference")
        rows.append(row)
        step = functools.partial(_loss_fwd_bwd, edge, seg, args.loss_radius, backend)
        if _check(row, step, device, want, LOSS_TOLERANCE):
            row.ms = timer.median_ms(step, args.repeats, args.warmup)
    reference = next((r for r in rows if r.backend == "reference" and r.ms), None)
    for r in rows:
        if reference and r.ms:
            r.speedup = reference.ms / r.ms
    bar.advance()
    return rows


# ---------------------------------------------------------------------------------------------


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(rows: list[Row], title: str) -> None:
    table = Table(title=title)
    columns = ("part", "size", "backend", "check", "against", "max rel err", "ms", "peak MiB", "speedup", "note")
    for col in columns:
        table.add_column(col, justify="right" if col in ("max rel err", "ms", "peak MiB", "speedup") else "left")
    for r in rows:
        mark = "~" if r.extrapolated else ""
        check = r.check if r.check in ("ok", "oracle", "extrapolated") else f"[red]{r.check}[/red]"
        table.add_row(
            r.part,
            r.size,
            r.backend,
            check,
            r.against,
            _fmt(r.max_rel_error, ".1e"),
            mark + _fmt(r.ms, ".1f"),
            mark + _fmt(r.peak_mib, ".1f"),
            _fmt(r.speedup, ".1f" if (r.speedup or 0) < 100 else ".0f"),
            r.note,
        )
    Console(width=max(160, Console().width)).print(table)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m puzzlecam.bench rw",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--json", type=Path, default=None, help="also write the figures (with device, versions, date) to this JSON file"
    )
    p.add_argument(
        "--device", choices=("auto", "cuda", "cpu"), default="auto", help="where to run (default: cuda when available)"
    )
    p.add_argument("--parts", default="walk,loss", help="comma-separated parts to run: walk, loss (default: both)")
    p.add_argument(
        "--sizes",
        default="48x48,94x125",
        help="random walk: stride-4 map sizes HxW, comma-separated (default 48x48,94x125)",
    )
    p.add_argument("--classes", type=int, default=3, help="random walk: CAM channels K (default 3)")
    p.add_argument("--beta", type=float, default=10.0, help="random walk: affinity power beta (default 10)")
    p.add_argument("--exp-times", type=int, default=8, help="random walk: 2**exp_times steps (default 8: 256 steps)")
    p.add_argument("--radius", type=int, default=5, help="random walk: neighbourhood radius (default 5)")
    p.add_argument(
        "--dense-max-pixels",
        type=int,
        default=None,
        help="random walk: run the dense hw x hw method only up to h*w pixels, extrapolate above "
        "(default 2304 = 48x48 on CPU, where it takes tens of seconds; 11750 = 94x125 on GPU)",
    )
    p.add_argument(
        "--dense-repeats", type=int, default=1, help="random walk: timed calls of the dense method (default 1)"
    )
    p.add_argument(
        "--loss-batch", type=int, default=None, help="affinity loss: images per batch (default 8 on CPU, 32 on GPU)"
    )
    p.add_argument(
        "--loss-size",
        type=int,
        default=128,
        help="affinity loss: edge map side (default 128: a 512 px crop at stride 4)",
    )
    p.add_argument("--loss-radius", type=int, default=10, help="affinity loss: path radius (default 10, as training)")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per measurement of the sparse walks and the losses; the median is reported "
        "(default 20 on GPU, 3 on CPU; short CPU calls get more, up to ~0.25 s)",
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed calls before each measurement (default 3 on GPU, 1 on CPU)"
    )
    return p


def run(args: argparse.Namespace) -> None:
    device = init_distributed(None if args.device == "auto" else args.device, single_process_group=False).device
    gpu = device.type == "cuda"
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or set(parts) - {"walk", "loss"}:
        raise UsageError(f"--parts: expected a comma-separated subset of walk,loss, got {args.parts!r}")
    sizes = [_size(s.strip(), "--sizes") for s in args.sizes.split(",") if s.strip()]
    for flag, value, low in (
        ("--classes", args.classes, 1),
        ("--radius", args.radius, 2),
        ("--loss-radius", args.loss_radius, 2),
        ("--loss-size", args.loss_size, 2 * args.loss_radius - 1),
        ("--dense-repeats", args.dense_repeats, 1),
    ):
        if value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    if not 0 <= args.exp_times <= 16:
        raise UsageError(f"--exp-times must be in 0..16, got {args.exp_times}")
    args.dense_max_pixels = args.dense_max_pixels or (94 * 125 if gpu else 48 * 48)
    args.loss_batch = args.loss_batch or (32 if gpu else 8)
    args.repeats = args.repeats or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    device_name = (
        torch.cuda.get_device_name(device)
        if gpu
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    if not gpu and not map_large_allocations():
        log.warning("could not set glibc's mmap threshold: CPU peak memory may miss reused heap memory")
    timer = Timer(device)
    rows: list[Row] = []
    with warnings.catch_warnings(), ProgressBar("benchmarking", len(parts), transient=True) as bar:
        warnings.simplefilter("ignore", RuntimeWarning)  # ops' reference-fallback warning
        if "walk" in parts:
            rows += bench_walk(args, device, timer, sizes, bar)
        if "loss" in parts:
            rows += bench_loss(args, device, timer, bar)
    print_table(
        rows,
        f"random walk ({args.classes} classes, beta {args.beta:g}, {2**args.exp_times} steps, radius {args.radius}) "
        f"and affinity loss (radius {args.loss_radius}, forward + backward) on {device_name}",
    )
    print(
        "walk: ms and peak MiB per image, speedup over the dense hw x hw method (~: extrapolated from the largest "
        "size it ran at, time ~ n^3, memory ~ n^2); loss: the batch's forward + backward, speedup over the "
        "reference; peak MiB above the memory in use before the call (CPU: peak RSS)."
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
                    k: getattr(args, k)
                    for k in (
                        "classes",
                        "beta",
                        "exp_times",
                        "radius",
                        "dense_max_pixels",
                        "loss_batch",
                        "loss_size",
                        "loss_radius",
                        "repeats",
                        "warmup",
                    )
                },
                "results": [asdict(r) for r in rows],
            },
        )
        log.info("wrote %s", args.json)
    failed = [r for r in rows if r.check not in ("ok", "oracle", "extrapolated")]
    if failed:
        raise RunError(f"{len(failed)} backend(s) failed their check (see the table)")


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
