"""Benchmarks: ``python -m puzzlecam.bench {kernels,data,eval,train} [--help]``.

Each subcommand lives in its own module with a ``main(argv)`` function.
"""
