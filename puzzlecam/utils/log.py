"""Logging: library messages go to the ``puzzlecam`` logger; commands set it up once, rank-aware.

Modules log with ``log = logging.getLogger(__name__)`` and never print. :func:`setup_logging`
(called by :func:`puzzlecam.utils.cli.run_command`) sends the ``puzzlecam`` logger to stderr:

* rank 0 logs at the chosen level (``--log-level``, else ``$PUZZLECAM_LOG_LEVEL``, else ``info``);
* other ranks log warnings and errors only, prefixed with their rank, unless
  ``$PUZZLECAM_LOG_ALL_RANKS=1`` (then every rank logs at the chosen level);
* warnings and errors are prefixed ``warning:`` / ``error:``; info lines are the bare message.

A command's own report (a table, a summary) is its output, written to stdout, not logged.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "puzzlecam"
LEVELS = ("debug", "info", "warning", "error")
LEVEL_ENV = "PUZZLECAM_LOG_LEVEL"
ALL_RANKS_ENV = "PUZZLECAM_LOG_ALL_RANKS"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test capture and redirection keep working)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # logging.StreamHandler.__init__ assigns it; the property always reads sys.stderr
        pass


class _Formatter(logging.Formatter):
    def __init__(self, rank: int):
        super().__init__()
        self.prefix = f"[rank {rank}] " if rank else ""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.ERROR:
            text = f"error: {text}"
        elif record.levelno >= logging.WARNING:
            text = f"warning: {text}"
        return self.prefix + text


def _env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def resolve_level(level: str | int | None) -> int:
    """``debug | info | warning | error`` (any case) or a logging level number; None reads the environment."""
    if level is None:
        level = os.environ.get(LEVEL_ENV) or "info"
    if isinstance(level, int):
        return level
    name = str(level).strip().lower()
    if name not in LEVELS:
        from puzzlecam.errors import UsageError

        raise UsageError(f"log level {level!r} is not one of {', '.join(LEVELS)} (--log-level / ${LEVEL_ENV})")
    return getattr(logging, name.upper())


def setup_logging(level: str | int | None = None, rank: int | None = None) -> logging.Logger:
    """Send the ``puzzlecam`` logger to stderr at ``level`` (see the module docstring); idempotent."""
    rank = _env_rank() if rank is None else rank
    chosen = resolve_level(level)
    if rank != 0 and os.environ.get(ALL_RANKS_ENV, "0") != "1":
        chosen = max(chosen, logging.WARNING)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter(rank))
    # A module run as `python -m puzzlecam.X` logs as "__main__": it gets the same handler.
    for name in (LOGGER_NAME, "__main__"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(chosen)
        logger.propagate = False
    return logging.getLogger(LOGGER_NAME)


def add_log_level_argument(parser, default=None) -> None:
    """The ``--log-level`` flag every command takes (``default=argparse.SUPPRESS`` on a subcommand's
    parser, so that a value given before the subcommand is not overwritten)."""
    parser.add_argument(
        "--log-level",
        choices=LEVELS,
        default=default,
        help=f"messages shown: debug, info (default; ${LEVEL_ENV} sets another), warning or error. "
        f"Ranks other than 0 show warnings and errors only (${ALL_RANKS_ENV}=1 shows every rank's)",
    )
