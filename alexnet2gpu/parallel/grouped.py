"""The ``grouped`` placement: the two-tower net as one fused single-stream net on one
device (Caffe's ``bvlc_alexnet`` layout), where the exchanges happen inside the kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.dual import DualAlexNet
from .layout import Layout
from .schedule import PlacedDual

__all__ = ["GroupedDualAlexNet"]


def _fused_conv(x: torch.Tensor, a: nn.Conv2d, b: nn.Conv2d, groups: int) -> torch.Tensor:
    """One convolution with both towers' kernels: groups=2 where each tower sees only its
    own channels (conv2, conv4, conv5), groups=1 where both see everything (conv1, conv3)."""
    weight = torch.cat([a.weight, b.weight])
    bias = torch.cat([a.bias, b.bias])
    return F.conv2d(x, weight, bias, stride=a.stride, padding=a.padding, groups=groups)


class _FusedExchange:
    """One fused column holds both towers' channels (tower a first), so an exchange is
    nothing: the next fused layer reads them all."""

    def scatter(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x]

    def join(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return outputs

    def head(self, outputs: list[torch.Tensor], fc8: nn.Module | None) -> torch.Tensor:
        return fc8(outputs[0])


class GroupedDualAlexNet(PlacedDual):
    """The same function as one single-stream net: conv2, conv4 and conv5 are ``groups=2``
    convolutions and LRN works within each tower's channels (``groups=2``, no reshape).
    The fully connected layers are dense over both towers in any case, so each tower's
    fc6/fc7 (with its own dropout generator) runs on the joined input as in ``towers``."""

    exchange = _FusedExchange()

    def __init__(self, model: DualAlexNet, layout: Layout) -> None:
        super().__init__(model, layout)

    def columns(self) -> tuple:
        return (self.fused_stage,)

    def fused_stage(self, index: int, h: torch.Tensor) -> torch.Tensor:
        a, b = self.tower_a, self.tower_b
        if index == 0:
            h = a.relu1(_fused_conv(a.pad1(h), a.conv1, b.conv1, groups=1))
            h = a.pool1(a.norm1(h, groups=2))
            h = a.relu2(_fused_conv(h, a.conv2, b.conv2, groups=2))
            return a.pool2(a.norm2(h, groups=2))
        if index == 1:
            h = a.relu3(_fused_conv(h, a.conv3, b.conv3, groups=1))  # exchange 1, in the kernel
            h = a.relu4(_fused_conv(h, a.conv4, b.conv4, groups=2))
            h = a.relu5(_fused_conv(h, a.conv5, b.conv5, groups=2))
            return a.flatten(a.pool5(h))  # tower a's channels first, as torch.cat orders them
        return torch.cat([a.stage(index, h), b.stage(index, h)], dim=1)  # fc6, fc7
