"""Input sizes: what each net accepts, its defaults, and the width multiplier.

Sources: [paper] section 3.4 (overlapping pooling), [cfg] layers-145.cfg (conv1's output
size), [d2l] 8.1.2 (the seed's net), torchvision's ``alexnet`` (its conv1 padding).
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .names import DEFAULTS, MODEL_NAMES

__all__ = ["DEFAULTS", "MODEL_NAMES", "POOL_KERNEL", "POOL_STRIDE", "smallest_image_size"]

# Overlapping pooling, [paper] section 3.4: z=3, s=2.
POOL_KERNEL, POOL_STRIDE = 3, 2


def scaled(width: int, multiplier: float) -> int:
    """A layer width times the width multiplier, at least 1."""
    return max(1, round(width * multiplier))


def pooled(size: int) -> int:
    return (size - POOL_KERNEL) // POOL_STRIDE + 1


def conv1_out_2012(image_size: int) -> int:
    # cuda-convnet sizes conv1's output as 1 + ceil((imgSize - filterSize) / stride) [cfg],
    # letting the last window hang off the right and bottom edge.
    return 1 + math.ceil((image_size - 11) / 4)


def pool5_size(name: str, image_size: int) -> int:
    """Side of the last pooled feature map, <= 0 when the image is too small."""
    if image_size < 11:
        return 0
    if name in ("dual", "half"):
        s = conv1_out_2012(image_size)
    elif name == "simplified":
        s = (image_size + 2 * 1 - 11) // 4 + 1  # conv1 pad 1 [d2l]
    else:
        s = (image_size + 2 * 2 - 11) // 4 + 1  # torchvision: conv1 pad 2
    for _ in range(3):
        if s < POOL_KERNEL:
            return 0
        s = pooled(s)
    return s


def smallest_image_size(name: str) -> int:
    """The smallest square input the named net accepts."""
    return next(s for s in range(11, 4096) if pool5_size(name, s) >= 1)


def check_image_size(name: str, image_size: int) -> int:
    """The side of pool5's output; a ConfigError naming the smallest size if there is none."""
    side = pool5_size(name, image_size)
    if side < 1:
        raise ConfigError(
            f"image size {image_size} is too small for '{name}': the smallest that works is {smallest_image_size(name)}"
        )
    return side


def check_input(x: torch.Tensor, in_channels: int, image_size: int) -> None:
    if x.dim() != 4 or x.shape[1] != in_channels or x.shape[2] != image_size or x.shape[3] != image_size:
        raise ValueError(
            f"expected a batch of shape [N, {in_channels}, {image_size}, {image_size}], got {list(x.shape)}"
        )
