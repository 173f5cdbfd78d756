"""`python -m puzzlecam.bench kernels` runs on CPU, checks every backend and writes its JSON; the
`python -m puzzlecam.bench` dispatcher hands a subcommand its own flags."""

from __future__ import annotations

import json
import time
import types

import pytest
import torch

from puzzlecam.bench import kernels as bench
from puzzlecam.bench.__main__ import main as bench_main


def test_bench_kernels_cpu_smoke(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    rc = bench.main(
        [
            "--device",
            "cpu",
            "--ops",
            "re_loss_cam,merge,multiscale_cam",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--no-compile",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    payload = json.loads(out.read_text())
    assert payload["device_type"] == "cpu" and payload["versions"]["torch"] and payload["date"]
    assert payload["copy_bandwidth_gbps"] > 0
    rows = {(r["op"], r["backend"]): r for r in payload["results"]}
    assert {op for op, _ in rows} == {"re_loss_cam", "merge", "multiscale_cam"}
    for (op, backend), r in rows.items():
        assert r["check"] == "ok", (op, backend, r["note"])
        assert r["fwd_host_ms"] > 0 and r["gbps"] > 0
        assert (r["fwd_bwd_host_ms"] is not None) == (op != "multiscale_cam")
        # No GPU: host time only.
        assert r["fwd_device_ms"] is None and r["fwd_bwd_device_ms"] is None and r["device_timing"] is None
        assert r["speedup_device"] is None
        if backend == "eager":
            assert r["speedup_host"] == 1.0
    assert payload["timing"]["gbps_from"] == "host"
    captured = capsys.readouterr()
    assert "benchmarking the CPU backends only" in captured.err
    assert "dev: none without a GPU" in captured.out


def test_bench_kernels_rejects_unknown_op(capsys):
    assert bench.main(["--ops", "softmax"]) == 2
    assert "error: --ops: unknown op 'softmax'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench.main(["--device", "cuda"]) == 2
        assert "error: --device cuda: CUDA is not available" in capsys.readouterr().err


def test_bench_dispatch(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_main(["kernels", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    assert "python -m puzzlecam.bench kernels" in help_text and "--ops" in help_text and "--log-level" in help_text
    assert bench_main([]) == 0 and "kernels" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        bench_main(["softmax"])
    assert exc.value.code == 2
    assert bench_main(["kernels", "--shapes", "huge"]) == 2
    assert "error: --shapes: unknown shape 'huge'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The GPU timing's control flow, on the CPU: torch.cuda's streams, events and graphs replaced by fakes.


class _FakeEvent:
    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


class _FakeStream:
    def __init__(self, device=None):
        pass

    def wait_stream(self, other):
        pass


class _FakeGraph:
    capturing = False
    sync_debug = "default"
    replay_s = 1e-3

    def __init__(self):
        self.replays = 0

    def capture_begin(self, *args, **kwargs):
        assert not _FakeGraph.capturing
        _FakeGraph.capturing = True

    def capture_end(self):
        assert _FakeGraph.capturing
        _FakeGraph.capturing = False

    def replay(self):
        assert not _FakeGraph.capturing
        self.replays += 1
        time.sleep(self.replay_s)


@pytest.fixture
def fake_cuda(monkeypatch):
    import contextlib

    _FakeGraph.capturing, _FakeGraph.sync_debug = False, "default"
    fakes = {
        "Event": _FakeEvent,
        "Stream": _FakeStream,
        "CUDAGraph": _FakeGraph,
        "stream": lambda s: contextlib.nullcontext(),
        "current_stream": lambda device=None: _FakeStream(),
        "synchronize": lambda device=None: None,
        "empty_cache": lambda: None,
        "_sleep": lambda cycles: None,
        "get_device_properties": lambda device=None: types.SimpleNamespace(L2_cache_size=2**20),
        "get_sync_debug_mode": lambda: _FakeGraph.sync_debug,
        "set_sync_debug_mode": lambda mode: setattr(_FakeGraph, "sync_debug", mode),
    }
    for name, value in fakes.items():
        monkeypatch.setattr(torch.cuda, name, value, raising=False)
    timer = bench.Timer(torch.device("cpu"))
    timer.cuda, timer.flush = True, torch.empty(16, dtype=torch.int8)  # the GPU path, on CPU tensors
    return timer


def test_gpu_timing_graph_rotation_and_batches(fake_cuda):
    timer = fake_cuda
    log = []
    calls = [lambda i=i: log.append((i, _FakeGraph.capturing)) or torch.tensor(float(i)) for i in range(3)]
    seen = []

    def check(out):
        seen.append(out)
        return "ok"

    timing = timer.measure(calls, repeats=3, warmup=2, check=check)
    assert timing.method == "graph" and timing.error == ""
    assert timing.calls % 3 == 0 and 3 <= timing.calls <= bench.Timer.MAX_CALLS
    captured = [i for i, capturing in log if capturing]
    # One graph of the batch, cycling through the input sets and ending with calls[0]: its output is checked.
    assert len(captured) == timing.calls and captured[-1] == 0
    assert captured[:3] == [1, 2, 0]
    assert len(seen) == 1 and seen[0].item() == 0.0
    # ~1 ms per replay, divided by the batch.
    assert timing.device_ms == pytest.approx(1.0 / timing.calls, rel=0.9)
    assert timing.host_ms > 0


def test_gpu_timing_falls_back_to_events(fake_cuda):
    timer = fake_cuda

    def syncs():  # a call with a host sync inside: found under the sync debug mode, never captured
        if _FakeGraph.sync_debug == "error":
            raise RuntimeError("called a synchronizing CUDA operation\nmore")
        assert not _FakeGraph.capturing
        return torch.zeros(1)

    timing = timer.measure([syncs], repeats=2, warmup=0, check=lambda out: "ok")
    assert timing.method == "events" and timing.device_ms > 0
    assert timing.error == "GraphUnusable: synchronizes with the host (called a synchronizing CUDA operation)"
    assert _FakeGraph.sync_debug == "default"  # restored

    def uncapturable():
        if _FakeGraph.capturing:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        return torch.zeros(1)

    timing = timer.measure([uncapturable], repeats=2, warmup=0, check=lambda out: "ok")
    assert timing.method == "events"
    assert timing.error == "RuntimeError: operation not permitted when stream is capturing"
    assert not _FakeGraph.capturing  # the capture was ended

    # A replay that does not reproduce the reference is not timed either.
    timing = timer.measure([lambda: torch.ones(1)], repeats=2, warmup=0, check=lambda out: "output 0: wrong")
    assert timing.method == "events" and "differ from the reference: output 0: wrong" in timing.error

    timer.graphs = False  # --no-graphs
    timing = timer.measure([lambda: torch.ones(1)], repeats=2, warmup=0)
    assert timing.method == "events" and timing.error == ""


def test_gpu_bench_case_reports_both_times(fake_cuda, capsys):
    timer = fake_cuda
    assert timer.input_sets(2**30) == 1 and timer.input_sets(1) == bench.Timer.MAX_SETS
    case = bench._make_case("merge", "paper", torch.device("cpu"), torch.float32, ["eager"])
    results = bench.bench_case(case, torch.float32, torch.device("cpu"), timer, 2, 0, copy_gbps=10.0)
    (r,) = results
    assert r.check == "ok" and r.device_timing == {"fwd": "graph", "fwd_bwd": "graph"}
    assert r.fwd_device_ms > 0 and r.fwd_bwd_device_ms > 0 and r.fwd_host_ms > 0 and r.fwd_bwd_host_ms > 0
    assert r.speedup_device == 1.0 and r.speedup_host == 1.0
    # GB/s from the device time.
    assert r.gbps == pytest.approx(case.fwd_bwd_bytes / (r.fwd_bwd_device_ms * 1e-3) / 1e9)
    assert r.extra["input_sets"] == timer.input_sets(bench._input_bytes(case.inputs)) > 1
    r.extra["fwd_bwd_graph_error"], r.device_timing["fwd_bwd"] = "RuntimeError: sync", "events"
    bench.print_table(results, "t")
    out = capsys.readouterr().out
    assert "graph / events*" in out and "merge @ paper, eager, fwd_bwd: no CUDA graph" in out
