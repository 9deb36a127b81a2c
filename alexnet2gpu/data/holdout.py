"""The validation split: images held out from the training set with a fixed seed.

The paper lowers the learning rate when the *validation* error stops improving (section
5), and settings are chosen on it; the test set only reports. Fashion-MNIST has no
validation split, and an ImageNet-style folder's ``val/`` serves as the test set, so the
validation images come out of the training images: ``val_size`` of them, drawn with a
seed of their own (not the run seed), so every run, whatever its seed, holds out the
same images and trains on the same rest.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

__all__ = ["DEFAULT_VAL_SIZE", "VAL_SPLIT_SEED", "default_val_size", "validation_split"]

DEFAULT_VAL_SIZE = 5000  # of Fashion-MNIST's 60,000 training images (1 in 12)
VAL_SPLIT_SEED = 2012  # the held-out images do not depend on the run seed


def default_val_size(train_images: int) -> int:
    """5,000 for Fashion-MNIST's 60,000; the same 1 in 12 of a smaller folder (at least 1)."""
    return min(DEFAULT_VAL_SIZE, max(1, train_images // 12))


def validation_split(n: int, val_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, validation indices) of ``n`` images: ``val_size`` drawn at random
    with :data:`VAL_SPLIT_SEED`, both in ascending order (the training images keep the
    files' order)."""
    if not 0 <= val_size < n:
        raise ConfigError(
            f"a validation split of {val_size:,} images leaves none of the {n:,} training images to train on: "
            f"use --val-size below {n:,}"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
    held = torch.zeros(n, dtype=torch.bool)
    held[order[:val_size]] = True
    return held.logical_not().nonzero().flatten(), held.nonzero().flatten()
