"""The ``split`` placement: tower a (and fc8) on the first device, tower b on the second
([paper] section 3.2), exchanging activations by device-to-device copies."""

from __future__ import annotations

import torch
from torch import nn

from ..models.dual import DualAlexNet
from .layout import Layout
from .schedule import ExchangeCounter, PlacedDual

__all__ = ["SplitDualAlexNet"]


class _Send(torch.autograd.Function):
    """``tensor.to(device)`` that counts its bytes, and its gradient's bytes on the way back."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, device: torch.device, counter: ExchangeCounter) -> torch.Tensor:
        ctx.source, ctx.counter = tensor.device, counter
        counter.add(tensor)
        return tensor.to(device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.counter.add(grad)
        return grad.to(ctx.source), None, None


class _CopyExchange:
    """Exchanges as copies between the towers' devices: at 1-3 each tower's output goes
    to the other device; at 4 tower b's fc7 output goes to the first device, for fc8."""

    def __init__(self, device_a: torch.device, device_b: torch.device, counter: ExchangeCounter) -> None:
        self.device_a, self.device_b, self.counter = device_a, device_b, counter

    def _send(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        return _Send.apply(tensor, device, self.counter)

    def scatter(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x.to(self.device_a), x.to(self.device_b)]

    def join(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        out_a, out_b = outputs
        return [
            torch.cat([out_a, self._send(out_b, self.device_a)], dim=1),  # b -> a
            torch.cat([self._send(out_a, self.device_b), out_b], dim=1),  # a -> b
        ]

    def head(self, outputs: list[torch.Tensor], fc8: nn.Module | None) -> torch.Tensor:
        out_a, out_b = outputs
        return fc8(torch.cat([out_a, self._send(out_b, self.device_a)], dim=1))  # exchange 4, b -> a


class SplitDualAlexNet(PlacedDual):
    """Tensors cross between the devices only at the exchanges: the image to tower b, each
    tower's output to the other device at exchanges 1-3 (conv3, fc6, fc7), and tower b's
    fc7 output to the first device for fc8 (exchange 4). Kernels are launched
    asynchronously, so on two GPUs the towers compute at the same time.

    The two devices need not be of one type: on a machine with one GPU, ``cuda:0,cpu``
    runs the same copies, forward and backward, for real between two devices (tower b on
    the CPU). ``cpu,cpu`` copies nothing but counts what two GPUs would send; the same GPU
    twice is refused (:class:`~.layout.Layout`)."""

    def __init__(self, model: DualAlexNet, layout: Layout) -> None:
        super().__init__(model, layout)
        self.exchange_counter = ExchangeCounter()
        self.exchange = _CopyExchange(*layout.devices, self.exchange_counter)
