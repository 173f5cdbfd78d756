"""``python -m puzzlecam.bench kernels``: every puzzlecam.ops backend against the torch reference.

For each op (fused reconstruction loss at both levels, tile, merge, prepare_inputs,
multiscale_cam) at the paper's shape (B=32, C=20, 32x32 maps, n=2, 512x512 images) and a large one
(C=80, 64x64 maps, 1024x1024 images), every backend -- reference eager, torch.compile(reference),
Triton, the C++/CUDA extension -- is first checked against the reference (outputs and gradients),
then timed: forward and forward+backward, each as a device time and a host time (medians), achieved
GB/s against the measured device-to-device copy bandwidth, and peak memory.

How the times are measured on a GPU:

* Inputs rotate: the calls cycle through copies of the inputs, together 4x the L2 (at most 64
  copies: still more than an H100's 50 MB for the smallest inputs here, multiscale_cam's 1.2 MB at
  the paper shape), so each call reads its inputs from memory, not from the L2 an earlier call
  warmed.
* Host time -- what an eager trainer pays per call, launch overhead included: ``perf_counter``
  around a batch of calls issued back to back with one ``torch.cuda.synchronize`` at its end,
  divided by the batch (a multiple of the number of copies, about 5 ms long, at most 64 calls);
  median over ``--repeats`` batches.
* Device time -- GPU time per call without host gaps: the same batch of calls is captured in one
  CUDA graph (after a warm-up on the capture stream) and its replay is timed with CUDA events,
  divided by the batch; median over ``--repeats`` replays. A ``torch.cuda._sleep`` spin queued
  before the start event keeps the GPU busy while the host launches the graph, so the launch is not
  timed. Before timing, the replayed outputs (and gradients) of the last call are checked against
  the reference. ``triton.testing.do_bench`` is not used: it times single calls with events, which
  for microsecond kernels measures the launches, not the kernels.
* Fallback ("events" in the timing column, with the reason printed under the table): a call that
  synchronizes with the host (found by running it once under
  ``torch.cuda.set_sync_debug_mode("error")``, before any capture), that fails to capture, or
  whose replay does not reproduce the reference is timed alone: L2 flushed (256 MiB write), a spin
  longer than its host time queued, CUDA events around the call. Host gaps inside the call (after
  a sync) are then included. ``--no-graphs`` uses this for every op.

GB/s and "% copy" use the device time. Without a GPU it says so and times the CPU backends with
fewer repeats: host time only (``perf_counter`` around single calls), device time shown as "-",
GB/s from the host time; Triton under its interpreter is never timed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import logging
import math
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
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
    # Host: wall-clock per call from Python (eager, as a trainer pays it). Device: GPU time per call
    # (None without a GPU). See the module docstring for how each is measured.
    fwd_host_ms: float | None = None
    fwd_bwd_host_ms: float | None = None
    fwd_device_ms: float | None = None
    fwd_bwd_device_ms: float | None = None
    device_timing: dict | None = None  # {"fwd": "graph" | "events", "fwd_bwd": ...}; None without a GPU
    gbps: float | None = None  # from the device time on a GPU, the host time on the CPU
    pct_copy: float | None = None
    peak_mib: float | None = None
    speedup_host: float | None = None  # eager's time / this backend's (fwd+bwd where there is a backward)
    speedup_device: float | None = None
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
    spec = puzzle.PuzzleSpec(n=n, level=level, kind="l1", reduction="masking")
    fns = {}
    for name in backends:
        if name == "compile":
            fns[name] = torch.compile(functools.partial(puzzle.reconstruction_loss, spec=spec))
        else:
            fns[name] = functools.partial(ops.reconstruction_loss, spec=spec, backend=_ops_name(name))
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
            fns[name] = torch.compile(functools.partial(puzzle.prepare_inputs, n=n, dtype=dtype, channels_last=False))
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


class GraphUnusable(RuntimeError):
    """The calls could not be captured in a CUDA graph, or its replay did not reproduce the reference."""


@dataclass
class Timing:
    host_ms: float
    device_ms: float | None = None
    method: str | None = None  # how device_ms was measured: "graph", "events"; None without a GPU
    calls: int = 1  # calls per measurement
    error: str = ""  # why the CUDA graph was not used


class Timer:
    """Host and device time of a call; see the module docstring for the methods."""

    MAX_SETS = 64  # copies of the inputs cycled through on the GPU, so each call reads them from memory
    MAX_CALLS = 64  # calls per measurement (a batch on the host, a CUDA graph on the device)
    BATCH_MS = 5.0  # aim of a measurement's length on the GPU

    def __init__(self, device: torch.device, graphs: bool = True):
        self.device = device
        self.cuda = device.type == "cuda"
        self.graphs = graphs
        # Flushing a buffer larger than the L2 before each call keeps cached inputs from inflating GB/s.
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if self.cuda else None
        self._cycles_per_ms: float | None = None

    def median_ms(self, fn, repeats: int, warmup: int) -> float:
        """One call per measurement: CUDA events around it after an L2 flush (host launch overhead
        included), or perf_counter on the CPU."""
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

    # -- GPU: host time, device time ----------------------------------------------------------

    def input_sets(self, nbytes: int) -> int:
        """How many copies of inputs of ``nbytes`` to cycle through so that together they are 4x the L2
        (at most MAX_SETS): a call's inputs are then evicted before they are read again."""
        if not self.cuda:
            return 1
        l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 0) or 64 * 2**20
        return max(1, min(self.MAX_SETS, math.ceil(4 * l2 / max(nbytes, 1))))

    def measure(self, calls: list, repeats: int, warmup: int, check=None) -> Timing:
        """Time ``calls`` (one per input set; each runs the op once). CPU: host time of calls[0] only.
        GPU: host time of batches, then device time from a CUDA graph (events if it cannot be used).
        ``check(outputs)`` -> "ok" or why not: the graph's replayed outputs of calls[0] against the
        reference."""
        if not self.cuda:
            return Timing(self.median_ms(calls[0], repeats, warmup))
        host_ms, batch = self.host_ms(calls, repeats, warmup)
        timing = Timing(host_ms, calls=batch)
        if self.graphs:
            try:
                timing.device_ms, timing.method = self.graph_ms(calls, batch, repeats, check), "graph"
                return timing
            except Exception as exc:  # a host sync or an uncapturable call inside, or a replay mismatch
                # A capture error is not sticky; anything else raises here. (No empty_cache: after a failed
                # capture some torch versions assert in it.)
                torch.cuda.synchronize(self.device)
                first = (str(exc).strip().splitlines() or [""])[0]
                timing.error = f"{type(exc).__name__}: {first[:160]}"
        timing.device_ms, timing.method = self.events_ms(calls[0], repeats, host_ms), "events"
        return timing

    def host_ms(self, calls: list, repeats: int, warmup: int) -> tuple[float, int]:
        """Wall-clock ms per call as an eager trainer pays it: a batch of calls (cycling through the input
        sets) issued back to back, one synchronize at its end; the median over ``repeats`` batches. The
        batch (a multiple of len(calls), at most MAX_CALLS or len(calls)) lasts about BATCH_MS."""
        for i in range(max(warmup, len(calls))):
            calls[i % len(calls)]()
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        for fn in calls:
            fn()
        torch.cuda.synchronize(self.device)
        per_call = max((time.perf_counter() - t0) * 1e3 / len(calls), 1e-6)
        rounds = max(1, min(self.MAX_CALLS // len(calls), math.ceil(self.BATCH_MS / (per_call * len(calls)))))
        batch = rounds * len(calls)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(batch):
                calls[i % len(calls)]()
            torch.cuda.synchronize(self.device)
            times.append((time.perf_counter() - t0) * 1e3 / batch)
        return statistics.median(times), batch

    def graph_ms(self, calls: list, batch: int, repeats: int, check=None) -> float:
        """Device ms per call: ``batch`` calls (cycling through the input sets, calls[0] last) captured in
        one CUDA graph; each replay is timed with CUDA events behind a GPU spin that covers the graph's
        launch, and divided by ``batch``; the median over ``repeats`` replays. Raises if a call cannot be
        captured or the replayed outputs of calls[0] fail ``check``."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm up on the capture stream (lazy handles, workspaces)
            for fn in calls:
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        # A call that synchronizes with the host cannot be captured: find out without a failed capture, which
        # some torch versions do not clean up after.
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            calls[0]()
        except RuntimeError as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise GraphUnusable(f"synchronizes with the host ({first[:120]})") from None
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        out = None
        with torch.cuda.stream(stream):  # restores the stream even when the capture fails
            graph.capture_begin()
            try:
                for i in range(batch):
                    out = calls[(i + 1) % len(calls)]()
            except BaseException:
                with contextlib.suppress(Exception):  # ends the capture; the first error is the one to report
                    graph.capture_end()
                raise
            graph.capture_end()
        graph.replay()
        torch.cuda.synchronize(self.device)
        if check is not None:
            verdict = check(out)
            if verdict != "ok":
                raise GraphUnusable(f"the replayed graph's outputs differ from the reference: {verdict}")
        del out
        spin = self._spin_cycles(2.0)  # longer than launching a graph of a few thousand nodes
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(repeats):
            self._spin(spin)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / batch)
        del graph
        return statistics.median(times)

    def events_ms(self, fn, repeats: int, host_ms: float) -> float:
        """Device ms of one call, for calls a CUDA graph cannot hold: the L2 flushed, a GPU spin longer than
        the call's host time queued, then CUDA events around the call, so that the launches are queued
        while the GPU spins. Host gaps remain where the call waits for the GPU (a host sync inside)."""
        spin = self._spin_cycles(min(50.0, max(0.2, 2 * host_ms)))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(repeats):
            self.flush.zero_()
            self._spin(spin)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def _spin_cycles(self, ms: float) -> int:
        if not hasattr(torch.cuda, "_sleep"):
            return 0
        if self._cycles_per_ms is None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(1000)
            start.record()
            torch.cuda._sleep(10**6)
            end.record()
            end.synchronize()
            self._cycles_per_ms = 10**6 / max(start.elapsed_time(end), 1e-3)
        return int(ms * self._cycles_per_ms)

    def _spin(self, cycles: int) -> None:
        if cycles > 0:
            torch.cuda._sleep(cycles)


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


def _clone_inputs(inputs: tuple) -> tuple:
    return tuple([t.clone() for t in x] if isinstance(x, (list, tuple)) else x.clone() for x in inputs)


def _input_bytes(inputs: tuple) -> int:
    flat = [t for x in inputs for t in (x if isinstance(x, (list, tuple)) else (x,))]
    return sum(t.numel() * t.element_size() for t in flat)


def _call(fn, inputs):
    return fn(*inputs)


def _record_timing(res: Result, key: str, timing: Timing) -> None:
    setattr(res, f"{key}_host_ms", timing.host_ms)
    setattr(res, f"{key}_device_ms", timing.device_ms)
    if timing.method is not None:
        res.device_timing = {**(res.device_timing or {}), key: timing.method}
    res.extra[f"{key}_calls_per_measurement"] = timing.calls
    if timing.error:
        res.extra[f"{key}_graph_error"] = timing.error


def bench_case(case: Case, dtype, device, timer: Timer, repeats: int, warmup: int, copy_gbps: float) -> list[Result]:
    results = []
    differentiable = bool(case.grad_inputs)
    want = _run(case.backends["eager"], case, differentiable)
    n_out = len(want) - len(case.grad_inputs)
    upstream = _upstream(want[:n_out]) if differentiable else None
    # On the GPU the calls cycle through copies of the inputs (case itself last: the graph's check).
    sets = [case] + [
        replace(case, inputs=_clone_inputs(case.inputs)) for _ in range(timer.input_sets(_input_bytes(case.inputs)) - 1)
    ]

    def check_fwd(out):
        return _compare(_as_tuple(out), want[:n_out], dtype)

    def check_fwd_bwd(out):
        return _compare(out, want, dtype)

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
        res.extra["input_sets"] = len(sets)
        # The forward as training runs it: differentiable inputs require grad (one compiled graph).
        fwd_calls = [functools.partial(_call, fn, _leaf_inputs(s)) for s in sets]
        _record_timing(res, "fwd", timer.measure(fwd_calls, repeats, warmup, check_fwd))
        key, main_bytes = "fwd", case.fwd_bytes
        if differentiable:
            fwd_bwd_calls = [functools.partial(_run, fn, s, True, upstream) for s in sets]
            _record_timing(res, "fwd_bwd", timer.measure(fwd_bwd_calls, repeats, warmup, check_fwd_bwd))
            key, main_bytes = "fwd_bwd", case.fwd_bwd_bytes
            res.peak_mib = peak_mib(lambda fn=fn: _run(fn, case, True, upstream), device)
        else:
            res.peak_mib = peak_mib(lambda fn=fn: fn(*case.inputs), device)
        main_ms = getattr(res, f"{key}_device_ms") or getattr(res, f"{key}_host_ms")
        if main_ms > 0:
            res.gbps = main_bytes / (main_ms * 1e-3) / 1e9
            res.pct_copy = 100 * res.gbps / copy_gbps
    del sets
    eager = next((r for r in results if r.backend == "eager" and r.check == "ok"), None)
    key = "fwd_bwd" if differentiable else "fwd"
    for r in results:
        if eager is None or r.check != "ok":
            continue
        r.speedup_host = getattr(eager, f"{key}_host_ms") / getattr(r, f"{key}_host_ms")
        eager_dev, dev = getattr(eager, f"{key}_device_ms"), getattr(r, f"{key}_device_ms")
        if eager_dev is not None and dev is not None:
            r.speedup_device = eager_dev / dev
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


def _timing_cell(r: Result) -> str:
    if not r.device_timing:
        return "-"
    methods = [r.device_timing[k] for k in ("fwd", "fwd_bwd") if k in r.device_timing]
    cell = methods[0] if len(set(methods)) == 1 else " / ".join(methods)
    return cell + ("*" if any(k.endswith("_graph_error") for k in r.extra) else "")


def print_table(results: list[Result], title: str) -> None:
    table = Table(title=title)
    columns = (
        ("op", "shape", "backend", "check")
        + ("fwd dev ms", "fwd host ms", "f+b dev ms", "f+b host ms", "dev timing")
        + ("x eager dev", "x eager host", "GB/s", "% copy", "peak MiB")
    )
    for col in columns:
        table.add_column(col, justify="left" if col in ("op", "shape", "backend", "check", "dev timing") else "right")
    for r in results:
        check = r.check if r.check == "ok" else f"[red]{r.check}[/red] {r.note}"
        table.add_row(
            r.op,
            r.shape,
            r.backend,
            check,
            _fmt(r.fwd_device_ms, ".4f"),
            _fmt(r.fwd_host_ms, ".4f"),
            _fmt(r.fwd_bwd_device_ms, ".4f"),
            _fmt(r.fwd_bwd_host_ms, ".4f"),
            _timing_cell(r),
            _fmt(r.speedup_device, ".2f"),
            _fmt(r.speedup_host, ".2f"),
            _fmt(r.gbps, ".1f"),
            _fmt(r.pct_copy, ".0f"),
            _fmt(r.peak_mib, ".1f"),
        )
    Console(width=max(190, Console().width)).print(table)
    for r in results:
        for key in ("fwd", "fwd_bwd"):
            error = r.extra.get(f"{key}_graph_error")
            if error:
                print(f"* {r.op} @ {r.shape}, {r.backend}, {key}: no CUDA graph, device time from events ({error})")


def timing_methods(on_gpu: bool, graphs: bool = True) -> dict:
    """How the times of this run were measured, in words (printed under the table and in the JSON)."""
    if not on_gpu:
        return {
            "device": "none without a GPU (shown as -)",
            "host": "perf_counter around single calls, median (more repeats for short calls)",
            "gbps_from": "host",
        }
    device = (
        "CUDA graph of a batch of calls over rotating input copies, replayed behind a GPU spin and timed "
        "with CUDA events, divided by the batch; 'events' (and *): a single call with the L2 flushed, "
        "queued behind a GPU spin, timed with CUDA events"
        if graphs
        else "single calls with the L2 flushed, queued behind a GPU spin, timed with CUDA events (--no-graphs)"
    )
    host = "perf_counter around a batch of calls over rotating input copies, one synchronize at its end, per call"
    return {"device": device, "host": host, "gbps_from": "device"}


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
        help="measurements per time, the median is reported: on GPU host batches of calls and CUDA-graph "
        "replays (or single calls timed with events); on CPU single calls, more of them when short "
        "(default 50 on GPU, 5 on CPU)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed calls before each time is measured, on GPU at least one per input copy "
        "(default 10 on GPU, 1 on CPU)",
    )
    p.add_argument(
        "--no-compile", action="store_true", help="leave out torch.compile(reference) (its compilation is slow on CPU)"
    )
    p.add_argument(
        "--no-graphs",
        action="store_true",
        help="GPU: take the device time from CUDA events around single calls (L2 flushed, launches queued "
        "behind a GPU spin) instead of replaying CUDA graphs",
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

    timer = Timer(device, graphs=not args.no_graphs)
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
    timing = timing_methods(on_gpu, timer.graphs)
    print(f"dev: {timing['device']}.\nhost: {timing['host']}.")
    print(
        "x eager: speedup over the eager reference (fwd+bwd where there is a backward), from each time; GB/s: "
        f"ideal bytes of the fused design / {timing['gbps_from']} time; % copy: of the measured copy bandwidth; "
        "peak MiB: above the inputs (GPU only)."
    )
    if args.json:
        payload = {
            "device": device_name,
            "device_type": device.type,
            "versions": versions(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "dtype": args.dtype,
            "repeats": repeats,
            "timing": timing,
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
