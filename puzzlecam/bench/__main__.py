"""Dispatch ``python -m puzzlecam.bench SUBCOMMAND ...`` to ``puzzlecam.bench.SUBCOMMAND.main``."""

import importlib
import sys

SUBCOMMANDS = {
    "kernels": "fused-kernel speed and memory against the torch reference (every backend checked first)",
    "data": "training-pipeline images/s from shards against a per-file folder loader",
    "eval": "one-pass threshold-sweep evaluation against a per-threshold loop",
    "train": "full Puzzle-CAM step: reference mode against fast mode",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print("usage: python -m puzzlecam.bench {" + ",".join(SUBCOMMANDS) + "} [--help] [options]\n")
        for name, what in SUBCOMMANDS.items():
            print(f"  {name:8s} {what}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown benchmark {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(f"puzzlecam.bench.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
