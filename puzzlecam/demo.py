"""The main job end to end on a CPU machine: ``make demo`` (``python -m puzzlecam.demo``).

Generates a synthetic VOC-format set and shards it, then runs the whole pipeline (``puzzlecam.pipeline``,
launch/configs/pipeline_demo_cpu.yaml) twice, for the baseline and for Puzzle-CAM: the classifier (the
``deepspeed`` launcher, 2 CPU processes by default), multi-scale CAMs and their threshold-sweep evaluation
on the held-out split, affinity labels, AffinityNet, the random walk and its evaluation, pseudo-labels,
DeepLabv3+ and the evaluation of its segmentation; overlays; and one table of the three mIoUs per mode.

Every stage runs the same command a user would run (shown before each stage). A stage is reused only when
its settings and inputs are those of its recorded complete run (:class:`puzzlecam.stages.Stages`,
``OUT/stages.json``), so a rerun with the same options is quick, an interrupted demo resumes, and changed
options rerun exactly the stages they reach. The stage headers, each stage's own output (streamed live), one
``ran: STAGE`` / ``reused: STAGE`` line per stage and the final table are the command's output (stdout);
see docs/demo.md.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from rich.table import Table

from puzzlecam import VOC_CLASSES
from puzzlecam.config import load_config
from puzzlecam.errors import UsageError
from puzzlecam.pipeline import Pipeline, PipelineConfig, load_pipeline_config, stage_config_path
from puzzlecam.stages import REPO, Stage, Stages, console, launch_command, threads_env
from puzzlecam.utils.cli import run_command

log = logging.getLogger(__name__)

MODES = ("baseline", "puzzle")
DEFAULT_PIPELINE = REPO / "launch" / "configs" / "pipeline_demo_cpu.yaml"
# --until: the pipeline's last stage for each choice
UNTIL = {"cams": "eval_cams", "rw": "eval_rw", "segmentation": "eval_segmentation"}
# The table's columns: (title, the pipeline stage whose evaluation it shows)
COLUMNS = (("CAM", "eval_cams"), ("random walk", "eval_rw"), ("DeepLabv3+", "eval_segmentation"))


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


# --pretrain: the offline analogue of ImageNet initialization (docs/demo.md, "Pretraining"): a separate synthetic
# set of all 20 classes (its own seed, more and smaller objects), a baseline classifier trained on it once, its
# backbone saved as a torchvision-format file that every stage starts from (model.pretrained), as the recipe
# starts from ImageNet. Independent of --seed: one pretraining serves every seed.
PRETRAIN_SET = {"num_images": 2000, "seed": 1000, "layout": "2-5:0.2-0.45", "classes": ",".join(VOC_CLASSES)}
PRETRAIN_KEYS = ("train.mode=baseline", "train.epochs=15", "train.seed=1000")


def run_pretraining(args: argparse.Namespace, stages: Stages, out: Path) -> Path:
    """The --pretrain stages; the backbone file they write."""
    py, root = sys.executable, out / "pretrain"
    voc, shards, run, backbone = root / "voc", root / "shards", root / "run", root / "backbone.pth"
    synth = [py, "-m", "puzzlecam.data", "synth", "--out", str(voc), "--overwrite", "--val-fraction", "0"]
    settings = {**PRETRAIN_SET, "num_images": args.pretrain_images}
    synth += ["--size", str(args.size), *(f"--{k.replace('_', '-')}={v}" for k, v in settings.items())]
    stages.run(Stage("pretrain/synth", "pretraining set", synth, complete=(voc / "ImageSets").exists))
    shard = [py, "-m", "puzzlecam.data", "shard", "--voc-root", str(voc), "--split", "train", "--out", str(shards)]
    stages.run(
        Stage(
            "pretrain/shard",
            "shard the pretraining set",
            [*shard, "--overwrite"],
            inputs=["pretrain/synth"],
            complete=lambda: any(shards.glob("train-*.tar")),
        )
    )
    config = stage_config_path(load_pipeline_config(args.pipeline).configs.classifier)
    overrides = [f"data.train_shards={shards / 'train-*.tar'}", *PRETRAIN_KEYS]
    cfg = load_config(config, overrides)
    overrides.append(f"train.micro_batch_size={_per_process_batch(cfg, args.procs, f'classifier config {config}')}")
    entry = [str(REPO / "launch" / "train.py"), "--config", config, "--run-dir", str(run), "--resume", "auto"]
    entry += overrides
    stages.run(
        Stage(
            "pretrain/train",
            f"pretrain the backbone: a baseline classifier of the pretraining set ({args.launcher})",
            launch_command(args.launcher, args.procs, entry),
            settings={"launcher": args.launcher, "procs": args.procs, "entry": entry, "config": cfg.to_dict()},
            inputs=["pretrain/shard"],
            outputs=[run],
            complete=(run / "model.safetensors").exists,
            env=threads_env(args.procs),
        )
    )
    export = [py, "-m", "puzzlecam.convert", "--to-torchvision", str(run / "model.safetensors"), str(backbone)]
    stages.run(
        Stage(
            "pretrain/export",
            "its backbone as a torchvision-format file",
            [*export, "--overwrite"],
            inputs=["pretrain/train"],
            outputs=[backbone],
            complete=backbone.exists,
        )
    )
    return backbone


def demo_pipeline(args: argparse.Namespace, train_pattern: str, val_pattern: str, mode: str) -> PipelineConfig:
    """The pipeline config of one mode: --pipeline with the demo's shards, launcher, seed and each stage's
    per-process batch (its global batch over --procs)."""
    pc = load_pipeline_config(args.pipeline)
    pc.launcher, pc.procs = args.launcher, args.procs
    pc.data.train, pc.data.cam_eval, pc.data.seg_eval, pc.data.seg_test = train_pattern, val_pattern, val_pattern, ""
    if args.config is not None:
        pc.configs.classifier = args.config
    sets = {
        "classifier": [f"train.mode={mode}", *args.set],
        "affinity": list(args.affinity_set),
        "segmentation": list(args.segmentation_set),
    }
    for stage, overrides in sets.items():
        overrides = [f"train.seed={args.seed}", *getattr(pc.configs, f"{stage}_set"), *overrides]
        path = stage_config_path(getattr(pc.configs, stage))
        batch = _per_process_batch(load_config(path, overrides), args.procs, f"{stage} config {path}")
        setattr(pc.configs, f"{stage}_set", [*overrides, f"train.micro_batch_size={batch}"])
    return pc


def run_demo(args: argparse.Namespace) -> dict[str, dict]:
    out = Path(args.out).resolve()
    voc, shards = out / "voc", out / "shards"
    py = sys.executable
    train_pattern, val_pattern = str(shards / "train-*.tar"), str(shards / "val-*.tar")
    # Every config checked before anything runs (a bad --procs or --set fails here, writing nothing).
    configs = {mode: demo_pipeline(args, train_pattern, val_pattern, mode) for mode in MODES}
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
        cmd = [py, "-m", "puzzlecam.data", "shard", "--voc-root", str(voc), "--split", split, "--out", str(shards)]
        stages.run(
            Stage(
                f"shard_{split}",
                f"shard the {split} split",
                [*cmd, "--overwrite"],
                inputs=["synth"],
                complete=lambda split=split: any(shards.glob(f"{split}-*.tar")),
            )
        )
    data_stages: tuple[str, ...] = ("shard_train", "shard_val")
    if args.pretrain:
        backbone = run_pretraining(args, stages, out)
        for pc in configs.values():  # every stage starts from it, as the recipe starts from ImageNet
            pc.model.pretrained, pc.model.later_stages_from = str(backbone), "pretrained"
        data_stages += ("pretrain/export",)
    results = {}
    for mode in MODES:
        run = out / "runs" / mode
        until = UNTIL[args.until if mode == "puzzle" else args.baseline_until]
        pipeline = Pipeline(
            configs[mode], run, until=until, stages=stages, key_prefix=f"{mode}/", data_inputs=data_stages
        )
        rows = {row["stage"]: row for row in pipeline.run()}
        viz, inputs = run / "viz", [f"{mode}/eval_cams", "shard_val"]
        cmd = [py, "-m", "puzzlecam.viz", "--cams", str(run / "classifier" / "cams_eval"), "--shards", val_pattern]
        cmd += ["--out", str(viz), "--n", str(args.pictures)]
        cmd += ["--summary", str(run / "classifier" / "cam_eval" / "summary.json")]
        if "eval_rw" in rows:  # the random walk's labels at the pseudo-label threshold: what DeepLabv3+ learns from
            threshold = configs[mode].pseudo_labels.threshold
            cmd += ["--rw", str(run / "affinity" / "rw_eval_maps")]
            cmd += ["--rw-summary", str(run / "affinity" / "rw_eval" / "summary.json")]
            cmd += [] if threshold is None else ["--rw-threshold", f"{threshold:g}"]
            inputs.append(f"{mode}/eval_rw")
        if "eval_segmentation" in rows:
            cmd += ["--segmentation", str(run / "segmentation" / "seg_eval_png")]
            inputs.append(f"{mode}/segment_eval")
        stages.run(
            Stage(
                f"{mode}/viz",
                f"overlays ({mode})",
                cmd,
                inputs=inputs,
                outputs=[viz],
                complete=(viz / "grid.png").exists,
            )
        )
        results[mode] = {"rows": rows, "grid": viz / "grid.png"}
    return results


def print_table(results: dict[str, dict], out: Path) -> None:
    table = Table(title="mIoU % on the held-out split (100 images): CAMs, random walk, DeepLabv3+ (best threshold)")
    table.add_column("mode")
    for title, _ in COLUMNS:
        table.add_column(title)
    table.add_column("overlays", overflow="fold")
    miou: dict[str, dict[str, float]] = {}
    for mode, r in results.items():
        cells = []
        for title, key in COLUMNS:
            row = r["rows"].get(key)
            if row is None or row.get("miou") is None:
                cells.append("-")
                continue
            miou.setdefault(title, {})[mode] = 100 * row["miou"]
            threshold = f" (t={row['threshold']:.2f})" if row.get("threshold") is not None else ""
            cells.append(f"{100 * row['miou']:.1f}{threshold}")
        table.add_row(mode, *cells, str(r["grid"].relative_to(out)))
    console.print(table)
    for title, by_mode in miou.items():
        if len(by_mode) == len(MODES):
            console.print(f"{title}: Puzzle-CAM - baseline {by_mode['puzzle'] - by_mode['baseline']:+.1f} mIoU points")
    for mode in MODES:
        steps = [f"{t} {miou[t][mode]:.1f}" for t, _ in COLUMNS if mode in miou.get(t, {})]
        if len(steps) > 1:
            console.print(f"{mode}: " + " -> ".join(steps))
    console.print(
        f"Everything is under {out}: runs/<mode>/ (classifier/, affinity/, segmentation/: each stage's run, "
        "CAMs, random-walk maps, predictions and evaluations; affinity_labels/, pseudo_labels/, their shards; "
        "viz/; summary.json), logs/, shards/, voc/, stages.json"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m puzzlecam.demo",
        description="The main job on a CPU machine: synthetic VOC-format data -> shards -> the whole pipeline "
        "(python -m puzzlecam.pipeline) for Puzzle-CAM and for the baseline: classifier training (DeepSpeed, 2 "
        "processes) -> multi-scale CAMs -> threshold-sweep mIoU -> affinity labels -> AffinityNet -> random walk -> "
        "mIoU -> pseudo-labels -> DeepLabv3+ -> segmentation -> mIoU; overlays; one table. A stage is reused on a "
        "rerun when its settings and inputs are unchanged (OUT/stages.json); each stage says whether it ran or was "
        "reused.",
    )
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument(
        "--pipeline",
        default=str(DEFAULT_PIPELINE),
        help="pipeline config: the stage configs and shared settings (default launch/configs/pipeline_demo_cpu.yaml); "
        "its data, launcher and procs are the demo's",
    )
    p.add_argument(
        "--config",
        default=None,
        help="classifier run config for both modes (default: the pipeline config's, launch/configs/demo_cpu.yaml)",
    )
    p.add_argument(
        "--num-images",
        type=int,
        default=400,
        help="synthetic images in all (default 400; a quarter are the evaluation split)",
    )
    p.add_argument("--size", type=int, default=128, help="long side of the synthetic images in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of every training run (default 0)")
    p.add_argument(
        "--launcher",
        choices=("deepspeed", "torchrun", "python"),
        default="deepspeed",
        help="how training processes start (default deepspeed; python = one process)",
    )
    p.add_argument(
        "--procs", type=int, default=2, help="training and inference processes (default 2; 1 with --launcher python)"
    )
    p.add_argument("--pictures", type=int, default=8, help="images in each overlay grid (default 8)")
    p.add_argument(
        "--until",
        choices=tuple(UNTIL),
        default="segmentation",
        help="how far the Puzzle-CAM pipeline goes: cams (stage 1), rw (stages 1-2), segmentation (all; default)",
    )
    p.add_argument(
        "--baseline-until",
        choices=tuple(UNTIL),
        default="segmentation",
        help="how far the baseline's pipeline goes (default segmentation)",
    )
    for stage, example in (
        ("", "train.epochs=5"),
        ("affinity-", "train.epochs=2"),
        ("segmentation-", "train.epochs=2"),
    ):
        what = {"": "both classifier runs", "affinity-": "AffinityNet", "segmentation-": "DeepLabv3+"}[stage]
        p.add_argument(
            f"--{stage}set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=f"a config override for {what}, e.g. --{stage}set {example} (repeatable)",
        )
    p.add_argument(
        "--pretrain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start every stage from a backbone pretrained once on a separate synthetic set (2,000 images of all 20 "
        "classes, another seed and layout), the offline analogue of the recipe's ImageNet initialization (default; "
        "docs/demo.md); --no-pretrain trains every stage from scratch",
    )
    p.add_argument(
        "--pretrain-images", type=int, default=PRETRAIN_SET["num_images"], help="images of the pretraining set (2000)"
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
