"""Shared helpers for the trainer and distributed tests (no tests here).

Real shards (``python -m puzzlecam.data synth`` + ``shard``), real launchers
(``.venv/bin/deepspeed``, ``.venv/bin/torchrun``, ``python launch/train.py``) in their own process
groups, each with a timeout; on failure or timeout the whole group is killed so nothing hangs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from puzzlecam.utils.net import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PYTHON = sys.executable
DEEPSPEED = str(BIN / "deepspeed")
TORCHRUN = str(BIN / "torchrun")
TRAIN = str(ROOT / "launch" / "train.py")
# launch/train.py with the crash-recovery hook installed: launches that set PUZZLECAM_FAULT_KILL run it.
FAULT_TRAIN = str(ROOT / "tests" / "fault_injection.py")
DEMO_CONFIG = str(ROOT / "launch" / "configs" / "demo_cpu.yaml")

_SHARDS: dict[str, Path] = {}


def tiny_shards(base: Path) -> Path:
    """24 synthetic images of 48 px in one shard (made once per session)."""
    if "tiny" in _SHARDS:
        return _SHARDS["tiny"]
    voc, out = base / "voc", base / "shards"
    for cmd in (
        [
            PYTHON,
            "-m",
            "puzzlecam.data",
            "synth",
            "--out",
            str(voc),
            "--num-images",
            "24",
            "--size",
            "48",
            "--seed",
            "0",
        ],
        [PYTHON, "-m", "puzzlecam.data", "shard", "--voc-root", str(voc), "--split", "trainval", "--out", str(out)],
    ):
        subprocess.run(cmd, check=True, capture_output=True, timeout=120, cwd=ROOT)
    _SHARDS["tiny"] = out
    return out


def tiny_overrides(shards: Path, **extra) -> list[str]:
    """A tiny run: width-8 ResNet-18 on 32 px crops, fp32, frozen-statistics norms, logging every step."""
    settings = {
        "data.train_shards": f"{shards}/trainval-*.tar",
        "data.num_workers": 0,
        "data.crop_size": 32,
        "data.min_long_side": 32,
        "data.max_long_side": 48,
        "model.width": 8,
        "model.norm": "frozen",
        "train.max_steps": 4,
        "train.ckpt_every": 2,
        "train.keep_last": 2,
        "train.log_every": 1,
        "train.global_batch_size": 4,
        "train.micro_batch_size": 4,
        "train.grad_accum_steps": 1,
        "train.precision": "fp32",
    }
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]


def train_args(run_dir: Path, overrides: list[str], env: dict | None = None) -> list[str]:
    script = FAULT_TRAIN if env and ("PUZZLECAM_FAULT_KILL" in env or "PUZZLECAM_FAULT_NAN" in env) else TRAIN
    return [script, "--config", DEMO_CONFIG, "--run-dir", str(run_dir), *overrides]


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    # One thread per process: 2 cores, up to 4 workers at once; also the same math in every run.
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra or {})
    return env


class Launch:
    """A launcher subprocess in its own session (process group), output captured to a file."""

    def __init__(self, cmd: list[str], log: Path, env: dict | None = None):
        self.cmd, self.log = cmd, log
        self._out = open(log, "w")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=_env(env), stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
            raise AssertionError(f"timed out after {timeout}s: {' '.join(self.cmd)}\n{self.output()[-4000:]}") from None
        finally:
            self._out.close()
        return rc

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def run_all(launches: list[Launch], timeout: float = 240, expect_ok: bool = True) -> list[int]:
    """Wait for launches started together; on any failure kill every group and show the logs."""
    try:
        codes = [launch.wait(timeout) for launch in launches]
    finally:
        for launch in launches:
            launch.kill()
    if expect_ok:
        for launch, rc in zip(launches, codes, strict=True):
            assert rc == 0, f"exit {rc}: {' '.join(launch.cmd)}\n{launch.output()[-6000:]}"
    return codes


def python_launch(run_dir: Path, overrides: list[str], log: Path, env: dict | None = None) -> Launch:
    return Launch([PYTHON, *train_args(run_dir, overrides, env)], log, env)


def finished_run(run_dir: Path, overrides: list[str]) -> Path:
    """``run_dir`` after a one-process run to its end (its log beside it)."""
    run_all([python_launch(run_dir, overrides, run_dir.parent / f"{run_dir.name}.log")])
    return run_dir


def deepspeed_launch(
    run_dir: Path, overrides: list[str], log: Path, nprocs: int = 2, env: dict | None = None
) -> Launch:
    cmd = [
        DEEPSPEED,
        "--num_gpus",
        str(nprocs),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *train_args(run_dir, overrides, env),
    ]
    return Launch(cmd, log, env)


def two_process_run(run_dir: Path, overrides: list[str], log: Path) -> list[dict]:
    """A 2-process DeepSpeed run of ``overrides`` to its end (replicas checked equal): its metrics records."""
    run_all([deepspeed_launch(run_dir, overrides, log)])
    s = summary(run_dir)
    assert s["world_size"] == 2 and len(set(s["param_digest_per_rank"])) == 1, s
    return metrics(run_dir)


def torchrun_launch(
    run_dir: Path, overrides: list[str], log: Path, nprocs: int = 2, extra: list[str] = (), env: dict | None = None
) -> Launch:
    cmd = [
        TORCHRUN,
        "--nproc-per-node",
        str(nprocs),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        *extra,
        *train_args(run_dir, overrides, env),
    ]
    return Launch(cmd, log, env)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model.safetensors"))


def tensorboard_events(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """The run's TensorBoard scalars (tag -> [(step, value)]) and image tags, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return scalars, events.Tags()["images"]


def max_param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], params_only: bool = True) -> float:
    assert a.keys() == b.keys()
    keys = [k for k in a if not params_only or not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    return max((a[k].double() - b[k].double()).abs().max().item() for k in keys)


def error_lines(output: str) -> list[str]:
    """The lines a command printed as ``error: ...`` (rank 0's; other ranks prefix ``[rank R]``)."""
    return [line for line in output.splitlines() if line.startswith("error:")]


def run_files(run_dir: Path) -> dict[str, bytes]:
    """Every file under a run directory, by relative path, with its bytes (to show nothing changed)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
