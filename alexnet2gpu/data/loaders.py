"""The train and test loaders for one process of a (data-parallel x tower) job.

    build_loaders(data, image_size=..., in_channels=..., global_batch=..., dp_rank=0,
                  dp_size=1, seed=0, ...) -> Loaders(train, test, num_classes, ...)

    loaders.train.set_epoch(epoch)           call before each epoch, as with DistributedSampler
    loaders.train.state_dict()               {"epoch", "batches_done"}: the data position
    loaders.train.load_state_dict(state)     resume: the next batch is the one that followed

Sharding. The global batch is split over the ``dp_size`` replicas (``global_batch`` must
be a multiple of it); each replica draws its share through a ``DistributedSampler``
(``num_replicas=dp_size, rank=dp_rank, shuffle=True, seed=seed``, reshuffled by
``set_epoch``). The tower ranks of one replica pass the same ``dp_rank`` and ``seed`` and
so get the same batches in the same order. The test split is shared out without padding
(image ``i`` goes to replica ``i % dp_size``), so summing correct counts and totals over the
replicas gives the exact test accuracy.

Resuming. A position is (epoch, batches consumed in that epoch). The sampler's order is a
function of (seed, epoch) and augmentation a function of (seed, epoch, image), so after
``load_state_dict`` the loader skips the consumed batches and yields exactly the batches an
uninterrupted run would have; the loaders keep no other random state (worker RNGs are
not used), so there is none to capture beyond ``state_dict()``.

Workers and pinned memory. Fashion-MNIST lives in memory and is resized per batch, so
on the CPU it loads in the training process (workers would take cores from training);
with CUDA, a few workers overlap the resize with the GPU. Image folders decode JPEGs in
workers. Memory is pinned only when the device is CUDA.

A sample that cannot be read comes back as a marker and is raised in the training process
as one :class:`~alexnet2gpu.errors.DataError` naming the file (an exception raised in a
worker would arrive wrapped in its traceback).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from ..errors import ConfigError, DataError
from .fashion_mnist import FashionMNIST, ResizeBatch, training_mean_image
from .holdout import VAL_SPLIT_SEED
from .imagefolder import Unreadable, build_folder_datasets
from .mean_image import PIXELS
from .shares import local_batch

_PIXEL_WORDS = {"unit": "pixels in [0, 1]", "mean-image": "pixels 0-255 minus the training mean image"}

__all__ = ["EpochLoader", "EvalShard", "Loaders", "ShardSampler", "build_loaders"]


class ShardSampler(DistributedSampler):
    """``DistributedSampler`` that can start an epoch after its first ``start_batch``
    batches, and yields ``(epoch, index)`` keys so that datasets can seed augmentation."""

    def __init__(self, dataset: Dataset, *, dp_size: int, dp_rank: int, seed: int, batch_size: int) -> None:
        super().__init__(dataset, num_replicas=dp_size, rank=dp_rank, shuffle=True, seed=seed, drop_last=False)
        self.batch_size = batch_size
        self.start_batch = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start_batch = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        indices = list(super().__iter__())[self.start_batch * self.batch_size :]
        return iter([(epoch, i) for i in indices])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_batch * self.batch_size)


class EvalShard(Sampler):
    """Test images ``dp_rank, dp_rank + dp_size, ...``: every image once over the replicas."""

    def __init__(self, size: int, dp_size: int, dp_rank: int) -> None:
        self.indices = range(dp_rank, size, dp_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(0, i) for i in self.indices])

    def __len__(self) -> int:
        return len(self.indices)


class _CollateOrFlag:
    """Collates a batch, or passes on the first :class:`Unreadable` marker in it."""

    def __init__(self, collate: Callable) -> None:
        self.collate = collate

    def __call__(self, samples: list) -> Any:
        for sample in samples:
            if isinstance(sample, Unreadable):
                return sample
        return self.collate(samples)


class EpochLoader(DataLoader):
    """A ``DataLoader`` that raises unreadable samples as :class:`DataError` and, over a
    :class:`ShardSampler`, knows its position for checkpoints."""

    def __init__(
        self, dataset: Dataset, sampler: Sampler, batch_size: int, collate: Callable, num_workers: int, pin_memory: bool
    ) -> None:
        # A DataLoader draws its workers' base seed at the start of every epoch from its
        # generator, else from the global RNG, which would shift the dropout masks of the
        # single-stream nets (nn.Dropout draws from it) between a run and the same run
        # resumed mid-epoch. The workers use no RNG, so the seed itself does not matter.
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=_CollateOrFlag(collate),
            num_workers=num_workers,
            pin_memory=pin_memory,
            drop_last=False,
            persistent_workers=num_workers > 0,
            generator=torch.Generator(),
        )
        self.batches_done = 0

    @property
    def epoch(self) -> int:
        return getattr(self.sampler, "epoch", 0)

    @property
    def batches_per_epoch(self) -> int:
        """Batches in a whole epoch (``len()`` is what is left of a resumed epoch)."""
        full = getattr(self.sampler, "num_samples", len(self.sampler))
        return -(-full // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.batches_done = 0
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        """Where the next batch comes from: a finished epoch reads as the next one's start."""
        if self.batches_done >= self.batches_per_epoch:
            return {"epoch": self.epoch + 1, "batches_done": 0}
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if not 0 <= done < self.batches_per_epoch:
            raise ConfigError(
                f"data position {done} is outside an epoch of {self.batches_per_epoch} batches: "
                f"the checkpoint was written with another data set or batch size"
            )
        self.sampler.set_epoch(epoch)
        self.sampler.start_batch = done
        self.batches_done = done

    def __iter__(self) -> Iterator[Any]:
        start = getattr(self.sampler, "start_batch", 0)
        self.batches_done = start
        for batch in super().__iter__():
            if isinstance(batch, Unreadable):
                raise DataError(batch.message)
            self.batches_done += 1
            yield batch
        if hasattr(self.sampler, "start_batch"):
            self.sampler.start_batch = 0  # a second pass over the same epoch starts at its beginning


@dataclass
class Loaders:
    train: EpochLoader
    val: EpochLoader | None  # images held out from the training set (None: no validation split)
    test: EpochLoader
    num_classes: int
    classes: tuple[str, ...]
    batch_size: int  # per replica: global_batch // dp_size
    ten_crop: bool  # test batches are [B, 10, C, S, S]: use imagefolder.ten_crop_predict
    description: str  # one line for the run's header, e.g. where the files came from


def _default_workers(in_memory: bool, cuda: bool) -> int:
    cpus = os.cpu_count() or 1
    if in_memory:
        return min(4, cpus // 2) if cuda else 0
    return max(1, min(8, cpus - 1))


def _fashion_mnist(data_dir, train_subset, image_size: int, in_channels: int, pixels: str, val_size: int | None):
    """(train set, validation set or None, test set, collate, description) of Fashion-MNIST."""
    train_set = FashionMNIST("train", data_dir, subset=train_subset, val_size=val_size)
    val_set = FashionMNIST("val", data_dir, val_size=val_size) if train_set.val_size else None
    test_set = FashionMNIST("test", data_dir)
    mean = training_mean_image(train_set) if pixels == "mean-image" else None
    held = f"{len(val_set):,} validation (held out of the training file, seed {VAL_SPLIT_SEED}), " if val_set else ""
    description = (
        f"Fashion-MNIST from {train_set.folder}: {len(train_set):,} train, {held}{len(test_set):,} test "
        f"images, resized 28 -> {image_size}, {in_channels} channel{'s' if in_channels > 1 else ''}, "
        f"{_PIXEL_WORDS[pixels]}"
    )
    return train_set, val_set, test_set, ResizeBatch(image_size, in_channels, mean), description


def _check_settings(pixels: str, global_batch: int, dp_rank: int, dp_size: int, num_workers: int | None) -> None:
    if pixels not in PIXELS:
        raise ConfigError(f"unknown pixel scaling '{pixels}': choose one of {', '.join(PIXELS)}")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ConfigError(f"data-parallel rank {dp_rank} is not in 0..{dp_size - 1}")
    local_batch(global_batch, dp_size)
    if num_workers is not None and num_workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {num_workers}")


def _folder_sets(data, image_size: int, in_channels: int, seed: int, ten_crop: bool, pixels: str, val_size):
    """(train set, validation set or None, test set, description) of an image folder."""
    train_set, val_set, test_set = build_folder_datasets(
        Path(data), image_size, in_channels, seed, ten_crop, pixels, val_size
    )
    held = f"{len(val_set):,} validation, " if val_set is not None else ""
    description = (
        f"image folder {data}: {len(train_set):,} train, {held}{len(test_set):,} test images in "
        f"{len(train_set.classes)} classes, {image_size} px crops{', 10-crop evaluation' if ten_crop else ''}, "
        f"{_PIXEL_WORDS[pixels]}"
    )
    return train_set, val_set, test_set, description


def build_loaders(
    data: str | os.PathLike,
    *,
    image_size: int,
    in_channels: int,
    global_batch: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    train_subset: int | None = None,
    ten_crop: bool = False,
    num_workers: int | None = None,
    device: str | torch.device = "cpu",
    pixels: str = "unit",
    val_size: int | None = 0,
) -> Loaders:
    """Train and test loaders for ``data``: ``"fashion-mnist"`` (files from ``data_dir``,
    the Debian package, or a download) or the path of a folder with ``train/`` and ``val/``.
    ``global_batch`` is split over ``dp_size`` replicas; this process is replica
    ``dp_rank``. Batches are ``float32 [B, in_channels, image_size, image_size]`` and
    ``int64 [B]`` labels (test batches ``[B, 10, C, S, S]`` with ``ten_crop``). ``pixels``:
    ``"unit"`` ([0, 1], the seed's) or ``"mean-image"`` (0-255 minus the training set's mean
    image, the released 2012 code's; :mod:`.mean_image`). ``val_size``: images held out
    of the training set as the validation split (:mod:`.holdout`; 0: none; a folder with
    its own ``test/`` uses its ``val/`` instead; None: the default, 5,000 of Fashion-MNIST's
    60,000, 1 in 12 of a folder's)."""
    _check_settings(pixels, global_batch, dp_rank, dp_size, num_workers)
    batch = global_batch // dp_size
    cuda = torch.device(device).type == "cuda"
    if str(data) == "fashion-mnist":
        if ten_crop:
            raise ConfigError("--ten-crop needs an image folder (--data PATH); Fashion-MNIST is evaluated whole")
        train_set, val_set, test_set, train_collate, description = _fashion_mnist(
            data_dir, train_subset, image_size, in_channels, pixels, val_size
        )
        test_collate = train_collate
        in_memory = True
        classes = FashionMNIST.classes
    else:
        if train_subset is not None:
            raise ConfigError("--train-subset applies to Fashion-MNIST only")
        train_set, val_set, test_set, description = _folder_sets(
            data, image_size, in_channels, seed, ten_crop, pixels, val_size
        )
        train_collate = test_collate = default_collate
        in_memory = False
        classes = tuple(train_set.classes)
    workers = _default_workers(in_memory, cuda) if num_workers is None else num_workers
    train = EpochLoader(
        train_set,
        ShardSampler(train_set, dp_size=dp_size, dp_rank=dp_rank, seed=seed, batch_size=batch),
        batch,
        train_collate,
        workers,
        pin_memory=cuda,
    )
    val, test = (
        EpochLoader(part, EvalShard(len(part), dp_size, dp_rank), batch, test_collate, workers, pin_memory=cuda)
        if part is not None
        else None
        for part in (val_set, test_set)
    )
    return Loaders(
        train=train,
        val=val,
        test=test,
        num_classes=len(classes),
        classes=tuple(classes),
        batch_size=batch,
        ten_crop=ten_crop,
        description=description,
    )
