"""The main job end to end on a CPU machine: ``make demo`` (``python -m puzzlecam.demo``).

Generates a synthetic VOC-format set, shards it, trains a baseline and a Puzzle-CAM model with the
``deepspeed`` launcher (2 CPU processes by default), runs multi-scale CAM inference and the
threshold-sweep evaluation on the evaluation split, writes overlays; then stage 2 on the Puzzle-CAM run
(affinity labels from its CAMs of the training images, labelled shards, AffinityNet, the random walk of
its evaluation CAMs, their evaluation and overlays); and prints one comparison table.

Every stage runs the same commands a user would run (shown before each stage). A stage is reused
only when its settings and inputs are those of its recorded complete run (:class:`Stages`,
``OUT/stages.json``), so a rerun with the same options is quick, an interrupted demo resumes, and
changed options rerun exactly the stages they reach. The stage headers, each stage's own output
(streamed live), one ``ran: STAGE`` / ``reused: STAGE`` line per stage and the final table are the
command's output (stdout); see docs/demo.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from rich.table import Table

from puzzlecam.config import load_config
from puzzlecam.errors import UsageError
from puzzlecam.stages import REPO, Stage, Stages, console, launch_command
from puzzlecam.utils.cli import run_command

log = logging.getLogger(__name__)

DEFAULT_CONFIG = REPO / "launch" / "configs" / "demo_cpu.yaml"
MODES = ("baseline", "puzzle")
RANDOM_WALK = "random walk"  # the table's row of stage 2 (the Puzzle-CAM CAMs after the walk)
DEFAULT_AFFINITY_CONFIG = REPO / "launch" / "configs" / "demo_affinity_cpu.yaml"
# 2**4 walk steps, not the paper's 2**8: its stride-4 maps are ~32 px across, VOC's ~110, and a walk spreads
# as the square root of its steps (docs/demo.md has the measured sweep).
DEMO_EXP_TIMES = 4


def _train_command(launcher: str, procs: int, entry: list[str]) -> list[str]:
    """``launch/train.py`` + ``entry`` under ``launcher`` (each launcher on a free port)."""
    return launch_command(launcher, procs, entry)


def _per_process_batch(cfg, procs: int, source: str) -> int:
    """The config's global batch split over ``procs`` processes (each process takes its share)."""
    t = cfg.train
    per_proc = t.global_batch_size // (procs * t.grad_accum_steps)
    if per_proc * procs * t.grad_accum_steps != t.global_batch_size:
        raise UsageError(
            f"--procs {procs}: train.global_batch_size={t.global_batch_size} of {source} is not divisible by "
            f"--procs {procs} x train.grad_accum_steps {t.grad_accum_steps}"
        )
    return per_proc


def run_demo(args: argparse.Namespace) -> dict[str, dict]:
    out = Path(args.out).resolve()
    voc, shards = out / "voc", out / "shards"
    py = sys.executable
    # Single-threaded math per process: the launcher starts several processes on few cores.
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // max(1, args.procs)))}

    cfg = load_config(args.config, args.set)
    per_proc = _per_process_batch(cfg, args.procs, "--config")
    stages = Stages(out)
    synth = [py, "-m", "puzzlecam.data", "synth", "--out", str(voc), "--overwrite"]
    synth += ["--num-images", str(args.num_images), "--size", str(args.size), "--seed", str(args.seed)]
    # synth and shard --overwrite replace their earlier output atomically: nothing to remove first.
    stages.run(
        Stage(
            "synth",
            "synthetic VOC-format data",
            synth,
            complete=(voc / "ImageSets" / "Segmentation" / "val.txt").exists,
        )
    )
    for split in ("train", "val"):
        stages.run(
            Stage(
                f"shard_{split}",
                f"shard the {split} split",
                [py, "-m", "puzzlecam.data", "shard", "--voc-root", str(voc), "--split", split, "--out", str(shards)]
                + ["--overwrite"],
                inputs=["synth"],
                complete=lambda split=split: any(shards.glob(f"{split}-*.tar")),
            )
        )
    train_pattern, val_pattern = str(shards / "train-*.tar"), str(shards / "val-*.tar")

    results = {}
    for mode in MODES:
        run = out / "runs" / mode
        cams, evaluation, viz = run / "cams", run / "eval", run / "viz"
        overrides = [
            f"data.train_shards={train_pattern}",
            f"train.mode={mode}",
            f"train.seed={args.seed}",
            f"train.micro_batch_size={per_proc}",
            *args.set,
        ]
        entry = [str(REPO / "launch" / "train.py"), "--config", args.config, "--run-dir", str(run), "--resume", "auto"]
        entry += overrides
        stages.run(
            Stage(
                f"train_{mode}",
                f"train {mode} ({args.launcher}, {args.procs} processes)",
                _train_command(args.launcher, args.procs, entry),
                # Not the launcher's free port: the resolved config and how many processes share the batch.
                settings={
                    "launcher": args.launcher,
                    "procs": args.procs,
                    "entry": entry,
                    "config": load_config(args.config, overrides).to_dict(),
                },
                inputs=["shard_train"],
                outputs=[run],  # a stale checkpoint must not be resumed
                complete=(run / "model.safetensors").exists,
                env=env,
            )
        )
        stages.run(
            Stage(
                f"infer_{mode}",
                f"multi-scale CAM inference ({mode})",
                [py, "-m", "puzzlecam.infer", "--weights", str(run / "model.safetensors"), "--shards", val_pattern]
                + ["--out", str(cams), "--device", "cpu", "--num-workers", "1"],
                inputs=[f"train_{mode}", "shard_val"],
                outputs=[cams],  # inference skips the images already in its store
                complete=(cams / "index.parquet").exists,
                env=env,
            )
        )
        stages.run(
            Stage(
                f"eval_{mode}",
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
                inputs=[f"infer_{mode}", "shard_val"],
                outputs=[evaluation],
                complete=(evaluation / "summary.json").exists,
            )
        )
        stages.run(
            Stage(
                f"viz_{mode}",
                f"overlays ({mode})",
                [py, "-m", "puzzlecam.viz", "--cams", str(cams), "--shards", val_pattern, "--out", str(viz)]
                + ["--n", str(args.pictures), "--summary", str(evaluation / "summary.json")],
                inputs=[f"eval_{mode}", "shard_val"],
                outputs=[viz],
                complete=(viz / "grid.png").exists,
            )
        )
        summary = json.loads((evaluation / "summary.json").read_text())
        results[mode] = {"summary": summary, "run": run, "grid": viz / "grid.png"}
    if not args.no_random_walk:
        results[RANDOM_WALK] = run_random_walk_stages(args, stages, cfg, out, train_pattern, val_pattern, env)
    return results


def run_random_walk_stages(args, stages: Stages, cfg, out: Path, train_pattern: str, val_pattern: str, env) -> dict:
    """Stage 2 on the Puzzle-CAM run: its CAMs of the training images -> affinity labels (no CRF) ->
    labelled shards -> AffinityNet -> the random walk of its evaluation CAMs -> evaluation and overlays."""
    py = sys.executable
    puzzle, run = out / "runs" / "puzzle", out / "runs" / "affinity"
    cams_train, labels, shards = puzzle / "cams_train", puzzle / "affinity_labels", out / "shards_affinity"
    rw, evaluation, viz = run / "rw", run / "rw_eval", run / "viz"
    stages.run(
        Stage(
            "infer_train_puzzle",
            "CAMs of the training images (puzzle)",
            [py, "-m", "puzzlecam.infer", "--weights", str(puzzle / "model.safetensors"), "--shards", train_pattern]
            + ["--out", str(cams_train), "--device", "cpu", "--num-workers", "1"],
            inputs=["train_puzzle", "shard_train"],
            outputs=[cams_train],
            complete=(cams_train / "index.parquet").exists,
            env=env,
        )
    )
    stages.run(
        Stage(
            "affinity_labels",
            "affinity labels (confident foreground 0.40, background 0.10, no CRF)",
            [py, "-m", "puzzlecam.labels", "--affinity", "--no-crf", "--cams", str(cams_train), "--out", str(labels)],
            inputs=["infer_train_puzzle"],
            outputs=[labels],
            complete=lambda: any(labels.glob("*.png")),
        )
    )
    stages.run(
        Stage(
            "label_shards",
            "training shards with the affinity labels",
            [py, "-m", "puzzlecam.data", "label-shards", "--shards", train_pattern, "--labels", str(labels)]
            + ["--out", str(shards), "--overwrite"],
            inputs=["affinity_labels", "shard_train"],
            complete=lambda: any(shards.glob("train-*.tar")),
        )
    )
    # No ImageNet file here: the frozen backbone is the Puzzle-CAM classifier's (docs/demo.md).
    overrides = [
        f"data.train_shards={shards / 'train-*.tar'}",
        f"model.arch={cfg.model.arch}",
        f"model.width={cfg.model.width}",
        f"model.pretrained={puzzle / 'model.safetensors'}",
        f"train.seed={args.seed}",
        *args.affinity_set,
    ]
    affinity_cfg = load_config(args.affinity_config, overrides)
    overrides.append(f"train.micro_batch_size={_per_process_batch(affinity_cfg, args.procs, '--affinity-config')}")
    entry = [str(REPO / "launch" / "train.py"), "--config", args.affinity_config, "--run-dir", str(run)]
    entry += ["--resume", "auto", *overrides]
    stages.run(
        Stage(
            "train_affinity",
            f"train AffinityNet ({args.launcher}, {args.procs} processes)",
            _train_command(args.launcher, args.procs, entry),
            settings={
                "launcher": args.launcher,
                "procs": args.procs,
                "entry": entry,
                "config": load_config(args.affinity_config, overrides).to_dict(),
            },
            inputs=["label_shards", "train_puzzle"],
            outputs=[run],  # a stale checkpoint must not be resumed
            complete=(run / "model.safetensors").exists,
            env=env,
        )
    )
    stages.run(
        Stage(
            "rw",
            "random walk of the evaluation CAMs (puzzle)",
            [py, "-m", "puzzlecam.rw", "--weights", str(run / "model.safetensors"), "--cams", str(puzzle / "cams")]
            + ["--shards", val_pattern, "--out", str(rw), "--device", "cpu", "--num-workers", "1"]
            + ["--exp-times", str(DEMO_EXP_TIMES)],
            inputs=["train_affinity", "infer_puzzle", "shard_val"],
            outputs=[rw],
            complete=(rw / "index.parquet").exists,
            env=env,
        )
    )
    stages.run(
        Stage(
            "eval_rw",
            "threshold-sweep evaluation (random walk)",
            [py, "-m", "puzzlecam.evaluate", "--cams", str(rw), "--shards", val_pattern, "--out", str(evaluation)],
            inputs=["rw", "shard_val"],
            outputs=[evaluation],
            complete=(evaluation / "summary.json").exists,
        )
    )
    stages.run(
        Stage(
            "viz_rw",
            "overlays (random walk)",
            [py, "-m", "puzzlecam.viz", "--cams", str(rw), "--shards", val_pattern, "--out", str(viz)]
            + ["--n", str(args.pictures), "--summary", str(evaluation / "summary.json")],
            inputs=["eval_rw", "shard_val"],
            outputs=[viz],
            complete=(viz / "grid.png").exists,
        )
    )
    summary = json.loads((evaluation / "summary.json").read_text())
    return {"summary": summary, "run": run, "grid": viz / "grid.png"}


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
    miou = {mode: 100 * r["summary"]["best_miou"] for mode, r in results.items()}
    console.print(f"Puzzle-CAM - baseline: {miou['puzzle'] - miou['baseline']:+.1f} mIoU points")
    if RANDOM_WALK in miou:
        console.print(f"random walk - Puzzle-CAM: {miou[RANDOM_WALK] - miou['puzzle']:+.1f} mIoU points")
    console.print(
        f"Everything is under {out}: runs/<mode>/ (config, metrics, checkpoints, model.safetensors, "
        f"cams/, eval/, viz/; puzzle/ also cams_train/, affinity_labels/), runs/affinity/ (AffinityNet, rw/, "
        "rw_eval/, viz/), logs/, shards/, "
        "shards_affinity/, voc/"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m puzzlecam.demo",
        description="The main job on a CPU machine: synthetic VOC-format data -> shards -> baseline and Puzzle-CAM "
        "training (DeepSpeed, 2 processes) -> multi-scale CAMs -> threshold-sweep mIoU -> overlays; then stage 2 on "
        "the Puzzle-CAM run: affinity labels -> AffinityNet -> random walk -> mIoU -> overlays; one comparison "
        "table. A stage is reused on a rerun when its settings and inputs are unchanged "
        "(OUT/stages.json); each stage says whether it ran or was reused.",
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
    p.add_argument(
        "--affinity-config",
        default=str(DEFAULT_AFFINITY_CONFIG),
        help="run config of stage 2's AffinityNet (default launch/configs/demo_affinity_cpu.yaml)",
    )
    p.add_argument(
        "--affinity-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for the AffinityNet training, e.g. --affinity-set train.epochs=2 (repeatable)",
    )
    p.add_argument(
        "--no-random-walk",
        action="store_true",
        help="stop after stage 1 (no affinity labels, AffinityNet or random walk)",
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
