"""Benchmarks: ``python -m puzzlecam.bench {kernels,data,eval,train,rw,segment} [--help]``.

Each subcommand lives in its own module whose ``main(argv)`` runs through
:func:`puzzlecam.utils.cli.run_command`: figures are printed to stdout, status messages logged.
"""
