"""The networks: the 2012 two-tower AlexNet (`dual`), its one-GPU peer (`half`),
the seed's single-stream net (`simplified`) and torchvision's AlexNet (`torchvision`).

Every model here is a plain ``nn.Module`` with no device inside; where the towers of
``dual`` run is decided by :mod:`alexnet2gpu.placement`.

Sources, cited next to each constant:
  [paper]  Krizhevsky, Sutskever, Hinton, "ImageNet Classification with Deep
           Convolutional Neural Networks", NIPS 2012.
  [cfg]    computerhistory/AlexNet-Source-Code, layers/layers-145.cfg (the released
           two-GPU net; the same net is cuda-convnet2's layers-imagenet-2gpu-model.cfg).
  [d2l]    Dive into Deep Learning, section 8.1 "Deep Convolutional Neural Networks".
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

__all__ = [
    "MODEL_NAMES",
    "DualAlexNet",
    "Tower",
    "TowerDropout",
    "SimplifiedAlexNet",
    "HalfAlexNet",
    "build_model",
    "seed_dropout",
    "smallest_image_size",
]

# Local response normalisation, [paper] section 3.3: k=2, n=5, alpha=1e-4, beta=0.75.
# PyTorch (like Caffe) divides alpha by n inside the sum; see docs/architecture.md.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0
# Overlapping pooling, [paper] section 3.4: z=3, s=2.
POOL_KERNEL, POOL_STRIDE = 3, 2
# Widths of one tower, [paper] section 3.5 and figure 2: 48, 128, 192, 192, 128 kernels,
# 2048 units in each fully connected layer.
DUAL_TOWER_WIDTHS = {"conv1": 48, "conv2": 128, "conv3": 192, "conv4": 192, "conv5": 128, "fc": 2048}
# The one-GPU comparison net, [paper] section 3.2 ("half as many kernels in every
# convolutional layer", the last convolutional and the fully connected layers kept).
HALF_WIDTHS = {"conv1": 48, "conv2": 128, "conv3": 192, "conv4": 192, "conv5": 256, "fc": 4096}
# The seed's net, [d2l] 8.1.2.
SIMPLIFIED_WIDTHS = {"conv1": 96, "conv2": 256, "conv3": 384, "conv4": 384, "conv5": 256, "fc": 4096}

# Defaults per model: (in_channels, num_classes, image_size).
# 227 for the 2012 nets: the released code fed 224 crops and let conv1's last window run
# 3 pixels off the edge (see Conv1Padding); Caffe's bvlc_alexnet feeds 227.
DEFAULTS = {
    "dual": (3, 1000, 227),
    "half": (3, 1000, 227),
    "torchvision": (3, 1000, 227),
    "simplified": (1, 10, 224),  # [d2l] Fashion-MNIST resized to 224
}
MODEL_NAMES = tuple(DEFAULTS)


def _scaled(width: int, multiplier: float) -> int:
    """A layer width times the width multiplier, at least 1."""
    return max(1, round(width * multiplier))


def _pooled(size: int) -> int:
    return (size - POOL_KERNEL) // POOL_STRIDE + 1


def _conv1_out_2012(image_size: int) -> int:
    # cuda-convnet sizes conv1's output as 1 + ceil((imgSize - filterSize) / stride) [cfg],
    # letting the last window hang off the right and bottom edge.
    return 1 + math.ceil((image_size - 11) / 4)


def _pool5_size(name: str, image_size: int) -> int:
    """Side of the last pooled feature map, <= 0 when the image is too small."""
    if image_size < 11:
        return 0
    if name in ("dual", "half"):
        s = _conv1_out_2012(image_size)
    elif name == "simplified":
        s = (image_size + 2 * 1 - 11) // 4 + 1  # conv1 pad 1 [d2l]
    else:
        s = (image_size + 2 * 2 - 11) // 4 + 1  # torchvision: conv1 pad 2
    for _ in range(3):
        if s < POOL_KERNEL:
            return 0
        s = _pooled(s)
    return s


def smallest_image_size(name: str) -> int:
    """The smallest square input the named net accepts."""
    return next(s for s in range(11, 4096) if _pool5_size(name, s) >= 1)


def _check_image_size(name: str, image_size: int) -> int:
    side = _pool5_size(name, image_size)
    if side < 1:
        raise ConfigError(
            f"image size {image_size} is too small for '{name}': the smallest that works is "
            f"{smallest_image_size(name)}"
        )
    return side


def _check_input(x: torch.Tensor, in_channels: int, image_size: int) -> None:
    if x.dim() != 4 or x.shape[1] != in_channels or x.shape[2] != image_size or x.shape[3] != image_size:
        raise ValueError(
            f"expected a batch of shape [N, {in_channels}, {image_size}, {image_size}], "
            f"got {list(x.shape)}"
        )


class Conv1Padding(nn.Module):
    """Pads right and bottom so that conv1 (11x11, stride 4) covers the image the way the
    released code did: 224 -> 227 -> 55x55 [cfg]. A no-op at 227."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.pad = (_conv1_out_2012(image_size) - 1) * 4 + 11 - image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, self.pad, 0, self.pad)) if self.pad else x

    def extra_repr(self) -> str:
        return f"right_bottom={self.pad}"


def _tower_seed(seed: int, tower: int, replica: int) -> int:
    """A 63-bit generator seed per (run seed, data-parallel replica, tower)."""
    digest = hashlib.sha256(f"alexnet2gpu/{seed}/{replica}/{tower}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class TowerDropout(nn.Module):
    """Dropout whose masks come from this tower's own generator, not the global RNG.

    Every placement then draws the same masks for the same run seed: whether the towers run
    one after the other, fused, on two devices or in two processes ([paper] section 4.2,
    p = 0.5 in fc6 and fc7). The generator lives on the device of the activations and is
    (re)created from ``seed`` when that device changes; :func:`seed_dropout` sets the seed.
    """

    def __init__(self, p: float, tower: int) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {p}")
        self.p = p
        self.tower = tower
        self.seed = _tower_seed(0, tower, 0)
        self.generator: torch.Generator | None = None

    def reseed(self, seed: int, replica: int = 0) -> None:
        self.seed = _tower_seed(seed, self.tower, replica)
        self.generator = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        # Masks are drawn in float32 whatever the activations' dtype, so that a float64
        # reference and a float32 run draw the same masks.
        mask = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        if x.is_meta or torch._subclasses.fake_tensor.is_fake(x):
            # Planning without hardware: masks carry no values, so no generator is needed.
            mask.bernoulli_(keep)
        else:
            if self.generator is None or self.generator.device != x.device:
                self.generator = torch.Generator(device=x.device).manual_seed(self.seed)
            mask.bernoulli_(keep, generator=self.generator)
        return x * mask.to(x.dtype) * (1.0 / keep)

    def extra_repr(self) -> str:
        return f"p={self.p}, tower={self.tower}"


def seed_dropout(model: nn.Module, seed: int, replica: int = 0) -> None:
    """Seeds every tower's dropout generator from one run seed (and the replica index
    under data parallelism, so that replicas draw different masks)."""
    for module in model.modules():
        if isinstance(module, TowerDropout):
            module.reseed(seed, replica)


class Tower(nn.Module):
    """One column of the 2012 net ([paper] figure 2), in four stages separated by the
    exchanges between the towers:

    ==========  =======================================================  ==============
    stage       layers                                                   input
    ==========  =======================================================  ==============
    0           conv1, ReLU, LRN, pool, conv2, ReLU, LRN, pool           the image
    1           conv3, ReLU, conv4, ReLU, conv5, ReLU, pool, flatten     both towers
    2           fc6, ReLU, dropout                                       both towers
    3           fc7, ReLU, dropout                                       both towers
    ==========  =======================================================  ==============

    conv2, conv4 and conv5 see only their own tower; conv3, fc6 and fc7 see both
    ([paper] section 3.5). fc8 is not part of a tower: it sits on the first device [cfg].
    """

    NUM_STAGES = 4

    def __init__(
        self,
        tower: int,
        in_channels: int,
        image_size: int,
        widths: dict[str, int],
        dropout: float,
    ) -> None:
        super().__init__()
        c1, c2, c3, c4, c5, fc = (widths[k] for k in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc"))
        side = _pool5_size("dual", image_size)
        self.pad1 = Conv1Padding(image_size)
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=11, stride=4)  # [paper] 3.5
        self.relu1 = nn.ReLU()
        self.norm1 = nn.LocalResponseNorm(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K)
        self.pool1 = nn.MaxPool2d(POOL_KERNEL, POOL_STRIDE)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5, padding=2)  # own tower only
        self.relu2 = nn.ReLU()
        self.norm2 = nn.LocalResponseNorm(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K)
        self.pool2 = nn.MaxPool2d(POOL_KERNEL, POOL_STRIDE)
        self.conv3 = nn.Conv2d(2 * c2, c3, kernel_size=3, padding=1)  # exchange 1: both towers
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(c3, c4, kernel_size=3, padding=1)  # own tower only
        self.relu4 = nn.ReLU()
        self.conv5 = nn.Conv2d(c4, c5, kernel_size=3, padding=1)  # own tower only
        self.relu5 = nn.ReLU()
        self.pool5 = nn.MaxPool2d(POOL_KERNEL, POOL_STRIDE)
        self.flatten = nn.Flatten()
        self.fc6 = nn.Linear(2 * c5 * side * side, fc)  # exchange 2: both towers
        self.relu6 = nn.ReLU()
        self.fc7 = nn.Linear(2 * fc, fc)  # exchange 3: both towers
        self.relu7 = nn.ReLU()
        self.dropout = TowerDropout(dropout, tower)  # one generator, used after fc6 and fc7

    def stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Runs stage ``index`` (0-3) of this tower on ``x``."""
        if index == 0:
            x = self.pool1(self.norm1(self.relu1(self.conv1(self.pad1(x)))))
            return self.pool2(self.norm2(self.relu2(self.conv2(x))))
        if index == 1:
            x = self.relu4(self.conv4(self.relu3(self.conv3(x))))
            return self.flatten(self.pool5(self.relu5(self.conv5(x))))
        if index == 2:
            return self.dropout(self.relu6(self.fc6(x)))
        if index == 3:
            return self.dropout(self.relu7(self.fc7(x)))
        raise IndexError(f"a tower has stages 0-3, not {index}")


class DualAlexNet(nn.Module):
    """The 2012 two-tower AlexNet ([paper] section 3.5, figure 2).

    Its own ``forward`` runs both towers on one device, one after the other, and joins
    them with ``torch.cat``: the reference every placement must match. Parameter names
    (``tower_a.conv1.weight`` ... ``fc8.bias``) are the same in every placement.

    Departures from the paper text, all documented in docs/architecture.md: none in this
    module; the released code's differences (LRN before ReLU in conv1, std 0.03 in
    conv3-5, ...) are left out on purpose. fc8 is one layer over both towers, as in the
    released code [cfg] (the paper's figure draws it split).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 1000,
        image_size: int = 227,
        width: float = 1.0,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        _check_image_size("dual", image_size)
        widths = {k: _scaled(v, width) for k, v in DUAL_TOWER_WIDTHS.items()}
        self.in_channels, self.num_classes, self.image_size = in_channels, num_classes, image_size
        self.tower_a = Tower(0, in_channels, image_size, widths, dropout)
        self.tower_b = Tower(1, in_channels, image_size, widths, dropout)
        self.fc8 = nn.Linear(2 * widths["fc"], num_classes)  # exchange 4: on the first device
        init_paper_(self)

    @property
    def towers(self) -> tuple[Tower, Tower]:
        return self.tower_a, self.tower_b

    def check_input(self, x: torch.Tensor) -> None:
        _check_input(x, self.in_channels, self.image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        h_a = h_b = x
        for stage in range(Tower.NUM_STAGES):
            joined = torch.cat([self.tower_a.stage(stage, h_a), self.tower_b.stage(stage, h_b)], dim=1)
            h_a = h_b = joined
        return self.fc8(joined)


def _features(in_channels: int, widths: dict[str, int], conv1_padding: nn.Module | None,
              conv1_pad: int, lrn: bool) -> list[tuple[str, nn.Module]]:
    """conv1-conv5 with ReLU, optional LRN, and overlapping pooling, as named layers."""
    c1, c2, c3, c4, c5 = (widths[k] for k in ("conv1", "conv2", "conv3", "conv4", "conv5"))
    norm = lambda: nn.LocalResponseNorm(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K)  # noqa: E731
    layers: list[tuple[str, nn.Module]] = []
    if conv1_padding is not None:
        layers.append(("pad1", conv1_padding))
    layers += [("conv1", nn.Conv2d(in_channels, c1, 11, stride=4, padding=conv1_pad)), ("relu1", nn.ReLU())]
    layers += [("norm1", norm())] if lrn else []
    layers += [("pool1", nn.MaxPool2d(POOL_KERNEL, POOL_STRIDE)),
               ("conv2", nn.Conv2d(c1, c2, 5, padding=2)), ("relu2", nn.ReLU())]
    layers += [("norm2", norm())] if lrn else []
    layers += [
        ("pool2", nn.MaxPool2d(POOL_KERNEL, POOL_STRIDE)),
        ("conv3", nn.Conv2d(c2, c3, 3, padding=1)), ("relu3", nn.ReLU()),
        ("conv4", nn.Conv2d(c3, c4, 3, padding=1)), ("relu4", nn.ReLU()),
        ("conv5", nn.Conv2d(c4, c5, 3, padding=1)), ("relu5", nn.ReLU()),
        ("pool5", nn.MaxPool2d(POOL_KERNEL, POOL_STRIDE)),
        ("flatten", nn.Flatten()),
    ]
    return layers


def _classifier(in_features: int, fc: int, num_classes: int, dropout: float) -> list[tuple[str, nn.Module]]:
    return [
        ("fc6", nn.Linear(in_features, fc)), ("relu6", nn.ReLU()), ("drop6", nn.Dropout(dropout)),
        ("fc7", nn.Linear(fc, fc)), ("relu7", nn.ReLU()), ("drop7", nn.Dropout(dropout)),
        ("fc8", nn.Linear(fc, num_classes)),
    ]


class _Checked(nn.Sequential):
    in_channels: int
    image_size: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_channels, self.image_size)
        return super().forward(x)


class SimplifiedAlexNet(_Checked):
    """The seed's single-stream AlexNet ([d2l] 8.1.2): one tower of 96/256/384/384/256
    kernels, no LRN, Xavier-uniform initialisation as d2l's ``init_cnn``."""

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 224,
                 width: float = 1.0, dropout: float = 0.5) -> None:
        side = _check_image_size("simplified", image_size)
        w = {k: _scaled(v, width) for k, v in SIMPLIFIED_WIDTHS.items()}
        super().__init__(OrderedDict(
            _features(in_channels, w, None, 1, lrn=False)
            + _classifier(w["conv5"] * side * side, w["fc"], num_classes, dropout)
        ))
        self.in_channels, self.num_classes, self.image_size = in_channels, num_classes, image_size
        init_xavier_(self)


class HalfAlexNet(_Checked):
    """The paper's one-GPU comparison net ([paper] section 3.2): half the kernels in
    conv1-conv4, conv5 and the fully connected layers at full width, LRN and overlapping
    pooling as in the two-tower net, the paper's initialisation."""

    def __init__(self, *, in_channels: int = 3, num_classes: int = 1000, image_size: int = 227,
                 width: float = 1.0, dropout: float = 0.5) -> None:
        side = _check_image_size("half", image_size)
        w = {k: _scaled(v, width) for k, v in HALF_WIDTHS.items()}
        super().__init__(OrderedDict(
            _features(in_channels, w, Conv1Padding(image_size), 0, lrn=True)
            + _classifier(w["conv5"] * side * side, w["fc"], num_classes, dropout)
        ))
        self.in_channels, self.num_classes, self.image_size = in_channels, num_classes, image_size
        init_paper_(self)


def build_torchvision_alexnet(*, in_channels: int = 3, num_classes: int = 1000, image_size: int = 227,
                              width: float = 1.0, dropout: float = 0.5) -> nn.Module:
    """torchvision's AlexNet (the "One weird trick" single tower), built by
    ``torchvision.models.alexnet``. For ``in_channels != 3`` or ``width != 1`` its conv and
    linear layers are rebuilt at the new widths, keeping everything else of torchvision's."""
    import torchvision

    _check_image_size("torchvision", image_size)
    model = torchvision.models.alexnet(weights=None, num_classes=num_classes, dropout=dropout)
    if in_channels != 3 or width != 1.0:
        prev = in_channels
        for i, layer in enumerate(model.features):
            if isinstance(layer, nn.Conv2d):
                out = _scaled(layer.out_channels, width)
                model.features[i] = nn.Conv2d(prev, out, layer.kernel_size, layer.stride, layer.padding)
                prev = out
        prev *= 6 * 6  # torchvision's AdaptiveAvgPool2d((6, 6))
        linears = [i for i, layer in enumerate(model.classifier) if isinstance(layer, nn.Linear)]
        for i in linears:
            layer = model.classifier[i]
            out = layer.out_features if i == linears[-1] else _scaled(layer.out_features, width)
            model.classifier[i] = nn.Linear(prev, out)
            prev = out
    model.in_channels, model.num_classes, model.image_size = in_channels, num_classes, image_size
    return model


def init_paper_(model: nn.Module) -> None:
    """[paper] section 5: weights from N(0, 0.01); biases 1 in conv2, conv4, conv5 and the
    hidden fully connected layers (fc6, fc7), 0 elsewhere."""
    ones = ("conv2", "conv4", "conv5", "fc6", "fc7")
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.constant_(module.bias, 1.0 if name.rsplit(".", 1)[-1] in ones else 0.0)


def init_xavier_(model: nn.Module) -> None:
    """[d2l] ``init_cnn``: Xavier-uniform weights, PyTorch's default biases (reset here too,
    so that a net first given the paper's biases of 1 ends up as d2l's would)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.reset_parameters()
            nn.init.xavier_uniform_(module.weight)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "dual": DualAlexNet,
    "half": HalfAlexNet,
    "simplified": SimplifiedAlexNet,
    "torchvision": build_torchvision_alexnet,
}


def build_model(
    name: str,
    *,
    in_channels: int | None = None,
    num_classes: int | None = None,
    image_size: int | None = None,
    width: float = 1.0,
    dropout: float = 0.5,
) -> nn.Module:
    """Builds one of ``MODEL_NAMES``; ``None`` takes that model's default
    (``dual``/``half``/``torchvision``: 3x227, 1000 classes; ``simplified``: 1x224, 10)."""
    if name not in _BUILDERS:
        raise ConfigError(f"unknown model '{name}': choose one of {', '.join(MODEL_NAMES)}")
    c, k, s = DEFAULTS[name]
    in_channels = c if in_channels is None else in_channels
    num_classes = k if num_classes is None else num_classes
    image_size = s if image_size is None else image_size
    for label, value in (("in_channels", in_channels), ("num_classes", num_classes), ("image_size", image_size)):
        if value < 1:
            raise ConfigError(f"{label} must be at least 1, got {value}")
    if not width > 0:
        raise ConfigError(f"width must be positive, got {width}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
    return _BUILDERS[name](in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                           width=width, dropout=dropout)
