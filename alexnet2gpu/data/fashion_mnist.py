"""Fashion-MNIST (the seed's data): IDX files read and checked here, resized per batch.

    find_fashion_mnist(data_dir=None) -> (folder, {"train": (images, labels), "test": ...})
    read_idx(path, ndim) -> uint8 tensor          one IDX file, gzipped or not, checked
    load_fashion_mnist_split(images, labels) -> (uint8 [N, H, W], int64 [N])
    FashionMNIST(split, data_dir=None, subset=None)     a Dataset of (uint8 image, label)
    ResizeBatch(image_size, in_channels)          the collate function: batch, resize, channels

Where the files come from, in order: ``data_dir`` (``--data-dir``); the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``, gzipped); else they are
downloaded with torchvision's ``download_url`` (its mirror and md5 sums) into
``$XDG_CACHE_HOME/alexnet2gpu/fashion-mnist`` where the network allows. In a folder, the
files may be plain or ``.gz``, directly inside it or in torchvision's ``FashionMNIST/raw``.

Every file is checked before use (torchvision's own reader stops on a bare ``assert``):
an empty file, a ``.gz`` that is not gzip or is cut short, a wrong magic number, a header
whose shape disagrees with the bytes that follow, image and label counts that disagree,
labels outside 0-9. Each raises :class:`~alexnet2gpu.errors.DataError` naming the file.

Pixels, by recipe: scaled to [0, 1] as the seed's ``transforms.ToTensor()`` does, with no
mean subtraction (the seed, d2l 8.1, used none); or (``mean=``) raw 0-255 values minus
the training set's mean image, as the released 2012 code fed them
(:mod:`.mean_image`). The mean is subtracted at 28x28, before the resize: bilinear
resizing is linear, so that equals subtracting the resized mean. Each batch is resized
from 28x28 to the model's input size with bilinear interpolation (``F.interpolate``,
``align_corners=False``, the geometry of the seed's ``transforms.Resize``), batched, which
is much faster than resizing image by image. One channel is repeated to three for the
3-channel nets.
"""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
import zlib
from math import prod
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .holdout import VAL_SPLIT_SEED, default_val_size, validation_split

__all__ = [
    "DEBIAN_DIR",
    "FashionMNIST",
    "NUM_CLASSES",
    "ResizeBatch",
    "find_fashion_mnist",
    "training_mean_image",
    "load_fashion_mnist_split",
    "read_idx",
]

NUM_CLASSES = 10
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)  # zalandoresearch/fashion-mnist README
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_UNSIGNED_BYTE = 0x08  # the IDX type code for uint8 data (yann.lecun.com/exdb/mnist)
GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- IDX files


def _read_exactly(f, n: int, path: Path) -> bytes:
    """Up to ``n`` bytes, in chunks (a header may promise far more than the file holds)."""
    parts, left = [], n
    try:
        while left > 0:
            chunk = f.read(min(left, _CHUNK))
            if not chunk:
                break
            parts.append(chunk)
            left -= len(chunk)
    except EOFError:
        raise DataError(f"{path} is a gzip file that is cut short (truncated download?)") from None
    except (gzip.BadGzipFile, zlib.error) as error:
        raise DataError(f"{path} is not a valid gzip file: {error}") from None
    return b"".join(parts)


def read_idx(path: str | os.PathLike, ndim: int) -> torch.Tensor:
    """Reads one IDX file of unsigned bytes with ``ndim`` dimensions (3 for images,
    1 for labels), gzipped or not, into a uint8 tensor of the shape its header gives.
    Raises :class:`DataError` naming the file for anything else."""
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            start = raw.read(2)
            raw.seek(0)
            if not start:
                raise DataError(f"{path} is empty")
            compressed = start == GZIP_MAGIC
            if path.suffix == ".gz" and not compressed:
                raise DataError(f"{path} is named .gz but is not a gzip file (it starts with {start.hex()})")
            f = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
            header = _read_exactly(f, 4, path)
            if not header:
                raise DataError(f"{path} is empty once decompressed")
            expected_magic = (IDX_UNSIGNED_BYTE << 8) | ndim
            if len(header) < 4:
                raise DataError(f"{path} is too short for an IDX header ({len(header)} bytes)")
            magic = int.from_bytes(header, "big")
            if magic != expected_magic:
                raise DataError(
                    f"{path} has magic number 0x{magic:08x}, not 0x{expected_magic:08x} (an IDX file "
                    f"of unsigned bytes with {ndim} dimension{'s' if ndim > 1 else ''})"
                )
            dims_raw = _read_exactly(f, 4 * ndim, path)
            if len(dims_raw) < 4 * ndim:
                raise DataError(f"{path} is truncated inside its IDX header")
            shape = struct.unpack(f">{ndim}I", dims_raw)
            size = prod(shape)
            data = _read_exactly(f, size + 1, path)
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from None
    if len(data) < size:
        raise DataError(
            f"{path} is truncated: its header gives shape {list(shape)} ({size:,} bytes of data), "
            f"it holds {len(data):,}"
        )
    if len(data) > size:
        raise DataError(
            f"{path} holds more data than its header's shape {list(shape)} ({size:,} bytes): "
            f"not an IDX file of that shape"
        )
    if size == 0:
        return torch.zeros(shape, dtype=torch.uint8)  # torch.frombuffer refuses an empty buffer
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(shape)


def load_fashion_mnist_split(
    images_path: str | os.PathLike, labels_path: str | os.PathLike
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``uint8 [N, H, W]`` and labels ``int64 [N]`` of one split, checked as a pair."""
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    n, rows, cols = images.shape
    if n == 0 or rows == 0 or cols == 0:
        raise DataError(f"{images_path} holds no images (shape {list(images.shape)})")
    if labels.shape[0] != n:
        raise DataError(f"{images_path} holds {n} images but {labels_path} holds {labels.shape[0]} labels")
    bad = (labels >= NUM_CLASSES).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        raise DataError(
            f"{labels_path}: label {int(labels[i])} at index {i} is outside 0-{NUM_CLASSES - 1} "
            f"(Fashion-MNIST has {NUM_CLASSES} classes)"
        )
    return images, labels.long()


# --------------------------------------------------------------------------- finding the files


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "alexnet2gpu" / "fashion-mnist"


def _find_in(folder: Path) -> dict[str, tuple[Path, Path]] | None:
    """The four files in ``folder`` (or its ``FashionMNIST/raw``), plain or gzipped."""
    found = {}
    for split, names in FILES.items():
        paths = []
        for name in names:
            candidates = [d / n for d in (folder, folder / "FashionMNIST" / "raw") for n in (name, name + ".gz")]
            match = next((c for c in candidates if c.is_file()), None)
            if match is None:
                return None
            paths.append(match)
        found[split] = (paths[0], paths[1])
    return found


def _download(folder: Path) -> None:
    """Downloads the four files that ``folder`` lacks, each into a private temporary folder
    first and then moved into place, so that ranks downloading at once, or an interrupted
    download, never leave a partial file under the final name."""
    import shutil

    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST
    from torchvision.datasets.utils import download_url

    for filename, md5 in TorchvisionFashionMNIST.resources:
        if (folder / filename).is_file():
            continue
        errors = []
        for mirror in TorchvisionFashionMNIST.mirrors:
            scratch = Path(tempfile.mkdtemp(dir=folder, prefix=".download-"))
            try:
                download_url(mirror + filename, root=str(scratch), filename=filename, md5=md5)
                os.replace(scratch / filename, folder / filename)
                break
            except Exception as error:  # URLError, socket errors, md5 mismatch (RuntimeError)
                errors.append(f"{mirror}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        else:
            raise DataError(
                f"Fashion-MNIST is not in {DEBIAN_DIR} and could not be downloaded ({'; '.join(errors)}): "
                f"pass --data-dir with the four IDX files, or install the Debian package dataset-fashion-mnist"
            )


def find_fashion_mnist(data_dir: str | os.PathLike | None = None) -> tuple[Path, dict[str, tuple[Path, Path]]]:
    """The folder used and ``{"train": (images, labels), "test": (images, labels)}``."""
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise ConfigError(f"--data-dir {folder} {'is not a folder' if folder.exists() else 'does not exist'}")
        found = _find_in(folder)
        if found is None:
            wanted = ", ".join(n + "[.gz]" for names in FILES.values() for n in names)
            raise DataError(f"{folder} does not hold the Fashion-MNIST files {wanted}")
        return folder, found
    for folder in (DEBIAN_DIR, _cache_dir()):
        if folder.is_dir() and (found := _find_in(folder)) is not None:
            return folder, found
    folder = _cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    _download(folder)
    found = _find_in(folder)
    if found is None:
        raise DataError(f"the Fashion-MNIST download into {folder} is incomplete: remove the folder and retry")
    return folder, found


# --------------------------------------------------------------------------- dataset and batches


class FashionMNIST(Dataset):
    """One split held in memory as uint8 (60,000 x 28 x 28 is 47 MB).

    ``split``: ``"train"`` (the training file's images less the validation ones),
    ``"val"`` (``val_size`` images held out from the training file with a fixed seed,
    :mod:`.holdout`; None: the default 5,000) or ``"test"`` (the test file). Items are looked up by the keys the
    loaders' samplers yield, ``(epoch, index)``, or by a plain index; each is ``(uint8 [H,
    W] image, int label)``. ``subset=N`` keeps the first N training images (the files are
    already in random order), for quick runs.
    """

    num_classes = NUM_CLASSES
    classes = CLASS_NAMES

    def __init__(
        self,
        split: str,
        data_dir: str | os.PathLike | None = None,
        subset: int | None = None,
        val_size: int | None = 0,
    ) -> None:
        if split not in ("train", "val", "test"):
            raise ConfigError(f"unknown Fashion-MNIST split '{split}': choose train, val or test")
        self.folder, files = find_fashion_mnist(data_dir)
        self.files = files["test" if split == "test" else "train"]
        self.images, self.labels = load_fashion_mnist_split(*self.files)
        if val_size is None:  # the default: 5,000 of the 60,000
            val_size = default_val_size(len(self.labels))
        self.val_size = val_size if split != "test" else 0
        if split != "test":
            train, val = validation_split(len(self.labels), val_size)
            keep = val if split == "val" else train
            self.images, self.labels = self.images[keep], self.labels[keep]
        if subset is not None and split == "train":
            if not 1 <= subset <= len(self.labels):
                raise ConfigError(f"--train-subset {subset} must be between 1 and {len(self.labels)}")
            self.images, self.labels = self.images[:subset], self.labels[:subset]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index = key[1] if isinstance(key, tuple) else key
        return self.images[index], int(self.labels[index])


def training_mean_image(dataset: FashionMNIST) -> torch.Tensor:
    """The mean 28x28 image (0-255) of the images ``dataset`` trains on, cached."""
    from .mean_image import file_key, mean_image

    held_out = [f"{dataset.val_size} held out (seed {VAL_SPLIT_SEED})"] if dataset.val_size else []
    key = ["fashion-mnist", *file_key(dataset.files), *held_out, f"first {len(dataset)}"]
    return mean_image(key, lambda: dataset.images.double().mean(dim=0).float())


class ResizeBatch:
    """Collate function: stacks ``(uint8 [H, W], label)`` pairs, scales to [0, 1] (or, given
    ``mean``, subtracts that 0-255 mean image from the raw values), resizes the whole batch
    to ``image_size`` (bilinear) and repeats to ``in_channels`` (1 or 3).
    Returns ``float32 [B, in_channels, image_size, image_size]`` and ``int64 [B]``."""

    def __init__(self, image_size: int, in_channels: int, mean: torch.Tensor | None = None) -> None:
        if in_channels not in (1, 3):
            raise ConfigError(f"Fashion-MNIST is grayscale: the model must take 1 or 3 channels, not {in_channels}")
        self.image_size, self.in_channels, self.mean = image_size, in_channels, mean

    def __call__(self, samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([s[0] for s in samples]).unsqueeze(1).float()
        images = images.div_(255.0) if self.mean is None else images.sub_(self.mean)
        labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        if self.in_channels == 3:
            images = images.repeat(1, 3, 1, 1)
        return images, labels
