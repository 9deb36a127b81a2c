"""Data for training: Fashion-MNIST (the seed's data), ImageNet-style folders with the
paper's augmentation, and synthetic batches (:mod:`alexnet2gpu.data.synthetic`).

    >>> from alexnet2gpu.data import build_loaders
    >>> loaders = build_loaders("fashion-mnist", image_size=112, in_channels=1, global_batch=128)
    >>> for epoch in range(epochs):
    ...     loaders.train.set_epoch(epoch)
    ...     for images, labels in loaders.train: ...
    ...     checkpoint["data"] = loaders.train.state_dict()    # resume: load_state_dict

Modules: :mod:`.fashion_mnist` (checked IDX reader, batched resize), :mod:`.imagefolder`
(augmentation, PCA colour noise, 10-crop evaluation), :mod:`.loaders` (sharding over
data-parallel replicas, resumable position).

Importing this package loads neither torch nor torchvision: its names load on first use
(PEP 562).
"""

from .._lazy import lazy_getattr

# Loaded, with torch, on first use: submodule -> the names it gives this package.
_LAZY = {
    ".fashion_mnist": ("FashionMNIST", "find_fashion_mnist", "load_fashion_mnist_split", "read_idx"),
    ".imagefolder": ("PCALighting", "build_folder_datasets", "load_image", "ten_crop_predict"),
    ".loaders": ("EpochLoader", "Loaders", "build_loaders"),
}
__getattr__ = lazy_getattr(__name__, _LAZY)
__all__ = [
    "EpochLoader",
    "FashionMNIST",
    "Loaders",
    "PCALighting",
    "build_folder_datasets",
    "build_loaders",
    "find_fashion_mnist",
    "load_fashion_mnist_split",
    "load_image",
    "read_idx",
    "ten_crop_predict",
]
