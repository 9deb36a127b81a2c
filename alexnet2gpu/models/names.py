"""The nets' names, each one's default input and the initialisations' names, without
torch: the command line offers them as choices before it imports anything heavy."""

from __future__ import annotations

__all__ = ["DEFAULTS", "INIT_NAMES", "MODEL_NAMES"]

# Defaults per model: (in_channels, num_classes, image_size).
# 227 for the 2012 nets: the released code fed 224 crops and let conv1's last window run
# 3 pixels off the edge (see layers.Conv1Padding); Caffe's bvlc_alexnet feeds 227.
DEFAULTS = {
    "dual": (3, 1000, 227),
    "half": (3, 1000, 227),
    "torchvision": (3, 1000, 227),
    "simplified": (1, 10, 224),  # [d2l] Fashion-MNIST resized to 224
}
MODEL_NAMES = tuple(DEFAULTS)
# The keys of init.INITS: the paper's N(0, 0.01), the released layers-145.cfg's, d2l's Xavier.
INIT_NAMES = ("paper", "cfg", "xavier")
