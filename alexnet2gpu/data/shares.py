"""The one rule for splitting a global batch over data-parallel replicas (torch-free): every
replica takes an equal share, so the replicas' count must divide the batch. The data
loaders, the synthetic batches, :meth:`alexnet2gpu.parallel.Layout.local_batch` and the
measurements all ask here."""

from __future__ import annotations

from ..errors import ConfigError

__all__ = ["local_batch"]


def local_batch(global_batch: int, dp_size: int) -> int:
    """Each replica's share of ``global_batch`` over ``dp_size`` replicas; a batch below one
    image per replica, or one that does not divide, is refused with the numbers."""
    if dp_size < 1:
        raise ConfigError(f"data-parallel replicas must be at least 1, got {dp_size}")
    if global_batch < dp_size or global_batch % dp_size:
        raise ConfigError(
            f"a global batch of {global_batch} does not divide over {dp_size} data-parallel replicas: "
            f"use a multiple of {dp_size}"
        )
    return global_batch // dp_size
