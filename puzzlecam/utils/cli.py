"""The wrapper every command runs through: one way to parse, log, fail and exit.

``sys.exit(run_command(build_parser(), run, argv))``:

* adds ``--log-level`` to the parser (and to every subcommand) and sets up logging (:mod:`puzzlecam.utils.log`);
* bad usage: argparse exits 2 with its usage line; a :class:`~puzzlecam.errors.UsageError` (a bad
  flag value, config key or input file) prints ``error: ...`` and exits 2;
* a failed run (:class:`~puzzlecam.errors.RunError`, or an OS error such as a full disk) prints
  ``error: ...`` and exits 1; Ctrl-C exits 130;
* anything else is a bug: its traceback is shown (exit 1);
* the process group, if the command started one, is left on the way out.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from puzzlecam.errors import PuzzleCamError
from puzzlecam.utils.files import disk_problem
from puzzlecam.utils.limits import max_image_pixels
from puzzlecam.utils.log import add_log_level_argument, setup_logging

log = logging.getLogger("puzzlecam.cli")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _has_option(parser: argparse.ArgumentParser, option: str) -> bool:
    return any(option in action.option_strings for action in parser._actions)


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` on the parser and after every subcommand (``cmd sub --log-level debug``)."""
    if not _has_option(parser, "--log-level"):
        add_log_level_argument(parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not _has_option(sub, "--log-level"):
                    add_log_level_argument(sub, default=argparse.SUPPRESS)


def run_command(
    parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int | None], argv: list[str] | None = None
) -> int:
    """Parse ``argv``, call ``run(args)`` and turn its outcome into an exit status (see the module doc)."""
    _add_log_level(parser)
    # Flags may follow the positional KEY=VALUE overrides (argparse cannot intermix with subcommands).
    has_subcommands = any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
    args = parser.parse_args(argv) if has_subcommands else parser.parse_intermixed_args(argv)
    try:
        setup_logging(args.log_level)
        max_image_pixels()  # a bad $PUZZLECAM_MAX_IMAGE_PIXELS is bad usage, before any work (not a corrupt sample)
        status = run(args)
        return EXIT_OK if status is None else int(status)
    except PuzzleCamError as e:
        log.error("%s", e)
        return e.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_INTERRUPTED
    except OSError as e:  # a full disk, a permission, a vanished file: the message names the path
        problem = disk_problem(e.filename, e) if e.filename else None
        log.error("%s", problem or e)
        return EXIT_FAILED
    finally:
        from puzzlecam.utils.distributed import shutdown

        shutdown()
