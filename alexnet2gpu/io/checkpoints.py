"""Checkpoints that survive a crash and refuse hostile or damaged files.

    save_checkpoint(path, state)                  one file, atomically, with a sha256 sidecar
    load_checkpoint(path, map_location="cpu")     verify the sidecar, then weights_only load
    checkpoint_path(directory, step)              DIR/step-00000100.pt
    save_in_directory(directory, step, state, keep=3)   save, then keep the newest ``keep``
    newest_checkpoint(directory)                  the newest *valid* checkpoint, for --resume

Writing. ``torch.save`` goes to a temporary file in the same folder, which is flushed,
fsync'ed and moved into place with ``os.replace`` (atomic on POSIX); then its sha256 is
written the same way to ``<file>.sha256`` in ``sha256sum`` format (``sha256sum -c`` checks
it). Each step has its own file name, and the sidecar is written last, so a crash at any
point leaves either a complete new checkpoint or a new file without a sidecar, which
:func:`newest_checkpoint` skips: the previous checkpoint stays loadable. Old checkpoints
are pruned only after the new one is complete.

Loading. The sha256 is checked before anything is unpickled (``torch.load`` itself does not
notice a flipped byte inside a tensor), then ``torch.load(weights_only=True)`` refuses any
pickle that would import or call code. A refused file raises
:class:`~alexnet2gpu.errors.CheckpointError`; there is no fallback to unsafe loading.

What goes into a checkpoint is the training loop's business (:mod:`alexnet2gpu.train.checkpointing`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from .atomic import fsync_directory, write_atomic

__all__ = [
    "CHECKPOINT_FORMAT",
    "checkpoint_path",
    "load_checkpoint",
    "newest_checkpoint",
    "save_checkpoint",
    "save_in_directory",
    "verify_checkpoint",
]

log = logging.getLogger(__name__)

# The layout of a training checkpoint's dict (train.checkpointing writes it, checks.evaluate
# reads it): bumped when a key changes meaning.
CHECKPOINT_FORMAT = 1
SIDECAR_SUFFIX = ".sha256"
_NAME = re.compile(r"^step-(\d+)\.pt$")
_CHUNK = 1 << 20


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Saves ``state`` (tensors, numbers, strings, lists, dicts: what ``weights_only``
    loading accepts) to ``path`` atomically, then its sha256 to ``<path>.sha256``.
    A failed write (a full disk, a read-only folder) raises :class:`CheckpointError` and
    leaves no partial file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: torch.save(state, f))
        line = f"{_sha256_of(path)}  {path.name}\n"
        write_atomic(_sidecar(path), lambda f: f.write(line.encode()))
    except OSError as error:  # a full disk, a read-only folder: the previous checkpoints are untouched
        raise CheckpointError(f"cannot write checkpoint {path}: {error.strerror or error}") from None
    fsync_directory(path.parent)
    return path


def verify_checkpoint(path: str | os.PathLike) -> Path:
    """Checks that ``path`` exists and matches its sha256 sidecar; raises
    :class:`CheckpointError` (or :class:`ConfigError` for a missing file) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        raise CheckpointError(
            f"checkpoint {path} has no sha256 file {sidecar.name}: refusing to load an "
            f"unverified checkpoint (it may be incomplete)"
        )
    fields = sidecar.read_text(errors="replace").split()
    if not fields or not re.fullmatch(r"[0-9a-f]{64}", fields[0]):
        raise CheckpointError(f"checkpoint {path}: {sidecar.name} does not hold a sha256 digest")
    actual = _sha256_of(path)
    if actual != fields[0]:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or was modified: its sha256 is {actual[:12]}..., "
            f"{sidecar.name} says {fields[0][:12]}..."
        )
    return path


def _refusal_reason(error: Exception) -> str:
    """The one informative line of torch's long weights_only message."""
    match = re.search(r"(Trying to load unsupported GLOBAL [^\n]*|Unsupported [^\n]*)", str(error))
    return match.group(1).strip() if match else "it holds objects that weights_only loading does not allow"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verifies ``path`` against its sidecar, then loads it with ``weights_only=True``.
    Raises :class:`CheckpointError` for a file that is truncated, corrupt, unverified or
    that would run code; never loads it any other way."""
    path = verify_checkpoint(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # protocol notes from the unpickler
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"checkpoint {path} refused: {_refusal_reason(error)} (only tensors and plain "
            f"containers are loaded; there is no unsafe fallback)"
        ) from None
    except Exception as error:  # zip reader errors, EOFError on a truncated pickle
        first_line = str(error).strip().split("\n")[0].split(". ")[0][:200] or type(error).__name__
        raise CheckpointError(f"checkpoint {path} is not a readable torch checkpoint: {first_line}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict of state")
    return state


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """The file name used for the checkpoint at ``step``: ``DIR/step-00000100.pt``."""
    return Path(directory) / f"step-{step:08d}.pt"


def _checkpoints_by_step(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for entry in directory.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found, reverse=True)


def newest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint in ``directory`` (highest step) whose sha256 matches;
    damaged or incomplete ones are skipped with a warning. ``None`` when the folder holds
    no checkpoint; :class:`CheckpointError` when it holds some but none is valid."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"checkpoint folder {directory} does not exist")
    candidates = _checkpoints_by_step(directory)
    problems = []
    for _, path in candidates:
        try:
            return verify_checkpoint(path)
        except CheckpointError as error:
            log.warning("skipping %s", error)
            problems.append(str(error))
    if candidates:
        raise CheckpointError(
            f"none of the {len(candidates)} checkpoints in {directory} is valid; newest: {problems[0]}"
        )
    return None


def save_in_directory(directory: str | os.PathLike, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Saves ``state`` as :func:`checkpoint_path` ``(directory, step)``, then deletes all
    but the newest ``keep`` checkpoints and any temporary files a crash left behind.
    Call it on one process only (rank 0)."""
    if keep < 1:
        raise ConfigError(f"keep must be at least 1, got {keep}")
    directory = Path(directory)
    path = save_checkpoint(checkpoint_path(directory, step), state)
    for _, old in _checkpoints_by_step(directory)[keep:]:
        _sidecar(old).unlink(missing_ok=True)  # sidecar first: a half-deleted one is invalid
        old.unlink(missing_ok=True)
    for leftover in directory.glob(".step-*.tmp"):
        leftover.unlink(missing_ok=True)
    return path
