"""Writing files so that a crash or Ctrl-C never leaves a half-written one: everything that
alexnet2gpu saves (checkpoints, reports, plots) goes through :func:`write_atomic`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["write_atomic", "fsync_directory"]


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object], mode: int = 0o644) -> Path:
    """Calls ``write(file)`` on a temporary file beside ``path``, fsyncs it and moves it into
    place with ``os.replace``: readers see the old file or the whole new one, never a part.
    On any failure the temporary file is removed and the old file is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp creates files readable by their owner alone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def fsync_directory(directory: str | os.PathLike) -> None:
    """Makes the renames inside ``directory`` durable (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
