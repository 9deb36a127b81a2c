"""The 2012 two-tower AlexNet (``dual``) and its schedule: the one place that says which
layers read both towers. Placements (:mod:`alexnet2gpu.parallel`) run the same schedule
and supply only how an exchange happens.

Sources:
  [paper]  Krizhevsky, Sutskever, Hinton, "ImageNet Classification with Deep
           Convolutional Neural Networks", NIPS 2012.
  [cfg]    computerhistory/AlexNet-Source-Code, layers/layers-145.cfg (the released
           two-GPU net; the same net is cuda-convnet2's layers-imagenet-2gpu-model.cfg).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from .init import init_paper_
from .layers import Conv1Padding, TowerDropout, paper_lrn
from .sizes import POOL_KERNEL, POOL_STRIDE, check_image_size, check_input, pool5_size, scaled

__all__ = ["DUAL_TOWER_WIDTHS", "NUM_STAGES", "ConcatExchange", "DualAlexNet", "Exchange", "Tower", "run_towers"]

# Widths of one tower, [paper] section 3.5 and figure 2: 48, 128, 192, 192, 128 kernels,
# 2048 units in each fully connected layer.
DUAL_TOWER_WIDTHS = {"conv1": 48, "conv2": 128, "conv3": 192, "conv4": 192, "conv5": 128, "fc": 2048}
# A tower's stages, separated by the exchanges (see Tower).
NUM_STAGES = 4

Stage = Callable[[int, torch.Tensor], torch.Tensor]


class Exchange(Protocol):
    """How activations cross between the towers; a placement supplies one.

    ``scatter`` gives each local column its copy of the image; ``join`` is exchanges 1-3
    (the inputs of conv3, fc6 and fc7 read both towers); ``head`` is exchange 4 and fc8,
    on the first device ([cfg]: fc8, softmax and loss on the first GPU)."""

    def scatter(self, x: torch.Tensor) -> list[torch.Tensor]: ...

    def join(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]: ...

    def head(self, outputs: list[torch.Tensor], fc8: nn.Module | None) -> torch.Tensor: ...


def run_towers(stages: Sequence[Stage], x: torch.Tensor, exchange: Exchange, fc8: nn.Module | None) -> torch.Tensor:
    """The two-tower schedule ([paper] figure 2), written once for every placement:
    stage 0, exchange 1, stage 1, exchange 2, stage 2, exchange 3, stage 3, exchange 4 and
    fc8. ``stages`` are this process's columns: both towers, one fused pair, or one tower."""
    inputs = exchange.scatter(x)
    for index in range(NUM_STAGES):
        outputs = [stage(index, h) for stage, h in zip(stages, inputs)]
        if index < NUM_STAGES - 1:
            inputs = exchange.join(outputs)
    return exchange.head(outputs, fc8)


class ConcatExchange:
    """Both towers on one device: an exchange is ``torch.cat`` along channels, tower a first."""

    def scatter(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x, x]

    def join(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        joined = torch.cat(outputs, dim=1)
        return [joined, joined]

    def head(self, outputs: list[torch.Tensor], fc8: nn.Module | None) -> torch.Tensor:
        return fc8(torch.cat(outputs, dim=1))


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

    def __init__(self, tower: int, in_channels: int, image_size: int, widths: dict[str, int], dropout: float) -> None:
        super().__init__()
        c1, c2, c3, c4, c5, fc = (widths[k] for k in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc"))
        side = pool5_size("dual", image_size)
        self.pad1 = Conv1Padding(image_size)
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=11, stride=4)  # [paper] 3.5
        self.relu1 = nn.ReLU()
        self.norm1 = paper_lrn()
        self.pool1 = nn.MaxPool2d(POOL_KERNEL, POOL_STRIDE)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5, padding=2)  # own tower only
        self.relu2 = nn.ReLU()
        self.norm2 = paper_lrn()
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
        raise IndexError(f"a tower has stages 0-{NUM_STAGES - 1}, not {index}")


class DualAlexNet(nn.Module):
    """The 2012 two-tower AlexNet ([paper] section 3.5, figure 2).

    Its own ``forward`` runs both towers on one device, one after the other, and joins
    them with ``torch.cat``: the reference every placement must match. Parameter names
    (``tower_a.conv1.weight`` ... ``fc8.bias``) are the same in every placement.

    Departures from the paper text: none in this module. The released code's differences
    (LRN before ReLU in conv1, std 0.03 in conv3-5, ...) are left out on purpose and listed
    in docs/architecture.md. fc8 is one layer over both towers, as in the released code
    [cfg] (the paper's figure draws it split).
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
        check_image_size("dual", image_size)
        widths = {k: scaled(v, width) for k, v in DUAL_TOWER_WIDTHS.items()}
        self.in_channels, self.num_classes, self.image_size = in_channels, num_classes, image_size
        self.tower_a = Tower(0, in_channels, image_size, widths, dropout)
        self.tower_b = Tower(1, in_channels, image_size, widths, dropout)
        self.fc8 = nn.Linear(2 * widths["fc"], num_classes)  # exchange 4: on the first device
        init_paper_(self)

    @property
    def towers(self) -> tuple[Tower, Tower]:
        return self.tower_a, self.tower_b

    def check_input(self, x: torch.Tensor) -> None:
        check_input(x, self.in_channels, self.image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return run_towers((self.tower_a.stage, self.tower_b.stage), x, ConcatExchange(), self.fc8)
