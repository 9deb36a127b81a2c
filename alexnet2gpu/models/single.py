"""The single-stream nets: the seed's simplified AlexNet, the paper's one-GPU comparison
net (``half``), and torchvision's AlexNet (built by torchvision, never copied).

Sources: [paper] section 3.2; [d2l] 8.1.2; torchvision ``models/alexnet.py``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .init import init_paper_, init_xavier_
from .layers import Conv1Padding, paper_lrn
from .sizes import POOL_KERNEL, POOL_STRIDE, check_image_size, check_input, scaled

__all__ = ["HALF_WIDTHS", "SIMPLIFIED_WIDTHS", "HalfAlexNet", "SimplifiedAlexNet", "build_torchvision_alexnet"]

# The one-GPU comparison net, [paper] section 3.2 ("half as many kernels in every
# convolutional layer", the last convolutional and the fully connected layers kept).
HALF_WIDTHS = {"conv1": 48, "conv2": 128, "conv3": 192, "conv4": 192, "conv5": 256, "fc": 4096}
# The seed's net, [d2l] 8.1.2.
SIMPLIFIED_WIDTHS = {"conv1": 96, "conv2": 256, "conv3": 384, "conv4": 384, "conv5": 256, "fc": 4096}


def _features(
    in_channels: int, widths: dict[str, int], conv1_padding: nn.Module | None, conv1_pad: int, lrn: bool
) -> list[tuple[str, nn.Module]]:
    """conv1-conv5 with ReLU, optional LRN, and overlapping pooling, as named layers."""
    c1, c2, c3, c4, c5 = (widths[k] for k in ("conv1", "conv2", "conv3", "conv4", "conv5"))
    layers: list[tuple[str, nn.Module]] = []
    if conv1_padding is not None:
        layers.append(("pad1", conv1_padding))
    layers += [("conv1", nn.Conv2d(in_channels, c1, 11, stride=4, padding=conv1_pad)), ("relu1", nn.ReLU())]
    layers += [("norm1", paper_lrn())] if lrn else []
    layers += [
        ("pool1", nn.MaxPool2d(POOL_KERNEL, POOL_STRIDE)),
        ("conv2", nn.Conv2d(c1, c2, 5, padding=2)),
        ("relu2", nn.ReLU()),
    ]
    layers += [("norm2", paper_lrn())] if lrn else []
    layers += [
        ("pool2", nn.MaxPool2d(POOL_KERNEL, POOL_STRIDE)),
        ("conv3", nn.Conv2d(c2, c3, 3, padding=1)),
        ("relu3", nn.ReLU()),
        ("conv4", nn.Conv2d(c3, c4, 3, padding=1)),
        ("relu4", nn.ReLU()),
        ("conv5", nn.Conv2d(c4, c5, 3, padding=1)),
        ("relu5", nn.ReLU()),
        ("pool5", nn.MaxPool2d(POOL_KERNEL, POOL_STRIDE)),
        ("flatten", nn.Flatten()),
    ]
    return layers


def _classifier(in_features: int, fc: int, num_classes: int, dropout: float) -> list[tuple[str, nn.Module]]:
    return [
        ("fc6", nn.Linear(in_features, fc)),
        ("relu6", nn.ReLU()),
        ("drop6", nn.Dropout(dropout)),
        ("fc7", nn.Linear(fc, fc)),
        ("relu7", nn.ReLU()),
        ("drop7", nn.Dropout(dropout)),
        ("fc8", nn.Linear(fc, num_classes)),
    ]


class _Checked(nn.Sequential):
    in_channels: int
    image_size: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, self.image_size)
        return super().forward(x)


class SimplifiedAlexNet(_Checked):
    """The seed's single-stream AlexNet ([d2l] 8.1.2): one tower of 96/256/384/384/256
    kernels, no LRN, Xavier-uniform initialisation as d2l's ``init_cnn``."""

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 224,
        width: float = 1.0,
        dropout: float = 0.5,
    ) -> None:
        side = check_image_size("simplified", image_size)
        w = {k: scaled(v, width) for k, v in SIMPLIFIED_WIDTHS.items()}
        super().__init__(
            OrderedDict(
                _features(in_channels, w, None, 1, lrn=False)
                + _classifier(w["conv5"] * side * side, w["fc"], num_classes, dropout)
            )
        )
        self.in_channels, self.num_classes, self.image_size = in_channels, num_classes, image_size
        init_xavier_(self)


class HalfAlexNet(_Checked):
    """The paper's one-GPU comparison net ([paper] section 3.2): half the kernels in
    conv1-conv4, conv5 and the fully connected layers at full width, LRN and overlapping
    pooling as in the two-tower net, the paper's initialisation."""

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 1000,
        image_size: int = 227,
        width: float = 1.0,
        dropout: float = 0.5,
    ) -> None:
        side = check_image_size("half", image_size)
        w = {k: scaled(v, width) for k, v in HALF_WIDTHS.items()}
        super().__init__(
            OrderedDict(
                _features(in_channels, w, Conv1Padding(image_size), 0, lrn=True)
                + _classifier(w["conv5"] * side * side, w["fc"], num_classes, dropout)
            )
        )
        self.in_channels, self.num_classes, self.image_size = in_channels, num_classes, image_size
        init_paper_(self)


def build_torchvision_alexnet(
    *, in_channels: int = 3, num_classes: int = 1000, image_size: int = 227, width: float = 1.0, dropout: float = 0.5
) -> nn.Module:
    """torchvision's AlexNet (the "One weird trick" single tower), built by
    ``torchvision.models.alexnet``. For ``in_channels != 3`` or ``width != 1`` its conv and
    linear layers are rebuilt at the new widths, keeping everything else of torchvision's."""
    import torchvision

    check_image_size("torchvision", image_size)
    model = torchvision.models.alexnet(weights=None, num_classes=num_classes, dropout=dropout)
    if in_channels != 3 or width != 1.0:
        prev = in_channels
        for i, layer in enumerate(model.features):
            if isinstance(layer, nn.Conv2d):
                out = scaled(layer.out_channels, width)
                model.features[i] = nn.Conv2d(prev, out, layer.kernel_size, layer.stride, layer.padding)
                prev = out
        prev *= 6 * 6  # torchvision's AdaptiveAvgPool2d((6, 6))
        linears = [i for i, layer in enumerate(model.classifier) if isinstance(layer, nn.Linear)]
        for i in linears:
            layer = model.classifier[i]
            out = layer.out_features if i == linears[-1] else scaled(layer.out_features, width)
            model.classifier[i] = nn.Linear(prev, out)
            prev = out
    model.in_channels, model.num_classes, model.image_size = in_channels, num_classes, image_size
    return model
