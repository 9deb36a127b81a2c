"""What every placed two-tower net shares: the towers under the dual net's parameter
names, its :class:`~alexnet2gpu.parallel.layout.Layout`, and the byte counter of its
exchanges. The schedule itself is :func:`alexnet2gpu.models.dual.run_towers`; a placement
supplies its :class:`~alexnet2gpu.models.dual.Exchange` and the columns it runs.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from ..models.dual import DualAlexNet, Exchange, run_towers
from .layout import Layout

__all__ = ["ExchangeCounter", "PlacedDual", "wrap_children"]


class ExchangeCounter:
    """Bytes that crossed between the towers' devices, forward and backward, counted at
    the exchanges themselves (so ``split`` on ``cpu,cpu`` counts what two GPUs would send).

    Thread-safe: on two GPUs the autograd engine runs the backward in one thread per
    device, and both threads count the gradients they send back (a ``+=`` on an attribute
    is a read and a write, between which another thread may run)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        self.transfers = 0

    def add(self, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        with self._lock:
            self.bytes += size
            self.transfers += 1

    def reset(self) -> None:
        with self._lock:
            self.bytes = self.transfers = 0

    def __getstate__(self) -> dict:  # a lock does not copy or pickle: a copy gets its own
        with self._lock:
            return {"bytes": self.bytes, "transfers": self.transfers}

    def __setstate__(self, state: dict) -> None:
        self._lock = threading.Lock()
        self.bytes, self.transfers = state["bytes"], state["transfers"]


class PlacedDual(nn.Module):
    """Holds the towers and fc8 of a :class:`DualAlexNet` under the same names and runs the
    schedule with ``self.exchange``; a subclass sets the exchange (and, if it runs other
    columns than the two towers, overrides :meth:`columns`)."""

    exchange: Exchange

    def __init__(self, model: DualAlexNet, layout: Layout) -> None:
        super().__init__()
        self.tower_a, self.tower_b, self.fc8 = model.tower_a, model.tower_b, model.fc8
        self.in_channels, self.num_classes = model.in_channels, model.num_classes
        self.image_size = model.image_size
        self.layout = layout

    towers = DualAlexNet.towers
    check_input = DualAlexNet.check_input

    def columns(self) -> tuple:
        return self.tower_a.stage, self.tower_b.stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return run_towers(self.columns(), x, self.exchange, self.fc8)


def wrap_children(holder: nn.Module, net: nn.Module) -> None:
    """Registers ``net``'s children on ``holder`` under their own names (so that
    ``holder.state_dict()`` has ``net``'s keys: the placements that wrap a whole net,
    ``replicas`` and ``hybrid``) and copies its input facts (``in_channels``,
    ``num_classes``, ``image_size``)."""
    for name, child in net.named_children():
        holder.add_module(name, child)
    for attr in ("in_channels", "num_classes", "image_size"):
        if hasattr(net, attr):
            setattr(holder, attr, getattr(net, attr))
