"""``python -m puzzlecam.bench kernels``: every puzzlecam.ops backend against the torch reference.

For each op (fused reconstruction loss at both levels, tile, merge, prepare_inputs,
multiscale_cam) at the paper's shape (B=32, C=20, 32x32 maps, n=2, 512x512 images) and a large one
(C=80, 64x64 maps, 1024x1024 images), every backend -- reference eager, torch.compile(reference),
Triton, the C++/CUDA extension -- is first checked against the reference (outputs and gradients),
then timed: median forward and forward+backward times, achieved GB/s against the measured
device-to-device copy bandwidth, and peak memory. On a GPU, times come from CUDA events around
each call with the L2 cache flushed before it (host launch overhead included, as a trainer sees
it). Without a GPU it says so and times the CPU backends with fewer repeats; Triton under its
interpreter is never timed.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import logging
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from puzzlecam import ops, puzzle
from puzzlecam.errors import RunError, UsageError
from puzzlecam.utils.cli import run_command
from puzzlecam.utils.distributed import init_distributed
from puzzlecam.utils.files import atomic_write_json
from puzzlecam.utils.progress import ProgressBar

log = logging.getLogger(__name__)

TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = {
    # name: (B, C, map side, n, image side)
    "paper": (32, 20, 32, 2, 512),
    "large": (32, 80, 64, 2, 1024),
}
OPS = ("re_loss_feature", "re_loss_cam", "tile", "merge", "prepare_inputs", "multiscale_cam")


@dataclass
class Result:
    op: str
    shape: str
    backend: str
    check: str = "skipped"
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    gbps: float | None = None
    pct_copy: float | None = None
    peak_mib: float | None = None
    speedup: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Cases: inputs, the functions of each backend, bytes moved


@dataclass
class Case:
    op: str
    shape: str
    inputs: tuple
    grad_inputs: tuple  # indices of the inputs that take gradients (empty: forward only)
    fwd_bytes: int
    fwd_bwd_bytes: int
    backends: dict  # name -> callable(*inputs) -> tensor or tuple of tensors


def _loss_case(op, shape, device, dtype, level, backends):
    b, c, side, n, _ = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    cam = torch.randn(b, c, side, side, generator=gen).to(device, dtype)
    tiles = torch.randn(n * n * b, c, side // n, side // n, generator=gen).to(device, dtype)
    labels = (torch.rand(b, c, generator=gen) < 0.15).float().to(device)
    elem = cam.numel() * cam.element_size()
    fns = {}
    for name in backends:
        if name == "compile":
            fns[name] = torch.compile(
                functools.partial(puzzle.reconstruction_loss, n=n, level=level, kind="l1", reduction="masking")
            )
        else:
            fns[name] = functools.partial(
                ops.reconstruction_loss, n=n, level=level, kind="l1", reduction="masking", backend=_ops_name(name)
            )
    # Ideal traffic of the fused design: forward reads cam and tiles; backward reads both again
    # and writes both gradients.
    return Case(op, shape, (cam, tiles, labels), (0, 1), 2 * elem, 6 * elem, fns)


def _tile_case(op, shape, device, dtype, backends):
    b, c, side, n, _ = SHAPES[shape]
    gen = torch.Generator().manual_seed(1)
    if op == "tile":
        x = torch.randn(b, c, side, side, generator=gen).to(device, dtype)
        ref = puzzle.tile
    else:
        x = torch.randn(n * n * b, c, side // n, side // n, generator=gen).to(device, dtype)
        ref = puzzle.merge
    fns = {}
    for name in backends:
        if name == "compile":
            fns[name] = torch.compile(functools.partial(ref, n=n))
        else:
            fns[name] = functools.partial(getattr(ops, op), n=n, backend=_ops_name(name))
    elem = x.numel() * x.element_size()
    return Case(op, shape, (x,), (0,), 2 * elem, 4 * elem, fns)


def _prepare_case(shape, device, dtype, backends):
    b, _, _, n, side = SHAPES[shape]
    gen = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (b, side, side, 3), dtype=torch.uint8, generator=gen).to(device)
    valid = torch.randint(side // 2, side + 1, (b, 2), generator=gen).to(device)
    fns = {}
    for name in backends:
        if name == "compile":
            fns[name] = torch.compile(functools.partial(puzzle.prepare_inputs, n=n, dtype=dtype))
        else:
            fns[name] = functools.partial(ops.prepare_inputs, n=n, dtype=dtype, backend=_ops_name(name))
    size = torch.tensor([], dtype=dtype).element_size()
    moved = images.numel() + 2 * images.numel() * size
    return Case("prepare_inputs", shape, (images, valid), (), moved, 0, fns)


def _multiscale_case(shape, device, dtype, backends):
    _, c, _, _, side = SHAPES[shape]
    gen = torch.Generator().manual_seed(3)
    scales = (1.0, 0.5, 1.5, 2.0)
    sizes = [puzzle.strided_size((round(side * s), round(side * s)), 16) for s in scales]
    maps = [torch.randn(c, h, w, generator=gen).to(device, dtype) for h, w in sizes]
    flipped = [torch.randn(c, h, w, generator=gen).to(device, dtype) for h, w in sizes]
    keys = torch.tensor([0, 5, 11]).to(device)
    image_size = (side, side)
    fns = {}
    for name in backends:
        if name == "compile":
            fns[name] = torch.compile(functools.partial(puzzle.multiscale_cam, image_size=image_size))
        else:
            fns[name] = functools.partial(ops.multiscale_cam, image_size=image_size, backend=_ops_name(name))
    small = puzzle.strided_size(image_size, 4)
    moved = sum(2 * m.numel() * m.element_size() for m in maps) + 4 * len(keys) * (small[0] * small[1] + side * side)
    return Case("multiscale_cam", shape, (maps, flipped, keys), (), moved, 0, fns)


def _ops_name(backend: str) -> str:
    return "reference" if backend == "eager" else backend


def _make_case(op, shape, device, dtype, backends):
    if op.startswith("re_loss_"):
        return _loss_case(op, shape, device, dtype, op.removeprefix("re_loss_"), backends)
    if op in ("tile", "merge"):
        return _tile_case(op, shape, device, dtype, backends)
    if op == "prepare_inputs":
        return _prepare_case(shape, device, dtype, backends)
    return _multiscale_case(shape, device, dtype, backends)


def _ops_key(op: str) -> str:
    return "reconstruction_loss" if op.startswith("re_loss_") else op


# ---------------------------------------------------------------------------------------------
# Running, checking, timing


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _leaf_inputs(case: Case):
    """Fresh leaves for the differentiable inputs (the others are passed as they are)."""
    return tuple(x.detach().requires_grad_(True) if i in case.grad_inputs else x for i, x in enumerate(case.inputs))


def _upstream(outs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]


def _run(fn, case: Case, backward: bool, upstream=None):
    inputs = _leaf_inputs(case) if backward else case.inputs
    outs = _as_tuple(fn(*inputs))
    if not backward:
        return outs
    leaves = [inputs[i] for i in case.grad_inputs]
    grads = torch.autograd.grad(outs, leaves, grad_outputs=upstream or _upstream(outs))
    return outs + tuple(grads)


def _compare(got, want, dtype) -> str:
    tol = TOLERANCE[dtype]
    for k, (a, e) in enumerate(zip(got, want, strict=True)):
        a, e = a.detach().float(), e.detach().float()
        if a.shape != e.shape:
            return f"output {k}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        if not torch.isfinite(a).all():
            return f"output {k}: non-finite values"
        scale = e.abs().max().item() if e.numel() else 0.0
        err = (a - e).abs().max().item() if e.numel() else 0.0
        if err > tol * scale + 1e-9:
            return f"output {k}: max error {err:.3g} > {tol:g} x max |ref| {scale:.3g}"
    return "ok"


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        # Flushing a buffer larger than the L2 before each call keeps cached inputs from inflating GB/s.
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if self.cuda else None

    def median_ms(self, fn, repeats: int, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        if not self.cuda:  # short CPU calls get more repeats (up to 50, ~0.25 s): scheduler noise
            t0 = time.perf_counter()
            fn()
            repeats = max(repeats, min(50, int(0.25 / max(time.perf_counter() - t0, 1e-6))))
        times = []
        for _ in range(repeats):
            if self.cuda:
                self.flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device, timer: Timer, repeats: int) -> float:
    """Device-to-device copy bandwidth (read + write) of a large buffer."""
    nbytes = (512 if device.type == "cuda" else 64) * 2**20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timer.median_ms(lambda: dst.copy_(src), repeats, warmup=3)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def peak_mib(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    keep = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - base
    del keep
    return peak / 2**20


def bench_case(case: Case, dtype, device, timer: Timer, repeats: int, warmup: int, copy_gbps: float) -> list[Result]:
    results = []
    differentiable = bool(case.grad_inputs)
    want = _run(case.backends["eager"], case, differentiable)
    upstream = _upstream(want[: len(want) - len(case.grad_inputs)]) if differentiable else None
    for name, fn in case.backends.items():
        res = Result(case.op, case.shape, name)
        results.append(res)
        try:
            got = _run(fn, case, differentiable, upstream)
        except Exception as exc:  # e.g. torch.compile without a working compiler
            res.check, res.note = "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            continue
        res.check = _compare(got, want, dtype)
        if res.check != "ok":
            continue
        # The forward as training runs it: differentiable inputs require grad (one compiled graph).
        fwd_inputs = _leaf_inputs(case)
        res.fwd_ms = timer.median_ms(lambda fn=fn, xs=fwd_inputs: fn(*xs), repeats, warmup)
        main_ms, main_bytes = res.fwd_ms, case.fwd_bytes
        if differentiable:
            res.fwd_bwd_ms = timer.median_ms(lambda fn=fn: _run(fn, case, True, upstream), repeats, warmup)
            main_ms, main_bytes = res.fwd_bwd_ms, case.fwd_bwd_bytes
            res.peak_mib = peak_mib(lambda fn=fn: _run(fn, case, True, upstream), device)
        else:
            res.peak_mib = peak_mib(lambda fn=fn: fn(*case.inputs), device)
        res.gbps = main_bytes / (main_ms * 1e-3) / 1e9
        res.pct_copy = 100 * res.gbps / copy_gbps
    eager = next((r for r in results if r.backend == "eager" and r.check == "ok"), None)
    for r in results:
        if eager and r.check == "ok":
            key = "fwd_bwd_ms" if differentiable else "fwd_ms"
            r.speedup = getattr(eager, key) / getattr(r, key)
    return results


def _backends_for(op: str, device: torch.device, use_compile: bool) -> list[str]:
    names = ["eager"]
    if use_compile:
        names.append("compile")
    for b in ops.available_backends(_ops_key(op), device):
        if b == "reference":
            continue
        if b == "triton" and device.type == "cpu":
            continue  # the interpreter is for tests, not for timing
        names.append(b)
    return names


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(results: list[Result], title: str) -> None:
    table = Table(title=title)
    for col in ("op", "shape", "backend", "check", "fwd ms", "fwd+bwd ms", "x eager", "GB/s", "% copy", "peak MiB"):
        table.add_column(col, justify="left" if col in ("op", "shape", "backend", "check") else "right")
    for r in results:
        check = r.check if r.check == "ok" else f"[red]{r.check}[/red] {r.note}"
        table.add_row(
            r.op,
            r.shape,
            r.backend,
            check,
            _fmt(r.fwd_ms, ".4f"),
            _fmt(r.fwd_bwd_ms, ".4f"),
            _fmt(r.speedup, ".2f"),
            _fmt(r.gbps, ".1f"),
            _fmt(r.pct_copy, ".0f"),
            _fmt(r.peak_mib, ".1f"),
        )
    Console(width=max(150, Console().width)).print(table)


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    out["cuda"] = torch.version.cuda
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m puzzlecam.bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--json", type=Path, default=None, help="also write the figures (with device, versions, date) to this JSON file"
    )
    p.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="where to run (default: cuda when available, else cpu)",
    )
    p.add_argument(
        "--dtype", choices=tuple(DTYPES), default="fp32", help="dtype of the maps and prepared images (default fp32)"
    )
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated ops to run (default: all of {','.join(OPS)})")
    p.add_argument(
        "--shapes", default=None, help="comma-separated shapes: paper,large (default: both on GPU, paper on CPU)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per measurement; the median is reported (default 50 on GPU, 5 on CPU)",
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed calls before each measurement (default 10 on GPU, 1 on CPU)"
    )
    p.add_argument(
        "--no-compile", action="store_true", help="leave out torch.compile(reference) (its compilation is slow on CPU)"
    )
    return p


def run(args: argparse.Namespace) -> None:
    # One process, no group (unless a launcher started it); --device cuda without a GPU is a usage error.
    device = init_distributed(None if args.device == "auto" else args.device, single_process_group=False).device
    dtype = DTYPES[args.dtype]
    on_gpu = device.type == "cuda"
    op_names = [o.strip() for o in args.ops.split(",") if o.strip()]
    for o in op_names:
        if o not in OPS:
            raise UsageError(f"--ops: unknown op {o!r} (choose from {', '.join(OPS)})")
    shapes = [s.strip() for s in (args.shapes or ("paper,large" if on_gpu else "paper")).split(",") if s.strip()]
    for s in shapes:
        if s not in SHAPES:
            raise UsageError(f"--shapes: unknown shape {s!r} (choose from {', '.join(SHAPES)})")
    repeats = args.repeats or (50 if on_gpu else 5)
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    device_name = (
        torch.cuda.get_device_name(device)
        if on_gpu
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    if not on_gpu:
        why = "--device cpu" if torch.cuda.is_available() else "no CUDA GPU"
        log.info(
            "%s: benchmarking the CPU backends only (reference, torch.compile if it works, cpp); "
            "Triton runs on CPU only through its interpreter, which is not timed.",
            why,
        )

    timer = Timer(device)
    copy_gbps = copy_bandwidth_gbps(device, timer, repeats)
    results: list[Result] = []
    cases = [(o, s) for s in shapes for o in op_names]
    with warnings.catch_warnings(), ProgressBar("benchmarking", len(cases), transient=True) as bar:
        warnings.simplefilter("ignore", RuntimeWarning)  # ops' reference-fallback warning
        for op, shape in cases:
            bar.update(description=f"{op} @ {shape}")
            # Each case compiles its own reference afresh: compiled partials share one code object,
            # which would otherwise run into dynamo's recompile limit.
            torch._dynamo.reset()
            case = _make_case(op, shape, device, dtype, _backends_for(op, device, not args.no_compile))
            results += bench_case(case, dtype, device, timer, repeats, warmup, copy_gbps)
            bar.advance()

    title = (
        f"puzzlecam kernels on {device_name}, {args.dtype}; copy bandwidth {copy_gbps:.0f} GB/s; median of {repeats}"
    )
    print_table(results, title)
    print(
        "x eager: speedup over the eager reference (fwd+bwd where there is a backward); GB/s: ideal bytes of "
        "the fused design / time; % copy: of the measured copy bandwidth; peak MiB: above the inputs (GPU only)."
    )
    if args.json:
        payload = {
            "device": device_name,
            "device_type": device.type,
            "versions": versions(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "dtype": args.dtype,
            "repeats": repeats,
            "copy_bandwidth_gbps": copy_gbps,
            "shapes": {s: dict(zip(("B", "C", "map", "n", "image"), SHAPES[s], strict=True)) for s in shapes},
            "results": [asdict(r) for r in results],
        }
        atomic_write_json(args.json, payload)
        log.info("wrote %s", args.json)
    failed = [r for r in results if r.check not in ("ok",) and not (r.backend == "compile" and r.check == "error")]
    if failed:
        raise RunError(f"{len(failed)} backend(s) failed their check against the reference (see the table)")


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
