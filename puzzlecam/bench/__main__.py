"""Dispatch ``python -m puzzlecam.bench SUBCOMMAND ...`` to ``puzzlecam.bench.SUBCOMMAND.main``.

Each subcommand's ``main`` runs through :func:`puzzlecam.utils.cli.run_command` (its own flags,
``--log-level`` among them, and exit status); only the chosen module is imported.
"""

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "kernels": "fused-kernel speed and memory against the torch reference (every backend checked first)",
    "data": "training-pipeline images/s from shards against a per-file folder loader",
    "eval": "one-pass threshold-sweep evaluation against a per-threshold loop",
    "train": "full Puzzle-CAM step: reference mode against fast mode",
    "rw": "random walk per backend against the dense hw x hw method, and the fused affinity loss",
    "segment": "multi-scale + flip DeepLabv3+ inference: one forward per pass against batched / bf16 / channels_last",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m puzzlecam.bench",
        usage="python -m puzzlecam.bench {" + ",".join(SUBCOMMANDS) + "} [--help] [options]",
        description="benchmarks:\n" + "\n".join(f"  {name:8s} {what}" for name, what in SUBCOMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("benchmark", choices=SUBCOMMANDS, metavar="BENCHMARK", help="one of the benchmarks above")
    p.add_argument(
        "options", nargs=argparse.REMAINDER, help="the benchmark's own options (python -m puzzlecam.bench NAME --help)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    module = importlib.import_module(f"puzzlecam.bench.{args.benchmark}")
    return module.main(args.options)


if __name__ == "__main__":
    sys.exit(main())
