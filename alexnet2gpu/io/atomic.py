"""Writing files so that a crash or Ctrl-C never leaves a half-written one: the files that
alexnet2gpu writes whole (checkpoints and their sidecars, reports, JSON, plots, the
training curves) go through :func:`write_atomic` or :func:`write_all_atomic`.

What does not, and why:

* the training metrics JSONL (:mod:`alexnet2gpu.train.metrics`) is *appended* to, one
  line per step, flushed at once: rewriting the whole file atomically after every step
  would cost time that grows with the run, and a crash can cut at most the last line,
  which a reader skips;
* the CUDA memory snapshot is written by ``torch.cuda.memory._dump_snapshot``, which
  takes a path, not a file object: :mod:`alexnet2gpu.measure.memory` gives it a temporary
  name and renames it itself, atomic in the same way but without the fsync.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

__all__ = ["write_atomic", "write_all_atomic", "fsync_directory"]


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object], mode: int = 0o644) -> Path:
    """Calls ``write(file)`` on a temporary file beside ``path``, fsyncs it and moves it into
    place with ``os.replace``: readers see the old file or the whole new one, never a part.
    On any failure the temporary file is removed and the old file is left as it was."""
    return write_all_atomic({path: write}, mode)[0]


def write_all_atomic(writes: Mapping[str | os.PathLike, Callable[[BinaryIO], object]], mode: int = 0o644) -> list[Path]:
    """:func:`write_atomic` for several files that belong together (a report and its
    plots): every file is written and fsynced under a temporary name first, and only then
    are they moved into place, so an interruption while writing leaves all the previous
    files as they were."""
    temps: dict[Path, str] = {}
    try:
        for path, write in writes.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps[path] = tmp
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)  # mkstemp creates files readable by their owner alone
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)
    return list(temps)


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
