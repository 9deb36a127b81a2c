"""Data: the checked IDX reader (with a property test), Fashion-MNIST batches, image
folders with the paper's augmentation and 10-crop evaluation, bad files and folders, and
loaders that shard over replicas and resume exactly."""

from __future__ import annotations

import gzip
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from alexnet2gpu.data import build_loaders, fashion_mnist, load_image, read_idx, ten_crop_predict
from alexnet2gpu.data.fashion_mnist import DEBIAN_DIR, FashionMNIST, ResizeBatch
from alexnet2gpu.data.imagefolder import IMAGENET_EIGENVALUES, IMAGENET_EIGENVECTORS, PCALighting
from alexnet2gpu.errors import ConfigError, DataError

# --------------------------------------------------------------------------- IDX files


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = (0x08 << 8) | array.ndim if magic is None else magic
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def write_fashion(folder: Path, n_train: int = 40, n_test: int = 12, gz: bool = True, seed: int = 0) -> Path:
    """A tiny Fashion-MNIST: 28x28 images whose mean brightness encodes the label."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        for name, array in ((f"{split}-images-idx3-ubyte", images), (f"{split}-labels-idx1-ubyte", labels)):
            data = idx_bytes(array)
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return folder


def test_reads_plain_and_gzipped_idx(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(array))
    (tmp_path / "b.gz").write_bytes(gzip.compress(idx_bytes(array)))
    for name in ("a", "b.gz"):
        got = read_idx(tmp_path / name, ndim=3)
        assert got.dtype == torch.uint8 and torch.equal(got, torch.from_numpy(array))


@pytest.mark.skipif(
    not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="the Debian package dataset-fashion-mnist is not installed",
)
def test_debian_package_files():
    train, test = FashionMNIST("train"), FashionMNIST("test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert torch.equal(train.labels.bincount(), torch.full((10,), 6000))


def _bad_files(folder: Path) -> dict[str, tuple[str, str]]:
    """Each bad case: (file to corrupt, pattern of the expected message)."""
    return {
        "wrong magic": ("train-images-idx3-ubyte.gz", r"magic number 0x00000801, not 0x00000803"),
        "truncated": ("train-images-idx3-ubyte.gz", r"is truncated: its header gives shape \[40, 28, 28\]"),
        "counts disagree": (
            "train-labels-idx1-ubyte.gz",
            r"holds 40 images but .*train-labels-idx1-ubyte.gz holds 39 labels",
        ),
        "label out of range": ("train-labels-idx1-ubyte.gz", r"label 10 at index 5 is outside 0-9"),
        "empty": ("train-images-idx3-ubyte.gz", r"train-images-idx3-ubyte.gz is empty"),
        "gz that is not gzip": ("train-images-idx3-ubyte.gz", r"is named .gz but is not a gzip file"),
        "gzip cut short": ("train-images-idx3-ubyte.gz", r"is a gzip file that is cut short"),
        "gzip damaged": ("train-images-idx3-ubyte.gz", r"is not a valid gzip file"),
    }


@pytest.mark.parametrize("case", list(_bad_files(Path("."))))
def test_bad_fashion_mnist_files_name_the_file(tmp_path, case):
    folder = write_fashion(tmp_path / "fm")
    name, pattern = _bad_files(folder)[case]
    path = folder / name
    raw = gzip.decompress(path.read_bytes())
    if case == "wrong magic":
        bad = gzip.compress(struct.pack(">I", 0x801) + raw[4:])
    elif case == "truncated":
        bad = gzip.compress(raw[:-100])
    elif case == "counts disagree":
        bad = gzip.compress(struct.pack(">II", 0x801, 39) + raw[8:-1])
    elif case == "label out of range":
        body = bytearray(raw)
        body[8 + 5] = 10
        bad = gzip.compress(bytes(body))
    elif case == "empty":
        bad = b""
    elif case == "gz that is not gzip":
        bad = raw  # uncompressed bytes under a .gz name
    elif case == "gzip cut short":
        bad = gzip.compress(raw)[:-200]
    else:  # a byte flipped inside the deflate stream
        packed = bytearray(gzip.compress(raw))
        for at in range(20, len(packed) - 20, 97):
            packed[at] ^= 0xFF
        bad = bytes(packed)
    path.write_bytes(bad)
    with pytest.raises(DataError, match=pattern) as caught:
        FashionMNIST("train", folder)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_missing_folder_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        FashionMNIST("train", tmp_path / "nope")
    with pytest.raises(DataError, match="does not hold the Fashion-MNIST files"):
        FashionMNIST("train", tmp_path)


def test_torchvision_layout_and_plain_files(tmp_path):
    write_fashion(tmp_path / "FashionMNIST" / "raw", gz=False)
    assert len(FashionMNIST("train", tmp_path)) == 40


def test_download_failure_is_one_clear_line(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "absent")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", offline)
    with pytest.raises(DataError, match="could not be downloaded .*name resolution.*pass --data-dir"):
        FashionMNIST("train")


@st.composite
def idx_files(draw):
    ndim = draw(st.integers(0, 4))
    header = bytes(
        [
            draw(st.sampled_from([0, 0, 0, 1])),
            draw(st.sampled_from([0, 0, 0, 7])),
            draw(st.sampled_from([0x08, 0x08, 0x09, 0x0D])),
            ndim,
        ]
    )
    shape = draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim))
    size = int(np.prod(shape)) if shape else 1
    length = draw(st.one_of(st.just(size), st.integers(0, size + 5)))
    body = bytes(draw(st.binary(min_size=length, max_size=length)))
    dims = struct.pack(f">{ndim}I", *shape)
    cut = draw(st.one_of(st.none(), st.integers(0, 4 + 4 * ndim)))  # a header cut short
    data = (header + dims)[:cut] if cut is not None else header + dims + body
    return data, draw(st.booleans()), draw(st.integers(1, 3))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(idx_files())
def test_reader_returns_the_array_or_a_clear_error(case):
    data, gz, want_ndim = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("f.gz" if gz else "f")
        path.write_bytes(gzip.compress(data) if gz else data)
        valid_header = len(data) >= 4 + 4 * want_ndim and data[:4] == bytes([0, 0, 0x08, want_ndim])
        if valid_header:
            shape = struct.unpack(f">{want_ndim}I", data[4 : 4 + 4 * want_ndim])
            body = data[4 + 4 * want_ndim :]
            valid = len(body) == int(np.prod(shape))
        else:
            valid = False
        if valid:
            got = read_idx(path, want_ndim)
            expected = np.frombuffer(body, dtype=np.uint8).reshape(shape)
            assert got.shape == expected.shape and np.array_equal(got.numpy(), expected)
        else:
            with pytest.raises(DataError) as caught:
                read_idx(path, want_ndim)
            assert str(path) in str(caught.value)


def test_resize_matches_the_seeds_pil_resize():
    """The batched resize gives what d2l's transforms.Resize + ToTensor gave, up to
    PIL's rounding to 8 bits."""
    from torchvision import transforms

    image = torch.randint(0, 256, (28, 28), dtype=torch.uint8)
    ours, label = ResizeBatch(112, 1)([(image, 7)])
    seed_way = transforms.Compose([transforms.Resize(112), transforms.ToTensor()])(Image.fromarray(image.numpy()))
    assert ours.shape == (1, 1, 112, 112) and label.tolist() == [7]
    torch.testing.assert_close(ours[0], seed_way, rtol=0, atol=1.5 / 255)
    three, _ = ResizeBatch(112, 3)([(image, 7)])
    assert three.shape == (1, 3, 112, 112) and torch.equal(three[:, 0], three[:, 2])
    with pytest.raises(ConfigError, match="1 or 3 channels"):
        ResizeBatch(112, 2)


# --------------------------------------------------------------------------- loaders


def _positions(loader, epochs, stop_after=None):
    """Every batch of ``epochs`` epochs, as label lists (and image sums)."""
    seen = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        for images, labels in loader:
            seen.append((epoch, labels.tolist(), round(float(images.sum()), 3)))
            if stop_after is not None and len(seen) == stop_after:
                return seen
    return seen


def test_replicas_split_the_global_batch_and_towers_agree(tmp_path):
    folder = write_fashion(tmp_path / "fm", n_train=40)
    kw = dict(image_size=32, in_channels=1, global_batch=8, seed=5, data_dir=folder)
    replicas = [build_loaders("fashion-mnist", dp_rank=r, dp_size=2, **kw) for r in (0, 1)]
    tower_b = build_loaders("fashion-mnist", dp_rank=1, dp_size=2, **kw)  # a second rank of replica 1
    assert replicas[0].batch_size == 4 and len(replicas[0].train) == 5
    keys = [list(loaders.train.sampler) for loaders in replicas]
    assert sorted(i for k in keys for _, i in k) == list(range(40))  # disjoint and complete
    assert _positions(tower_b.train, [0, 1]) == _positions(replicas[1].train, [0, 1])
    assert _positions(replicas[0].train, [0]) != _positions(replicas[0].train, [1])  # reshuffled per epoch
    images, labels = next(iter(replicas[0].train))
    assert images.shape == (4, 1, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    test_items = [i for loaders in replicas for _, i in loaders.test.sampler]
    assert sorted(test_items) == list(range(12))  # every test image once, no padding
    with pytest.raises(ConfigError, match="global batch of 9 does not divide over 2"):
        build_loaders("fashion-mnist", dp_rank=0, dp_size=2, **{**kw, "global_batch": 9})


@pytest.mark.parametrize("stop_after,workers", [(3, 0), (5, 0), (7, 0), (3, 1)])  # mid-epoch, at an
def test_resumed_loader_sees_the_same_batches(tmp_path, stop_after, workers):  # epoch's end, in epoch 1
    folder = write_fashion(tmp_path / "fm", n_train=37)  # 5 batches of 8, the last one short
    kw = dict(image_size=30, in_channels=3, global_batch=8, seed=1, data_dir=folder, num_workers=workers)
    unbroken = _positions(build_loaders("fashion-mnist", **kw).train, [0, 1, 2])
    first = build_loaders("fashion-mnist", **kw).train
    before = _positions(first, [0, 1, 2], stop_after=stop_after)
    state = first.state_dict()
    resumed = build_loaders("fashion-mnist", **kw).train
    resumed.load_state_dict(state)
    after = _positions(resumed, range(state["epoch"], 3))
    assert before + after == unbroken


def test_train_subset(tmp_path):
    folder = write_fashion(tmp_path / "fm", n_train=40)
    loaders = build_loaders(
        "fashion-mnist", image_size=28, in_channels=1, global_batch=4, data_dir=folder, train_subset=10
    )
    assert len(loaders.train.dataset) == 10 and len(loaders.test.dataset) == 12
    with pytest.raises(ConfigError, match="--train-subset 41 must be between 1 and 40"):
        build_loaders("fashion-mnist", image_size=28, in_channels=1, global_batch=4, data_dir=folder, train_subset=41)


# --------------------------------------------------------------------------- image folders


def write_folder(root: Path, classes=("cat", "dog"), per_class=(3, 2), size=(40, 30)) -> Path:
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.jpg")
    return root


def test_folder_batches_and_ten_crop(tmp_path):
    root = write_folder(tmp_path / "imgs")
    loaders = build_loaders(root, image_size=64, in_channels=3, global_batch=4, num_workers=0, ten_crop=True)
    assert loaders.num_classes == 2 and loaders.classes == ("cat", "dog")
    loaders.train.set_epoch(0)
    images, labels = next(iter(loaders.train))
    assert images.shape == (4, 3, 64, 64) and labels.shape == (4,)
    crops, labels = next(iter(loaders.test))
    assert crops.shape == (4, 10, 3, 64, 64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64 * 64, 2))
    probs = ten_crop_predict(model, crops)
    manual = torch.stack([torch.softmax(model(crops[:, k]), 1) for k in range(10)]).mean(0)
    torch.testing.assert_close(probs, manual)
    torch.testing.assert_close(probs.sum(1), torch.ones(4))
    gray = build_loaders(root, image_size=64, in_channels=1, global_batch=2, num_workers=0)
    assert next(iter(gray.train))[0].shape == (2, 1, 64, 64)


def test_augmentation_is_a_function_of_seed_epoch_and_image(tmp_path):
    root = write_folder(tmp_path / "imgs")
    datasets = [
        build_loaders(root, image_size=64, in_channels=3, global_batch=2, num_workers=0, seed=s).train.dataset
        for s in (0, 0, 1)
    ]
    a, b, other_seed = (d[(0, 2)][0] for d in datasets)
    assert torch.equal(a, b) and not torch.equal(a, other_seed)
    assert not torch.equal(datasets[0][(0, 2)][0], datasets[0][(1, 2)][0])  # next epoch, new crop


def test_pca_lighting_adds_the_published_colour_shift():
    torch.manual_seed(3)
    alpha = torch.randn(3) * 0.1
    torch.manual_seed(3)
    image = torch.rand(3, 8, 8)
    torch.manual_seed(3)
    shifted = PCALighting()(image)
    expected = torch.tensor(IMAGENET_EIGENVECTORS) @ (alpha * torch.tensor(IMAGENET_EIGENVALUES))
    torch.testing.assert_close(shifted - image, expected.view(3, 1, 1).expand(3, 8, 8))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: a decompression bomb as PIL sees it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("not an image", r"is not an image that PIL can read"),
        ("truncated", r"is truncated or damaged: "),
        ("bomb", r"is refused as a possible decompression bomb: [\d,]+ pixels, over PIL's limit"),
        ("over the warning limit", r"is refused as a possible decompression bomb: [\d,]+ pixels, over PIL's limit"),
    ],
)
def test_bad_images_name_the_file(tmp_path, case, pattern):
    root = write_folder(tmp_path / "imgs")
    bad = root / "train" / "dog" / "1.jpg"
    if case == "not an image":
        bad.write_text("these are not the pixels you are looking for\n")
    elif case == "truncated":
        bad.write_bytes(bad.read_bytes()[:400])
    elif case == "bomb":
        bad = bad.with_suffix(".png")
        bad.write_bytes(_png_header_only(20_000, 20_000))  # 4e8 pixels: over twice PIL's limit
    else:
        bad = bad.with_suffix(".png")
        bad.write_bytes(_png_header_only(10_000, 10_000))  # 1e8: only a warning in PIL
    with pytest.raises(DataError, match=pattern):
        load_image(bad)
    # Through a loader with a worker process: the same single line, naming the file.
    loaders = build_loaders(root, image_size=32, in_channels=3, global_batch=8, num_workers=1)
    loaders.train.set_epoch(0)
    with pytest.raises(DataError, match=pattern) as caught:
        for _ in loaders.train:
            pass
    assert str(bad) in str(caught.value) and "\n" not in str(caught.value)


def test_bad_folders(tmp_path):
    kw = dict(image_size=32, in_channels=3, global_batch=2)
    with pytest.raises(ConfigError, match="data folder .*nope does not exist"):
        build_loaders(tmp_path / "nope", **kw)
    root = write_folder(tmp_path / "imgs")
    for f in (root / "val").rglob("*.jpg"):
        f.unlink()
    with pytest.raises(DataError, match=r"val: Found no valid file for the classes cat, dog"):
        build_loaders(root, **kw)
    for d in (root / "val").iterdir():
        d.rmdir()
    with pytest.raises(DataError, match=r"Couldn't find any class folder in .*val"):
        build_loaders(root, **kw)
    (root / "val").rmdir()
    with pytest.raises(ConfigError, match=r"image folder .*val does not exist"):
        build_loaders(root, **kw)
    other = write_folder(tmp_path / "other")
    (other / "val" / "dog").rename(other / "val" / "wolf")
    with pytest.raises(DataError, match=r"train/ and val/ hold different classes .*only in val: \['wolf'\]"):
        build_loaders(other, **kw)


def test_download_goes_through_a_scratch_folder(tmp_path, monkeypatch):
    """The download path with the network replaced by local copies of the files."""
    import torchvision.datasets
    import torchvision.datasets.utils

    source = write_fashion(tmp_path / "mirror")

    def local_copy(url, root, filename, md5):
        (Path(root) / filename).write_bytes((source / filename).read_bytes())

    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "absent")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", local_copy)
    dataset = FashionMNIST("test")
    assert len(dataset) == 12 and dataset.folder == tmp_path / "cache" / "alexnet2gpu" / "fashion-mnist"
    expected = sorted(name for name, _ in torchvision.datasets.FashionMNIST.resources)
    assert sorted(p.name for p in dataset.folder.iterdir()) == expected  # no scratch folder left
