"""Every error puzzlecam raises on purpose, under one base class.

:class:`PuzzleCamError` carries the exit status a command returns for it (:mod:`puzzlecam.utils.cli`):

* :class:`UsageError` (exit 2): bad usage, config or input -- a flag, config key, file or value that is
  not what was expected. The message names it and says what was expected.
* :class:`RunError` (exit 1): a run that was set up correctly but failed (diverged training, replicas
  out of sync, a pipeline stage that exited with an error).

The specific classes keep their historical builtin bases too (``ConfigError`` is still a
``ValueError``), so ``except ValueError`` around library calls keeps working.
"""

from __future__ import annotations


class PuzzleCamError(Exception):
    """Base class of puzzlecam's errors; ``exit_code`` is the status a command exits with."""

    exit_code = 1


class UsageError(PuzzleCamError):
    """Bad usage, config or input; the message names the flag, key or file and what was expected."""

    exit_code = 2


class RunError(PuzzleCamError):
    """A correctly set-up run that failed; the message says why and what is left to resume from."""

    exit_code = 1


# ---------------------------------------------------------------------------------------------
# Usage / input errors (exit 2)


class ConfigError(UsageError, ValueError):
    """A bad config file, key or value; the message names the key and what was expected."""


class DataError(UsageError):
    """A missing or unreadable data-set input file; the message names the image id and the path."""


class ShardError(UsageError, ValueError):
    """Shards that cannot be used at all (none matched, missing, unreadable); raised before any work."""


class CamStoreError(UsageError, ValueError):
    """A CAM file that is missing, unreadable or malformed; the message names the image id."""


class PretrainedMismatchError(UsageError, ValueError):
    """A pretrained weight file whose keys or shapes do not fit the backbone."""


class InferenceError(UsageError, ValueError):
    """Bad inference input (weights, config, flags, output directory); the message names it."""


class AffinityInputError(UsageError, ValueError):
    """Tensors of the wrong shape, dtype or range for the affinity ops (puzzlecam.affinity, puzzlecam.ops);
    the message names the shapes."""


class EvaluationError(UsageError, ValueError):
    """Bad evaluation input (missing CAMs, shape mismatch, bad labels); names the image ids."""


class LabelsError(UsageError, ValueError):
    """Bad input for pseudo-label generation; names the image id or flag."""


# ---------------------------------------------------------------------------------------------
# Run failures (exit 1)


class TrainingError(RunError, RuntimeError):
    """A training run that cannot go on (too many bad steps, replicas out of sync); says why."""


class StageError(RunError, RuntimeError):
    """A stage of the pipeline or the demo that failed; names the stage and its log."""


class DiskError(RunError, OSError):
    """A write that failed because the disk is full, over quota or read-only; names the device and path."""


# ---------------------------------------------------------------------------------------------
# Internal control flow


class CorruptSample(PuzzleCamError):
    """One sample that cannot be decoded; the loaders skip and count it (never reaches a command)."""
