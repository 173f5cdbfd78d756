"""``python -m puzzlecam.pipeline --config launch/configs/pipeline_*.yaml --out RUN``: the whole weakly
supervised pipeline in order, resumably (docs/pipeline.md; design.md §1).

Stages: classifier training -> CAMs of the training images (and of the masked evaluation split) -> their
threshold-sweep evaluation -> affinity labels -> labelled shards -> AffinityNet training -> the random walk
of both CAM stores -> its evaluation -> pseudo-labels -> pseudo-label shards -> DeepLabv3+ training ->
segmentation of the evaluation split -> its evaluation (-> submission files of a test split).

Each stage is one command of this project, printed before it runs (``--print-only`` prints them all), so a
cluster user can run any of them on their own nodes instead. A finished stage is reused on a rerun when its
settings and inputs are unchanged; an interrupted one resumes (training from its newest checkpoint);
``--rerun STAGE`` runs a stage and every stage after it again. The end: a table and ``RUN/summary.json`` with
each stage's time, mIoU and threshold where it has them, and where its outputs are.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from rich.table import Table

from puzzlecam.config import _from_dict, load_config
from puzzlecam.errors import ConfigError, UsageError
from puzzlecam.stages import TRAIN_ENTRY, Stage, Stages, console, launch_command, threads_env
from puzzlecam.utils.cli import run_command
from puzzlecam.utils.files import atomic_write_json

SUMMARY = "summary.json"


@dataclass
class PipelineData:
    # Shard patterns. train: the training images of every stage (VOC train_aug); cam_eval: the masked split on
    # which CAMs and random-walk maps are scored (VOC train, 1,464); seg_eval: DeepLabv3+'s evaluation split
    # (VOC val, 1,449); seg_test: a test split without masks for submission files ("" = none).
    train: str = ""
    cam_eval: str = ""
    seg_eval: str = ""
    seg_test: str = ""


@dataclass
class PipelineModel:
    # Shared by the three training configs (model.arch, model.width, model.pretrained of each).
    arch: str = "resnet50"
    width: int = 64
    # ImageNet weights (torchvision / ResNeSt layout, a local file); null: random (CPU demo only).
    pretrained: str | None = None
    # Where AffinityNet's and DeepLabv3+'s backbones start: "pretrained" (the method: the ImageNet file) or
    # "classifier" (the stage-1 classifier's backbone: the demo's stand-in where no ImageNet file exists).
    later_stages_from: Literal["pretrained", "classifier"] = "pretrained"


@dataclass
class PipelineConfigs:
    # The run config of each training stage (launch/configs/*.yaml) and dotted overrides for it.
    classifier: str = ""
    affinity: str = ""
    segmentation: str = ""
    classifier_set: list[str] = field(default_factory=list)
    affinity_set: list[str] = field(default_factory=list)
    segmentation_set: list[str] = field(default_factory=list)


@dataclass
class PipelineAffinityLabels:
    # design.md §8 / the original README: confident foreground 0.40, background 0.10, each through the label CRF.
    fg_threshold: float = 0.40
    bg_threshold: float = 0.10
    crf: bool = True


@dataclass
class PipelineRandomWalk:
    beta: float = 10.0
    exp_times: int = 8  # 2**8 = 256 steps (the demo's ~32 px maps take 4)


@dataclass
class PipelinePseudoLabels:
    # Background threshold on the random-walk maps (README: 0.35); null = the best of the rw evaluation.
    threshold: float | None = 0.35
    crf_iters: int = 1  # label-CRF mean-field steps (README: 1; 0 = no CRF)


@dataclass
class PipelineSegment:
    crf: bool = True  # dense CRF on the softmax (design.md §9)
    # Scales of the multi-scale inference, each with its flip (the original's 0.5, 1.0, 1.5, 2.0).
    scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    # Which DeepLabv3+ weights segment: "last" (the end of training) or "best" (selected on seg_eval: a
    # number from it is selected on the split it is reported on).
    weights: Literal["last", "best"] = "last"


@dataclass
class PipelineConfig:
    name: str = "pipeline"
    # deepspeed | torchrun | python (one process); procs: processes on this machine for training and inference.
    launcher: Literal["deepspeed", "torchrun", "python"] = "deepspeed"
    procs: int = 1
    device: str = ""  # inference device: cpu, cuda ("" = cuda when available)
    data: PipelineData = field(default_factory=PipelineData)
    model: PipelineModel = field(default_factory=PipelineModel)
    configs: PipelineConfigs = field(default_factory=PipelineConfigs)
    affinity_labels: PipelineAffinityLabels = field(default_factory=PipelineAffinityLabels)
    random_walk: PipelineRandomWalk = field(default_factory=PipelineRandomWalk)
    pseudo_labels: PipelinePseudoLabels = field(default_factory=PipelinePseudoLabels)
    segment: PipelineSegment = field(default_factory=PipelineSegment)
    # Threads per process of the CPU stages' math (0 = cores / procs).
    threads: int = 0


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    """Read and check a pipeline config; relative stage-config paths resolve against the repository root or
    the current directory."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"pipeline config {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"pipeline config {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"pipeline config {p} must hold a mapping at the top level")
    try:
        pc = _from_dict(PipelineConfig, data)
    except ConfigError as e:
        raise ConfigError(f"pipeline config {p}: {e}") from None
    if pc.procs < 1:
        raise ConfigError(f"pipeline config {p}: 'procs' must be at least 1, got {pc.procs}")
    for key in ("train", "cam_eval", "seg_eval"):
        if not getattr(pc.data, key):
            raise ConfigError(f"pipeline config {p}: 'data.{key}' is empty: give a shard pattern (docs/pipeline.md)")
    for key in ("classifier", "affinity", "segmentation"):
        if not getattr(pc.configs, key):
            raise ConfigError(f"pipeline config {p}: 'configs.{key}' is empty: name that stage's run config")
    if pc.model.later_stages_from == "pretrained" and not pc.model.pretrained:
        raise ConfigError(
            f"pipeline config {p}: 'model.later_stages_from' is 'pretrained' but 'model.pretrained' is not set: "
            "give the ImageNet file, or start stages 2 and 3 from the classifier (later_stages_from: classifier)"
        )
    return pc


def stage_config_path(path: str) -> str:
    """A stage config named relative to the current directory or, failing that, to the repository root."""
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return str(p)
    return str(TRAIN_ENTRY.parents[1] / p)


def _summary_of(path: Path) -> dict:
    """mIoU and threshold of an evaluation's summary.json (puzzlecam.evaluate)."""
    s = json.loads(path.read_text())
    out = {"miou": s.get("best_miou", s.get("miou")), "images": s.get("num_images")}
    if s.get("best_threshold") is not None:
        out["threshold"] = s["best_threshold"]
    return out


class Pipeline:
    """The stages of one run directory in order (module doc); ``stage_list()`` builds them, each just before it
    runs, so that a stage can read an earlier one's result (the rw threshold)."""

    def __init__(
        self,
        pc: PipelineConfig,
        out: Path,
        *,
        print_only: bool = False,
        until: str | None = None,
        stages: Stages | None = None,
        key_prefix: str = "",
        data_inputs: tuple[str, ...] = (),
    ):
        """``until``: the last stage to run (None: all); ``stages``: a record shared with other stages (the
        demo's; default ``out/stages.json``), in which this pipeline's keys start with ``key_prefix`` and every
        stage also depends on the stages ``data_inputs`` (those that made the shards)."""
        self.pc, self.out, self.print_only = pc, Path(out).resolve(), print_only
        self.until, self.key_prefix, self.data_inputs = until, key_prefix, tuple(data_inputs)
        self.stages = stages
        self.py = sys.executable
        self.env = threads_env(pc.procs, pc.threads)
        d = self.out
        self.dirs = {
            "classifier": d / "classifier",
            "affinity": d / "affinity",
            "segmentation": d / "segmentation",
        }

    # -- helpers -----------------------------------------------------------------------------------
    def _device(self) -> list[str]:
        return ["--device", self.pc.device] if self.pc.device else []

    def _module(self, module: str, *args: str, distributed: bool = True) -> list[str]:
        """``python -m module args`` on this machine, under torchrun with ``procs`` processes where the command
        is distributed (inference)."""
        procs = self.pc.procs if distributed else 1
        launcher = "python" if procs == 1 else "torchrun"
        return launch_command(launcher, procs, [module, *args], module=True)

    def _train(self, key: str, title: str, config: str, run: Path, overrides: list[str], inputs: list[str]) -> Stage:
        config = stage_config_path(config)
        cfg = load_config(config, overrides)  # a bad stage config fails here, before anything runs
        entry = [str(TRAIN_ENTRY), "--config", config, "--run-dir", str(run), "--resume", "auto", *overrides]
        return Stage(
            key,
            f"{title} ({self.pc.launcher}, {self.pc.procs} process{'es' if self.pc.procs > 1 else ''})",
            launch_command(self.pc.launcher, self.pc.procs, entry),
            # Not the launcher's free port: the resolved config and how many processes share the batch.
            settings={"launcher": self.pc.launcher, "procs": self.pc.procs, "entry": entry, "config": cfg.to_dict()},
            inputs=inputs,
            outputs=[run],  # a stale checkpoint must not be resumed
            complete=(run / "model.safetensors").exists,
            env=self.env,
            where=run,
        )

    def _evaluate(self, key: str, title: str, store: Path, shards: str, out: Path, inputs: list[str]) -> Stage:
        return Stage(
            key,
            title,
            [self.py, "-m", "puzzlecam.evaluate", "--cams", str(store), "--shards", shards, "--out", str(out)],
            inputs=inputs,
            outputs=[out],
            complete=(out / "summary.json").exists,
            result=lambda: _summary_of(out / "summary.json"),
            where=out,
        )

    def _infer(self, key: str, title: str, weights: Path, shards: str, out: Path, inputs: list[str]) -> Stage:
        cmd = self._module(
            "puzzlecam.infer", "--weights", str(weights), "--shards", shards, "--out", str(out), *self._device()
        )
        return Stage(
            key,
            title,
            cmd,
            settings=cmd[cmd.index("puzzlecam.infer") :] + [f"procs={self.pc.procs}"],
            inputs=inputs,
            outputs=[out],  # inference skips the images already in its store
            complete=(out / "index.parquet").exists,
            env=self.env,
            where=out,
        )

    def _rw(self, key: str, title: str, cams: Path, shards: str, out: Path, inputs: list[str]) -> Stage:
        rw = self.pc.random_walk
        weights = self.dirs["affinity"] / "model.safetensors"
        args = ["--weights", str(weights), "--cams", str(cams), "--shards", shards, "--out", str(out)]
        args += ["--beta", str(rw.beta), "--exp-times", str(rw.exp_times), *self._device()]
        cmd = self._module("puzzlecam.rw", *args)
        return Stage(
            key,
            title,
            cmd,
            settings=cmd[cmd.index("puzzlecam.rw") :] + [f"procs={self.pc.procs}"],
            inputs=inputs,
            outputs=[out],
            complete=(out / "index.parquet").exists,
            env=self.env,
            where=out,
        )

    def _label_shards(self, key: str, title: str, labels: Path, out: Path, inputs: list[str]) -> Stage:
        cmd = [self.py, "-m", "puzzlecam.data", "label-shards", "--shards", self.pc.data.train]
        cmd += ["--labels", str(labels), "--out", str(out), "--overwrite"]
        return Stage(key, title, cmd, inputs=inputs, complete=lambda: any(out.glob("*.tar")), where=out)

    def _later_backbone(self) -> str:
        m = self.pc.model
        if m.later_stages_from == "classifier":
            return str(self.dirs["classifier"] / "model.safetensors")
        return str(m.pretrained)

    def _rw_threshold(self) -> str:
        t = self.pc.pseudo_labels.threshold
        if t is not None:
            return f"{t:g}"
        summary = self.dirs["affinity"] / "rw_eval" / "summary.json"
        if summary.is_file():
            return f"{json.loads(summary.read_text())['best_threshold']:g}"
        return "BEST_RW_THRESHOLD"  # --print-only before the rw evaluation has run

    # -- the stages --------------------------------------------------------------------------------
    def stage_builders(self) -> list[tuple[str, Callable[[], Stage]]]:
        pc, d, dirs = self.pc, self.pc.data, self.dirs
        cls_dir, aff_dir, seg_dir = dirs["classifier"], dirs["affinity"], dirs["segmentation"]
        cams_train, cams_eval = cls_dir / "cams_train", cls_dir / "cams_eval"
        cam_eval_dir = cls_dir / "cam_eval"
        aff_labels, aff_shards = self.out / "affinity_labels", self.out / "shards_affinity"
        rw_train, rw_eval, rw_eval_dir = aff_dir / "rw_train", aff_dir / "rw_eval_maps", aff_dir / "rw_eval"
        pseudo, pseudo_shards = self.out / "pseudo_labels", self.out / "shards_pseudo"
        seg_val, seg_val_eval, seg_test = seg_dir / "seg_eval_png", seg_dir / "seg_eval", seg_dir / "seg_test"
        model = [f"model.arch={pc.model.arch}", f"model.width={pc.model.width}"]
        weights = seg_dir / ("model.safetensors" if pc.segment.weights == "last" else "model_best.safetensors")
        a = pc.affinity_labels

        def classifier() -> Stage:
            pretrained = [f"model.pretrained={pc.model.pretrained}"] if pc.model.pretrained else []
            overrides = [f"data.train_shards={d.train}", *model, *pretrained, *pc.configs.classifier_set]
            return self._train(
                "train_classifier", "train the classifier", pc.configs.classifier, cls_dir, overrides, []
            )

        def affinity_labels() -> Stage:
            args = ["--affinity", "--cams", str(cams_train), "--shards", d.train, "--out", str(aff_labels)]
            args += ["--threshold", f"{a.fg_threshold:g}", "--bg-threshold", f"{a.bg_threshold:g}"]
            args += ["--crf" if a.crf else "--no-crf", "--jobs", str(max(1, os.cpu_count() or 1))]
            return Stage(
                "affinity_labels",
                f"affinity labels (foreground {a.fg_threshold:g}, background {a.bg_threshold:g}, CRF {a.crf})",
                [self.py, "-m", "puzzlecam.labels", *args],
                inputs=["cams_train"],
                outputs=[aff_labels],
                complete=lambda: any(aff_labels.glob("*.png")),
                where=aff_labels,
            )

        def affinity() -> Stage:
            overrides = [f"data.train_shards={aff_shards / '*.tar'}", *model]
            overrides += [f"model.pretrained={self._later_backbone()}", *pc.configs.affinity_set]
            return self._train(
                "train_affinity", "train AffinityNet", pc.configs.affinity, aff_dir, overrides, ["affinity_shards"]
            )

        def pseudo_labels() -> Stage:
            p = pc.pseudo_labels
            args = ["--cams", str(rw_train), "--shards", d.train, "--out", str(pseudo)]
            args += ["--threshold", self._rw_threshold()]
            args += ["--crf", "--crf-iters", str(p.crf_iters)] if p.crf_iters > 0 else ["--no-crf"]
            args += ["--jobs", str(max(1, os.cpu_count() or 1))]
            return Stage(
                "pseudo_labels",
                "pseudo-labels from the random walk",
                [self.py, "-m", "puzzlecam.labels", *args],
                inputs=["rw_train", "eval_rw"],
                outputs=[pseudo],
                complete=lambda: any(pseudo.glob("*.png")),
                where=pseudo,
            )

        def segmentation() -> Stage:
            overrides = [f"data.train_shards={pseudo_shards / '*.tar'}", f"data.eval_shards={d.seg_eval}", *model]
            overrides += [f"model.pretrained={self._later_backbone()}", "segmentation.labels=label"]
            overrides += pc.configs.segmentation_set
            return self._train(
                "train_segmentation",
                "train DeepLabv3+",
                pc.configs.segmentation,
                seg_dir,
                overrides,
                ["pseudo_shards"],
            )

        def segment(key: str, shards: str, out: Path, submission: bool) -> Stage:
            args = ["--weights", str(weights), "--shards", shards, "--out", str(out), *self._device()]
            args += ["--scales", ",".join(f"{x:g}" for x in pc.segment.scales)]
            args += ["--crf"] if pc.segment.crf else []
            args += ["--submission"] if submission else []
            cmd = self._module("puzzlecam.segment", *args)
            return Stage(
                key,
                f"segmentation of {'the test split (submission files)' if submission else 'the evaluation split'}",
                cmd,
                settings=cmd[cmd.index("puzzlecam.segment") :] + [f"procs={self.pc.procs}"],
                inputs=["train_segmentation"],
                outputs=[out],
                complete=(out / "segment.json").exists,  # written when every image is done
                env=self.env,
                where=out,
            )

        def evaluate_segmentation() -> Stage:
            cmd = [self.py, "-m", "puzzlecam.evaluate", "--mode", "labels", "--labels", str(seg_val)]
            cmd += ["--shards", d.seg_eval, "--out", str(seg_val_eval)]
            return Stage(
                "eval_segmentation",
                "evaluation of the segmentation",
                cmd,
                inputs=["segment_eval"],
                outputs=[seg_val_eval],
                complete=(seg_val_eval / "summary.json").exists,
                result=lambda: _summary_of(seg_val_eval / "summary.json"),
                where=seg_val_eval,
            )

        classifier_weights = cls_dir / "model.safetensors"
        builders: list[tuple[str, Callable[[], Stage]]] = [
            ("train_classifier", classifier),
            (
                "cams_eval",
                lambda: self._infer(
                    "cams_eval",
                    "CAMs of the masked evaluation split",
                    classifier_weights,
                    d.cam_eval,
                    cams_eval,
                    ["train_classifier"],
                ),
            ),
            (
                "eval_cams",
                lambda: self._evaluate(
                    "eval_cams",
                    "threshold-sweep evaluation of the CAMs",
                    cams_eval,
                    d.cam_eval,
                    cam_eval_dir,
                    ["cams_eval"],
                ),
            ),
            (
                "cams_train",
                lambda: self._infer(
                    "cams_train",
                    "CAMs of the training images",
                    classifier_weights,
                    d.train,
                    cams_train,
                    ["train_classifier"],
                ),
            ),
            ("affinity_labels", affinity_labels),
            (
                "affinity_shards",
                lambda: self._label_shards(
                    "affinity_shards",
                    "training shards with the affinity labels",
                    aff_labels,
                    aff_shards,
                    ["affinity_labels"],
                ),
            ),
            ("train_affinity", affinity),
            (
                "rw_eval",
                lambda: self._rw(
                    "rw_eval",
                    "random walk of the evaluation CAMs",
                    cams_eval,
                    d.cam_eval,
                    rw_eval,
                    ["train_affinity", "cams_eval"],
                ),
            ),
            (
                "eval_rw",
                lambda: self._evaluate(
                    "eval_rw",
                    "threshold-sweep evaluation of the random walk",
                    rw_eval,
                    d.cam_eval,
                    rw_eval_dir,
                    ["rw_eval"],
                ),
            ),
            (
                "rw_train",
                lambda: self._rw(
                    "rw_train",
                    "random walk of the training CAMs",
                    cams_train,
                    d.train,
                    rw_train,
                    ["train_affinity", "cams_train"],
                ),
            ),
            ("pseudo_labels", pseudo_labels),
            (
                "pseudo_shards",
                lambda: self._label_shards(
                    "pseudo_shards",
                    "training shards with the pseudo-labels",
                    pseudo,
                    pseudo_shards,
                    ["pseudo_labels"],
                ),
            ),
            ("train_segmentation", segmentation),
            ("segment_eval", lambda: segment("segment_eval", d.seg_eval, seg_val, False)),
            ("eval_segmentation", evaluate_segmentation),
        ]
        if d.seg_test:
            builders.append(("segment_test", lambda: segment("segment_test", d.seg_test, seg_test, True)))
        return builders

    def stage_keys(self) -> list[str]:
        keys = [key for key, _ in self.stage_builders()]
        if self.until is not None:
            if self.until not in keys:
                raise UsageError(f"until {self.until!r}: not a stage of this pipeline; the stages: {', '.join(keys)}")
            keys = keys[: keys.index(self.until) + 1]
        return keys

    def _in_record(self, stage: Stage) -> Stage:
        """The stage under its key in the (possibly shared) record: prefixed, and depending on the data stages."""
        stage.key = self.key_prefix + stage.key
        stage.inputs = [self.key_prefix + k for k in stage.inputs] + list(self.data_inputs)
        return stage

    def run(self, rerun: str | None = None, adopt: tuple[str, ...] = ()) -> list[dict]:
        """Run (or with ``print_only`` print) every stage in order; the summary rows."""
        stages = self.stages if self.stages is not None else Stages(self.out)
        keys = self.stage_keys()
        builders = [(key, build) for key, build in self.stage_builders() if key in keys]
        for _, build in builders:  # every stage config checked before anything runs (a stage builds just in time)
            build()
        if rerun is not None:
            if rerun not in keys:
                raise UsageError(f"--rerun {rerun!r}: not a stage of this pipeline; the stages: {', '.join(keys)}")
            if not self.print_only:
                stages.forget([self.key_prefix + k for k in keys[keys.index(rerun) :]])
        for key in adopt:
            if key not in keys:
                raise UsageError(f"--adopt {key!r}: not a stage of this pipeline; the stages: {', '.join(keys)}")
        rows = []
        for key, build in builders:
            stage = self._in_record(build())
            if self.print_only:
                state = "done (would be reused)" if stages.reusable(stage) else "to run"
                console.print(f"# {stage.key}: {stage.title} [{state}]", markup=False, highlight=False)
                console.print(shlex.join(stage.cmd), markup=False, highlight=False, soft_wrap=True)
                continue
            if key in adopt and not stages.reusable(stage):
                stages.adopt(stage)
            seconds = stages.run(stage)
            record = stages.records.get(stage.key, {})
            row = {
                "stage": key,
                "ran": seconds is not None,
                "seconds": record.get("seconds"),
                "outputs": str(stage.where) if stage.where else None,
                "command": record.get("command"),
            }
            if stage.result is not None:
                row.update(stage.result())
            rows.append(row)
        if not self.print_only:
            atomic_write_json(self.out / SUMMARY, {"name": self.pc.name, "stages": rows})
        return rows


def print_summary(rows: list[dict], out: Path) -> None:
    table = Table(title=f"pipeline summary ({out / SUMMARY})")
    for col in ("stage", "seconds", "mIoU %", "threshold"):
        table.add_column(col)
    table.add_column("outputs", overflow="fold")
    for r in rows:
        miou = f"{100 * r['miou']:.1f}" if r.get("miou") is not None else ""
        threshold = f"{r['threshold']:.2f}" if r.get("threshold") is not None else ""
        seconds = f"{r['seconds']:.0f}" if r.get("seconds") is not None else ""
        where = str(Path(r["outputs"]).relative_to(out)) if r.get("outputs") else ""
        table.add_row(r["stage"], seconds, miou, threshold, where)
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m puzzlecam.pipeline",
        description="The whole pipeline in order (docs/pipeline.md): classifier -> CAMs -> evaluation -> affinity "
        "labels -> AffinityNet -> random walk -> evaluation -> pseudo-labels -> DeepLabv3+ -> segmentation -> "
        "evaluation. Each stage prints the command it runs; a finished stage is reused on a rerun, an interrupted "
        "one resumes.",
    )
    p.add_argument("--config", required=True, help="pipeline config (launch/configs/pipeline_*.yaml)")
    p.add_argument("--out", required=True, help="run directory: every stage's output, stages.json and summary.json")
    p.add_argument(
        "--print-only",
        action="store_true",
        help="print every stage's command (and whether a rerun would reuse it) and run nothing",
    )
    p.add_argument(
        "--rerun",
        metavar="STAGE",
        default=None,
        help="run this stage and every later one again, even where their settings are unchanged",
    )
    p.add_argument(
        "--adopt",
        metavar="STAGE",
        action="append",
        default=[],
        help="take this stage's output as made with the current settings (its command run by hand, e.g. on a "
        "cluster) instead of running it; repeatable",
    )
    p.add_argument(
        "--until",
        metavar="STAGE",
        default=None,
        help="stop after this stage (e.g. eval_cams: stage 1 only; eval_rw: stages 1 and 2)",
    )
    return p


def run(args: argparse.Namespace) -> None:
    pc = load_pipeline_config(args.config)
    out = Path(args.out).resolve()
    pipeline = Pipeline(pc, out, print_only=args.print_only, until=args.until)
    rows = pipeline.run(rerun=args.rerun, adopt=tuple(args.adopt))
    if not args.print_only:
        print_summary(rows, out)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
