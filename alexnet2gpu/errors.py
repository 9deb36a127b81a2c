"""Errors a user can act on. The command line prints them as one line, no traceback."""

from __future__ import annotations

__all__ = ["ConfigError", "Alexnet2gpuError", "CheckpointError", "DataError", "EXIT_USAGE", "EXIT_FAILURE"]

EXIT_FAILURE = 1  # the job ran and failed (a mismatch, a crashed rank, a bad file)
EXIT_USAGE = 2  # bad flags or arguments, as argparse does


class Alexnet2gpuError(Exception):
    """A failure with a message meant for the user; ``exit_code`` is what the CLI returns."""

    exit_code = EXIT_FAILURE


class ConfigError(Alexnet2gpuError, ValueError):
    """A bad setting: a model, placement, size, device list or flag that cannot work.
    The message names the value and what would work."""

    exit_code = EXIT_USAGE


class DataError(Alexnet2gpuError):
    """A data file or image folder that cannot be read: the message names the file and
    what is wrong with it."""


class CheckpointError(Alexnet2gpuError):
    """A checkpoint that is refused (truncated, corrupt, unverified or unsafe): the message
    names the file and why. A refused checkpoint is never loaded another way."""
