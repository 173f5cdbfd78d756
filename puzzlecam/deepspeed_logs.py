"""DeepSpeed's own log lines (its ``DeepSpeed`` logger) go to ``{run_dir}/deepspeed.log``, and to the
console only at ``--log-level debug`` (docs/training.md, "DeepSpeed's log lines").

DeepSpeed gives its logger a handler on stdout when it is imported, and logs its first line (the
accelerator it picked) during that import. :class:`DeepSpeedLogs` imports it with that line held back,
replaces the handler, keeps DeepSpeed's INFO and WARNING lines in memory until the run directory is
set up (nothing is written there before a resume is accepted), then appends them, and every later
one, to ``deepspeed.log``. Errors always reach the console too. Every rank appends to the same file;
lines of ranks other than 0 start ``[rank R]``. The ``deepspeed`` launcher's own lines (runner.py,
launch.py) are printed by another process before this one starts: they are not routed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from pathlib import Path

LOGGER_NAME = "DeepSpeed"
FILE_NAME = "deepspeed.log"
# DeepSpeed's own format, so that its lines read as they do elsewhere.
_FORMAT = "[%(asctime)s] [%(levelname)s] [%(filename)s:%(lineno)d:%(funcName)s] %(message)s"


class _Routed:
    """Marks the handlers this module installs (replaced, not stacked, when a process routes again)."""


class _Console(_Routed, logging.StreamHandler):
    """stderr as it is at the time of each line (test capture and redirection keep working)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it
        pass


class _Pending(_Routed, logging.Handler):
    """Formatted lines held until the run directory exists."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class _File(_Routed, logging.FileHandler):
    pass


class DeepSpeedLogs:
    """Route the ``DeepSpeed`` logger of this process (see the module doc); make it before DeepSpeed is
    imported, so that its import-time line is caught too."""

    def __init__(self, rank: int, console: bool):
        self.prefix = f"[rank {rank}] " if rank else ""
        early = io.StringIO()
        if "deepspeed" not in sys.modules:
            with contextlib.redirect_stdout(early):  # the handler DeepSpeed makes now writes here
                import deepspeed  # noqa: F401
        self.logger = logging.getLogger(LOGGER_NAME)
        for handler in list(self.logger.handlers):
            self.logger.removeHandler(handler)
            if isinstance(handler, _Routed):
                handler.close()
        self.logger.setLevel(logging.DEBUG if console else logging.INFO)
        self.logger.propagate = False
        self.pending = self._formatted(_Pending())
        self.pending.lines += [self.prefix + line for line in early.getvalue().splitlines() if line.strip()]
        self.logger.addHandler(self.pending)
        shown = self._formatted(_Console())
        shown.setLevel(logging.DEBUG if console else logging.ERROR)
        if console:
            for line in self.pending.lines:
                print(line, file=sys.stderr)
        self.logger.addHandler(shown)

    def _formatted(self, handler: logging.Handler) -> logging.Handler:
        handler.setFormatter(logging.Formatter(self.prefix + _FORMAT))
        return handler

    def to_file(self, run_dir: str | Path) -> Path:
        """From now on into ``{run_dir}/deepspeed.log`` (appended), the lines held so far first."""
        path = Path(run_dir) / FILE_NAME
        file = self._formatted(_File(path, mode="a", encoding="utf-8"))
        for line in self.pending.lines:  # a line per write: ranks append to the same file
            file.stream.write(line + "\n")
            file.flush()
        self.logger.removeHandler(self.pending)
        self.pending.lines.clear()
        self.logger.addHandler(file)
        return path
