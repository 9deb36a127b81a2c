"""Synthetic batches: a pure function of (seed, step), so that every placement and every
process of a job sees the same data without a loader or a dataset on disk.

The global batch of a step is drawn from a generator seeded by (seed, step); a data-
parallel replica takes its contiguous slice of it. Images are N(0, 1), labels uniform
over the classes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

from .shares import local_batch

__all__ = ["HELD_OUT_BATCHES", "HELD_OUT_OFFSETS", "SyntheticLoader", "synthetic_batch", "replica_slice"]

# Held-out batches: steps at these offsets never appear in training (a run's steps count
# up from 0), so the test and validation batches are data the net has not seen.
HELD_OUT_OFFSETS = {"test": -(10**9), "val": -(2 * 10**9)}
HELD_OUT_BATCHES = 2  # batches per evaluation of synthetic data


def _step_seed(seed: int, step: int) -> int:
    digest = hashlib.sha256(f"alexnet2gpu/synthetic/{seed}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def replica_slice(global_batch: int, dp_size: int, dp_rank: int) -> slice:
    """The rows of a global batch that replica ``dp_rank`` of ``dp_size`` trains on."""
    local = local_batch(global_batch, dp_size)
    return slice(dp_rank * local, (dp_rank + 1) * local)


def synthetic_batch(
    seed: int,
    step: int,
    batch_size: int,
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    dp_size: int = 1,
    dp_rank: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replica ``dp_rank``'s share of step ``step``'s global batch of ``batch_size``
    images ``[N, in_channels, image_size, image_size]`` (float32, CPU) and labels."""
    rows = replica_slice(batch_size, dp_size, dp_rank)
    generator = torch.Generator().manual_seed(_step_seed(seed, step))
    x = torch.randn(batch_size, in_channels, image_size, image_size, generator=generator)
    y = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return x[rows].contiguous(), y[rows].contiguous()


class SyntheticLoader:
    """Synthetic batches with the interface of :class:`~alexnet2gpu.data.loaders.EpochLoader`
    (``set_epoch``, ``state_dict``, ``load_state_dict``): batch ``b`` of epoch ``e`` is
    :func:`synthetic_batch` at step ``offset + e * batches + b``."""

    def __init__(
        self,
        *,
        seed: int,
        global_batch: int,
        in_channels: int,
        image_size: int,
        num_classes: int,
        dp_size: int,
        dp_rank: int,
        batches: int,
        offset: int = 0,
    ) -> None:
        replica_slice(global_batch, dp_size, dp_rank)  # refuses a batch that does not split
        self.kw = dict(
            batch_size=global_batch,
            in_channels=in_channels,
            image_size=image_size,
            num_classes=num_classes,
            dp_size=dp_size,
            dp_rank=dp_rank,
        )
        self.seed, self.offset, self.batches_per_epoch = seed, offset, batches
        self.epoch = self.batches_done = self.start_batch = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start_batch = 0
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        if self.batches_done >= self.batches_per_epoch:
            return {"epoch": self.epoch + 1, "batches_done": 0}
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.start_batch = int(state["epoch"]), int(state["batches_done"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start, self.start_batch = self.start_batch, 0
        for b in range(start, self.batches_per_epoch):
            self.batches_done = b
            batch = synthetic_batch(self.seed, self.offset + self.epoch * self.batches_per_epoch + b, **self.kw)
            self.batches_done = b + 1
            yield batch
