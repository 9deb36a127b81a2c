"""The training set's mean image, as the released 2012 code subtracted it from raw 0-255
pixels (computerhistory/AlexNet-Source-Code, ``convdata.py``: ``data - data_mean``; Caffe's
bvlc_alexnet does the same with its ``imagenet_mean.binaryproto``).

    mean_image(key_parts, compute) -> float32 tensor in 0-255 units

It is computed once per training set and cached in
``$XDG_CACHE_HOME/alexnet2gpu/mean-images/<sha256 of what identifies the set>.pt``, written
atomically (:mod:`alexnet2gpu.io.atomic`). The key covers the files' paths, sizes and
modification times and the subset used, so a changed data set gets a new mean.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..io.atomic import write_atomic

__all__ = ["PIXELS", "cache_dir", "file_key", "mean_image"]

log = logging.getLogger("alexnet2gpu")

# How a recipe feeds pixels: "unit" in [0, 1] (the seed's ToTensor, d2l 8.1), or
# "mean-image": 0-255 minus the training set's mean image (the released 2012 code).
PIXELS = ("unit", "mean-image")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "alexnet2gpu" / "mean-images"


def file_key(paths) -> list[str]:
    """What identifies a set of files: each one's resolved path, size and mtime."""
    parts = []
    for path in paths:
        stat = Path(path).stat()
        parts.append(f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return parts


def mean_image(key_parts: list[str], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The cached mean image for ``key_parts``, else ``compute()`` once and cache it."""
    digest = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()[:32]
    path = cache_dir() / f"{digest}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception as error:  # a damaged cache entry: compute it again
            log.warning("mean image cache %s unreadable (%s): recomputing", path, error)
    mean = compute().float().contiguous()
    try:
        write_atomic(path, lambda f: torch.save(mean, f))
    except OSError as error:  # a read-only cache is no reason to stop a run
        log.warning("cannot cache the mean image in %s: %s", path, error)
    return mean
