"""ImageNet-style folders (``ROOT/train/<class>/*.jpg``, ``ROOT/val/<class>/*.jpg``) with the
paper's augmentation and 10-crop evaluation.

    build_folder_datasets(root, image_size, in_channels, seed, ten_crop, pixels, val_size)
        -> (train, validation or None, test)
    PCALighting(alpha_std=0.1)                       the paper's colour noise, on a tensor
    ten_crop_predict(forward, crops) -> [B, classes] softmax averaged over the 10 crops
    load_image(path) -> PIL image                    opens and decodes one file, or DataError

Training images ([paper] section 2 and 4.1): the shorter side resized to 256 and the
central 256x256 kept, then a random crop of the input size, a random horizontal flip,
scaling to [0, 1], PCA colour noise and subtraction of the per-channel mean. Evaluation:
the same 256x256, then the central crop, or with ``ten_crop`` the four corners and the
centre and their mirror images ([paper] section 4.1), whose softmax outputs
:func:`ten_crop_predict` averages. For inputs under 224 pixels the 256 is scaled by the
same ratio (256/224), so that a crop keeps the paper's share of the image.

Pixels, by recipe (``pixels``): ``"unit"`` scales to [0, 1] and subtracts the per-channel
mean below; ``"mean-image"`` keeps raw 0-255 values and subtracts the training set's mean
image at the 256x256 stage, before the crop, as the released 2012 code did (``convdata.py``;
:mod:`.mean_image` computes it once and caches it); the colour noise is then scaled to
0-255 units. The released code also divided the image by 1.1 after the colour noise; that
is not done here.

Mean and colour noise use the published ImageNet statistics (in [0, 1] pixel units) of
fb.resnet.torch, ``datasets/imagenet.lua`` ("computed from random subset of ImageNet
training images"): the mean (0.485, 0.456, 0.406) and the RGB eigenvalues/eigenvectors
below. The paper subtracts a mean *image*; a per-channel mean is the usual stand-in.
Pixels are not divided by a standard deviation (the paper does not).

Random choices are a function of (seed, epoch, image index), not of a worker's RNG
stream, so a resumed run draws the same crops, flips and noise as one that never stopped,
whatever the number of workers.

Bad folders: a missing folder is a :class:`~alexnet2gpu.errors.ConfigError`; a folder
without class folders or images, a file that is not an image, a truncated image and a
decompression bomb (over ``PIL.Image.MAX_IMAGE_PIXELS``; PIL's warning is turned into an
error) are :class:`~alexnet2gpu.errors.DataError` naming the file.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import v2

from ..errors import ConfigError, DataError
from .holdout import default_val_size, validation_split

__all__ = [
    "IMAGENET_EIGENVALUES",
    "IMAGENET_EIGENVECTORS",
    "IMAGENET_MEAN",
    "FolderDataset",
    "PCALighting",
    "Unreadable",
    "build_folder_datasets",
    "load_image",
    "resize_side",
    "ten_crop_predict",
]

# fb.resnet.torch datasets/imagenet.lua: ImageNet statistics for pixels in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_EIGENVALUES = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGENVECTORS = (  # one eigenvector per column, rows R, G, B
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
PCA_ALPHA_STD = 0.1  # [paper] section 4.1: alpha ~ N(0, 0.1)
PAPER_RESIZE, PAPER_CROP = 256, 224  # [paper] sections 2 and 4.1


def resize_side(image_size: int) -> int:
    """The side images are resized and centre-cropped to before the crop: the paper's 256
    for inputs of 224 and more (256 -> 227 as Caffe), the same ratio for smaller inputs."""
    if image_size >= PAPER_CROP:
        return max(PAPER_RESIZE, image_size)
    return round(image_size * PAPER_RESIZE / PAPER_CROP)


class PCALighting(torch.nn.Module):
    """[paper] section 4.1: adds ``eigvec @ (alpha * eigval)`` to every pixel of an RGB
    image in [0, 1], with ``alpha ~ N(0, alpha_std)`` drawn once per image."""

    def __init__(
        self, alpha_std: float = PCA_ALPHA_STD, eigenvalues=IMAGENET_EIGENVALUES, eigenvectors=IMAGENET_EIGENVECTORS
    ) -> None:
        super().__init__()
        self.alpha_std = alpha_std
        self.register_buffer("eigenvalues", torch.tensor(eigenvalues, dtype=torch.float32), persistent=False)
        self.register_buffer("eigenvectors", torch.tensor(eigenvectors, dtype=torch.float32), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.alpha_std == 0:
            return image
        alpha = torch.randn(3) * self.alpha_std
        rgb = self.eigenvectors @ (alpha * self.eigenvalues)
        return image + rgb.view(3, 1, 1).to(image.dtype)


def load_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """Opens and fully decodes one image; a file that is not an image, a truncated or
    damaged image, or one over PIL's pixel limit raises :class:`DataError` naming it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                image.load()
                return image.convert(mode)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            pixels = re.search(r"\((\d+) pixels\)", str(error))
            size = f"{int(pixels.group(1)):,} pixels" if pixels else "too many pixels"
            raise DataError(
                f"{path} is refused as a possible decompression bomb: {size}, over PIL's limit of "
                f"{Image.MAX_IMAGE_PIXELS:,} (PIL.Image.MAX_IMAGE_PIXELS)"
            ) from None
        except UnidentifiedImageError:
            raise DataError(f"{path} is not an image that PIL can read") from None
        except FileNotFoundError:
            raise DataError(f"{path} disappeared while the data was being read") from None
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise DataError(f"{path} is truncated or damaged: {error}") from None


class SubtractImage(torch.nn.Module):
    """Subtracts a fixed mean image ``[C, H, W]`` from an image of the same shape."""

    def __init__(self, mean: torch.Tensor) -> None:
        super().__init__()
        self.mean = mean

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.as_subclass(torch.Tensor) - self.mean


def _folder_mean_image(folder: datasets.ImageFolder, prepare: Callable, mode: str) -> torch.Tensor:
    """The mean of ``prepare(image)`` over every training image (0-255), cached."""
    from .mean_image import file_key, mean_image

    def compute() -> torch.Tensor:
        total = None
        for path, _ in folder.samples:
            image = prepare(load_image(path, mode)).double()
            total = image if total is None else total + image
        return total / len(folder.samples)

    paths = [path for path, _ in folder.samples]
    return mean_image(["image-folder", mode, str(prepare), *file_key(paths)], compute)


class Unreadable:
    """Returned by a dataset in place of a sample it could not read; the loader raises it
    in the main process as one clean :class:`DataError` (a worker's exception would come
    back wrapped in its traceback)."""

    def __init__(self, message: str) -> None:
        self.message = message


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.sha256(f"alexnet2gpu/augment/{seed}/{epoch}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class FolderDataset(Dataset):
    """An ``ImageFolder`` split whose items are looked up by ``(epoch, index)`` keys, so
    that its random augmentation is seeded per image and per epoch."""

    def __init__(self, folder: datasets.ImageFolder, transform: Callable, mode: str, seed: int, random: bool) -> None:
        self.folder, self.transform, self.mode, self.seed, self.random = folder, transform, mode, seed, random
        self.classes = folder.classes
        self.num_classes = len(folder.classes)

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        path, label = self.folder.samples[index]
        try:
            image = load_image(path, self.mode)
        except DataError as error:
            return Unreadable(str(error))
        if not self.random:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_sample_seed(self.seed, epoch, index))
            return self.transform(image), label


def _image_folder(split: Path) -> datasets.ImageFolder:
    if not split.is_dir():
        raise ConfigError(
            f"image folder {split} does not exist: --data wants a folder with train/ and val/ "
            f"holding one folder per class"
        )
    try:
        return datasets.ImageFolder(str(split), allow_empty=False)
    except FileNotFoundError as error:  # no class folders, or no image files in them
        message = str(error)
        raise DataError(message if str(split) in message else f"{split}: {message}") from None


class _TenCrops:
    """The four corner crops, the centre crop and their mirror images, as ``[10, C, S, S]``."""

    def __init__(self, size: int) -> None:
        self.crop = v2.TenCrop(size)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return torch.stack([crop.as_subclass(torch.Tensor) for crop in self.crop(image)])


def build_folder_datasets(
    root: str | os.PathLike,
    image_size: int,
    in_channels: int = 3,
    seed: int = 0,
    ten_crop: bool = False,
    pixels: str = "unit",
    val_size: int | None = 0,
) -> tuple[FolderDataset, FolderDataset | None, FolderDataset]:
    """The training, validation and test splits of ``root``: with ``train/``, ``val/`` and
    ``test/``, those three; with ``train/`` and ``val/`` (ImageNet's layout, whose ``val/``
    is what the paper reports), ``val/`` is the test set and ``val_size`` images of
    ``train/`` are held out as the validation set (:mod:`.holdout`; 0: none; None: 1 in 12). Training
    items are ``(float [C, S, S], label)``, evaluation items the same, or ``(float [10, C,
    S, S], label)`` with ``ten_crop``. ``pixels``: ``"unit"`` or ``"mean-image"`` (module
    docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"data folder {root} does not exist")
    if in_channels not in (1, 3):
        raise ConfigError(f"image folders give 1 (grayscale) or 3 (RGB) channels, not {in_channels}")
    train = _image_folder(root / "train")
    if (root / "test").is_dir():
        val, test = _image_folder(root / "val"), _image_folder(root / "test")
        others = {"val": val, "test": test}
    else:
        test = _image_folder(root / "val")
        train, val = _hold_out(train, val_size)
        others = {"val": test}
    for name, other in others.items():
        if train.classes != other.classes:
            only_train = sorted(set(train.classes) - set(other.classes))
            only_other = sorted(set(other.classes) - set(train.classes))
            raise DataError(
                f"{root}: train/ and {name}/ hold different classes "
                f"(only in train: {only_train[:5]}, only in {name}: {only_other[:5]})"
            )
    rgb = in_channels == 3
    mode = "RGB" if rgb else "L"
    mean = list(IMAGENET_MEAN) if rgb else [sum(IMAGENET_MEAN) / 3]
    side = resize_side(image_size)
    crop = [_TenCrops(image_size)] if ten_crop else [v2.CenterCrop(image_size)]
    if pixels == "mean-image":
        prepare = v2.Compose([v2.Resize(side), v2.CenterCrop(side), v2.ToImage(), v2.ToDtype(torch.float32)])
        subtract = SubtractImage(_folder_mean_image(train, prepare, mode))
        noise = [PCALighting(eigenvalues=tuple(255.0 * e for e in IMAGENET_EIGENVALUES))] if rgb else []
        train_transform = v2.Compose([prepare, subtract, v2.RandomCrop(image_size), v2.RandomHorizontalFlip(), *noise])
        eval_transform = v2.Compose([prepare, subtract, *crop])
    else:
        to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        subtract_mean = v2.Normalize(mean=mean, std=[1.0] * in_channels)
        train_transform = v2.Compose(
            [
                v2.Resize(side),
                v2.CenterCrop(side),  # [paper] section 2
                v2.RandomCrop(image_size),
                v2.RandomHorizontalFlip(),  # [paper] section 4.1
                *to_float,
                *([PCALighting()] if rgb else []),  # [paper] section 4.1, colour noise
                subtract_mean,
            ]
        )
        eval_transform = v2.Compose([v2.Resize(side), v2.CenterCrop(side), *to_float, *crop, subtract_mean])
    return (
        FolderDataset(train, train_transform, mode, seed, random=True),
        FolderDataset(val, eval_transform, mode, seed, random=False) if val is not None else None,
        FolderDataset(test, eval_transform, mode, seed, random=False),
    )


def _hold_out(folder: datasets.ImageFolder, val_size: int | None):
    """(training part, validation part or None) of ``folder``'s images (:mod:`.holdout`)."""
    if val_size is None:
        val_size = default_val_size(len(folder.samples))
    if not val_size:
        return folder, None
    train_idx, val_idx = validation_split(len(folder.samples), val_size)
    parts = []
    for keep in (train_idx, val_idx):
        part = copy.copy(folder)
        part.samples = [folder.samples[i] for i in keep.tolist()]
        part.imgs, part.targets = part.samples, [label for _, label in part.samples]
        parts.append(part)
    return parts[0], parts[1]


def ten_crop_predict(forward: Callable[[torch.Tensor], torch.Tensor], crops: torch.Tensor) -> torch.Tensor:
    """Class probabilities for a batch of 10-crop images ``[B, 10, C, S, S]``: the model's
    softmax averaged over the ten crops ([paper] section 4.1). ``forward`` maps images
    ``[N, C, S, S]`` to logits ``[N, classes]`` (a model, or a placed model)."""
    if crops.dim() != 5 or crops.shape[1] != 10:
        raise ValueError(f"expected 10-crop images [B, 10, C, S, S], got {list(crops.shape)}")
    b = crops.shape[0]
    logits = forward(crops.flatten(0, 1))
    return torch.softmax(logits.float(), dim=1).view(b, 10, -1).mean(dim=1)
