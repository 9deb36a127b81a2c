"""Checkpoints that survive a crash and refuse hostile or damaged files.

    save_checkpoint(path, state)                  one file, atomically, with a sha256 sidecar
    load_checkpoint(path, map_location="cpu")     verify the sidecar, then weights_only load
    checkpoint_path(directory, step)              DIR/step-00000100.pt
    save_in_directory(directory, step, state, keep=3)   save, then keep the newest ``keep``
    newest_checkpoint(directory)                  the newest *valid* checkpoint, for --resume
    capture_rng_state(model) / restore_rng_state(model, state)

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

RNG state. :func:`capture_rng_state` returns the torch CPU generator, every CUDA
generator (when CUDA is available), Python's ``random`` and each
:class:`~alexnet2gpu.models.TowerDropout` generator with its seed, keyed by module name
(``tower_a.dropout``...), which is the same in every placement. NumPy's generator is not
captured: nothing here draws from it. Under the ``ranks`` placement each process holds
only its own tower's generator: gather the ``"dropout"`` entries of both tower ranks into
one dict before rank 0 saves; :func:`restore_rng_state` restores the towers a process holds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import fsync_directory, write_atomic
from .errors import CheckpointError, ConfigError
from .models import TowerDropout

__all__ = [
    "capture_rng_state",
    "checkpoint_path",
    "load_checkpoint",
    "newest_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "save_in_directory",
    "verify_checkpoint",
]

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- RNG state


def _dropouts(model: nn.Module) -> dict[str, tuple[TowerDropout, torch.device]]:
    """Each TowerDropout by name, with the device of its tower's parameters (where its
    activations, and so its generator, live)."""
    found = {}
    parents = dict(model.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, TowerDropout):
            parent = parents[name.rpartition(".")[0]] if "." in name else model
            param = next(parent.parameters(), None)
            found[name] = (module, param.device if param is not None else torch.device("cpu"))
    return found


def capture_rng_state(model: nn.Module) -> dict[str, Any]:
    """Every random stream a training step draws from, as a dict ``weights_only`` loads."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "dropout": {},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for name, (module, _) in _dropouts(model).items():
        generator = module.generator
        state["dropout"][name] = {
            "seed": module.seed,
            "device": str(generator.device) if generator is not None else None,
            "state": generator.get_state() if generator is not None else None,
        }
    return state


def restore_rng_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Puts back what :func:`capture_rng_state` captured. A dropout generator that had been
    created is re-created on its tower's current device and given its saved state; one
    that had not stays lazy (created from its seed on first use, as in an unbroken run).
    A state saved on another kind of device (CUDA vs CPU generators differ) cannot be
    continued: that generator restarts from its seed, with a warning."""
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("checkpoint holds %d CUDA generator states, this machine has %d devices: "
                        "CUDA generators not restored", len(cuda), torch.cuda.device_count())
    saved = state.get("dropout", {})
    for name, (module, device) in _dropouts(model).items():
        if name not in saved:
            log.warning("checkpoint holds no dropout generator for %s: it starts from its seed", name)
            continue
        entry = saved[name]
        module.seed = int(entry["seed"])
        module.generator = None
        if entry["state"] is None or device.type == "meta":
            continue
        if torch.device(entry["device"]).type != device.type:
            log.warning("dropout generator %s was saved on %s and now runs on %s: it restarts from its seed",
                        name, entry["device"], device)
            continue
        generator = torch.Generator(device=device)
        generator.set_state(entry["state"])
        module.generator = generator
