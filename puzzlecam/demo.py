"""The main job end to end on a CPU machine: ``make demo`` (``python -m puzzlecam.demo``).

Generates a synthetic VOC-format set, shards it, trains a baseline and a Puzzle-CAM model with the
``deepspeed`` launcher (2 CPU processes by default), runs multi-scale CAM inference and the
threshold-sweep evaluation on the evaluation split, writes overlays, and prints one comparison table.

Every stage runs the same commands a user would run (shown before each stage), and every stage is
reused when its output is already complete, so a rerun is quick and an interrupted demo resumes.
The stage headers, each stage's own output (streamed live) and the final table are the command's
output (stdout); see docs/demo.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from puzzlecam.config import load_config
from puzzlecam.errors import DemoError, UsageError
from puzzlecam.utils.cli import run_command
from puzzlecam.utils.net import free_port

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "launch" / "configs" / "demo_cpu.yaml"
MODES = ("baseline", "puzzle")

console = Console(width=max(110, shutil.get_terminal_size((110, 24)).columns))


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (deepspeed, torchrun)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise DemoError(f"cannot find the '{name}' command next to {sys.executable} or on PATH; run `make install`")
    return found


def _run(stage: str, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run one stage's command, showing it, its output live, and failing with its log's path."""
    console.rule(f"[bold]{stage}")
    console.print("$ " + shlex.join(cmd), style="dim", soft_wrap=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            sys.stdout.write(line)
        rc = proc.wait()
    if rc != 0:
        raise DemoError(f"stage '{stage}' failed with exit code {rc}; full output in {log}")
    console.print(f"[green]{stage}: done in {time.monotonic() - start:.0f} s[/]")


def _train_command(launcher: str, procs: int, config: Path, run_dir: Path, overrides: list[str]) -> list[str]:
    entry = [
        str(REPO / "launch" / "train.py"),
        "--config",
        str(config),
        "--run-dir",
        str(run_dir),
        "--resume",
        "auto",
        *overrides,
    ]
    if launcher == "deepspeed":
        return [
            _bin("deepspeed"),
            "--num_gpus",
            str(procs),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            *entry,
        ]
    if launcher == "torchrun":
        return [
            _bin("torchrun"),
            "--nproc-per-node",
            str(procs),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{free_port()}",
            *entry,
        ]
    return [sys.executable, *entry]


def run_demo(args: argparse.Namespace) -> dict[str, dict]:
    out = Path(args.out).resolve()
    voc, shards, logs = out / "voc", out / "shards", out / "logs"
    py = sys.executable
    # Single-threaded math per process: the launcher starts several processes on few cores.
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // max(1, args.procs)))}

    # The global batch is the config's; each process takes its share of it.
    cfg = load_config(args.config, args.set)
    per_proc = cfg.train.global_batch_size // (args.procs * cfg.train.grad_accum_steps)
    if per_proc * args.procs * cfg.train.grad_accum_steps != cfg.train.global_batch_size:
        raise UsageError(
            f"--procs {args.procs}: train.global_batch_size={cfg.train.global_batch_size} is not divisible by "
            f"--procs {args.procs} x train.grad_accum_steps {cfg.train.grad_accum_steps}"
        )
    if not (voc / "ImageSets" / "Segmentation" / "val.txt").exists():
        _run(
            "synthetic VOC-format data",
            [
                py,
                "-m",
                "puzzlecam.data",
                "synth",
                "--out",
                str(voc),
                "--num-images",
                str(args.num_images),
                "--size",
                str(args.size),
                "--seed",
                str(args.seed),
            ],
            logs / "synth.log",
        )
    for split in ("train", "val"):
        if not any(shards.glob(f"{split}-*.tar")):
            _run(
                f"shard the {split} split",
                [py, "-m", "puzzlecam.data", "shard", "--voc-root", str(voc), "--split", split, "--out", str(shards)],
                logs / f"shard_{split}.log",
            )
    train_pattern, val_pattern = str(shards / "train-*.tar"), str(shards / "val-*.tar")

    results = {}
    for mode in MODES:
        run = out / "runs" / mode
        overrides = [
            f"data.train_shards={train_pattern}",
            f"train.mode={mode}",
            f"train.seed={args.seed}",
            f"train.micro_batch_size={per_proc}",
            *args.set,
        ]
        if not (run / "model.safetensors").exists():
            _run(
                f"train {mode} ({args.launcher}, {args.procs} processes)",
                _train_command(args.launcher, args.procs, Path(args.config), run, overrides),
                logs / f"train_{mode}.log",
                env,
            )
        cams, evaluation, viz = run / "cams", run / "eval", run / "viz"
        if not (cams / "index.parquet").exists():
            cmd = [
                py,
                "-m",
                "puzzlecam.infer",
                "--weights",
                str(run / "model.safetensors"),
                "--shards",
                val_pattern,
                "--out",
                str(cams),
                "--device",
                "cpu",
                "--num-workers",
                "1",
            ]
            _run(f"multi-scale CAM inference ({mode})", cmd, logs / f"infer_{mode}.log", env)
        if not (evaluation / "summary.json").exists():
            _run(
                f"threshold-sweep evaluation ({mode})",
                [
                    py,
                    "-m",
                    "puzzlecam.evaluate",
                    "--cams",
                    str(cams),
                    "--shards",
                    val_pattern,
                    "--out",
                    str(evaluation),
                ],
                logs / f"eval_{mode}.log",
            )
        if not (viz / "grid.png").exists():
            _run(
                f"overlays ({mode})",
                [
                    py,
                    "-m",
                    "puzzlecam.viz",
                    "--cams",
                    str(cams),
                    "--shards",
                    val_pattern,
                    "--out",
                    str(viz),
                    "--n",
                    str(args.pictures),
                    "--summary",
                    str(evaluation / "summary.json"),
                ],
                logs / f"viz_{mode}.log",
            )
        summary = json.loads((evaluation / "summary.json").read_text())
        results[mode] = {"summary": summary, "run": run, "grid": viz / "grid.png"}
    return results


def print_table(results: dict[str, dict], out: Path) -> None:
    table = Table(title="CAM quality on the synthetic evaluation split (multi-scale + flip)")
    for col in ("mode", "images", "best threshold", "mIoU %"):
        table.add_column(col)
    table.add_column("overlays", overflow="fold")
    for mode, r in results.items():
        s = r["summary"]
        table.add_row(
            mode,
            str(s["num_images"]),
            f"{s['best_threshold']:.2f}",
            f"{100 * s['best_miou']:.1f}",
            str(r["grid"].relative_to(out)),
        )
    console.print(table)
    if len(results) == 2:
        gain = 100 * (results["puzzle"]["summary"]["best_miou"] - results["baseline"]["summary"]["best_miou"])
        console.print(f"Puzzle-CAM - baseline: {gain:+.1f} mIoU points")
    console.print(
        f"Everything is under {out}: runs/<mode>/ (config, metrics, checkpoints, model.safetensors, "
        f"cams/, eval/, viz/), logs/, shards/, voc/"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m puzzlecam.demo",
        description="The main job on a CPU machine: synthetic VOC-format data -> shards -> baseline and Puzzle-CAM "
        "training (DeepSpeed, 2 processes) -> multi-scale CAMs -> threshold-sweep mIoU -> overlays -> "
        "one comparison table. Completed stages are reused on a rerun.",
    )
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="run config for both modes (default launch/configs/demo_cpu.yaml)"
    )
    p.add_argument(
        "--num-images",
        type=int,
        default=400,
        help="synthetic images in all (default 400; a quarter are the evaluation split)",
    )
    p.add_argument("--size", type=int, default=128, help="long side of the synthetic images in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of both training runs (default 0)")
    p.add_argument(
        "--launcher",
        choices=("deepspeed", "torchrun", "python"),
        default="deepspeed",
        help="how training processes start (default deepspeed; python = one process)",
    )
    p.add_argument("--procs", type=int, default=2, help="training processes (default 2; ignored by --launcher python)")
    p.add_argument("--pictures", type=int, default=8, help="images in each overlay grid (default 8)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for both training runs, e.g. --set train.epochs=5 (repeatable)",
    )
    p.add_argument("--fresh", action="store_true", help="delete --out first instead of reusing completed stages")
    return p


def run(args: argparse.Namespace) -> None:
    if args.launcher == "python":
        args.procs = 1
    if args.procs < 1:
        raise UsageError(f"--procs must be at least 1, got {args.procs}")
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    start = time.monotonic()
    results = run_demo(args)
    print_table(results, out)
    console.print(f"demo finished in {time.monotonic() - start:.0f} s")


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
