"""What ``bench`` and ``memory`` run: a synthetic batch made on the device that takes the
input (no loader, no host-to-device copy in the timed loop), SGD with momentum, and one
training step, the same call for every placement."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import ConfigError
from ..parallel import FP32, Numerics, devices_of, forward_loss

__all__ = [
    "LR",
    "MOMENTUM",
    "check_batch_sizes",
    "compile_placed",
    "device_label",
    "make_batch",
    "make_optimizer",
    "parse_batch_sizes",
    "train_step",
]

LR, MOMENTUM = 0.01, 0.9  # [paper] section 5: SGD, momentum 0.9 (lr does not change the timing)


def parse_batch_sizes(spec: str | Iterable[int]) -> list[int]:
    """``"32,64,128"`` (or a list) to ``[32, 64, 128]``; refuses anything below 1."""
    if isinstance(spec, str):
        try:
            sizes = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"batch sizes '{spec}' are not whole numbers: use e.g. 32,64,128") from None
    else:
        sizes = [int(s) for s in spec]
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"batch sizes must be whole numbers >= 1, e.g. 32,64,128; got '{spec}'")
    return sizes


def check_batch_sizes(placed: nn.Module, sizes: list[int]) -> None:
    """Under ``ranks`` with k data-parallel replicas the batch is global: k must divide it."""
    for size in sizes:
        placed.layout.local_batch(size)


def device_label(placed: nn.Module) -> str:
    """Where a placed net runs, in a table cell (:meth:`~alexnet2gpu.parallel.Layout.label`)."""
    return placed.layout.label()


def make_batch(placed: nn.Module, batch_size: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic batch (this process's share of it under ``ranks``) on the device that
    takes the input, drawn from a seeded CPU generator and then moved (once, before anything
    is timed): every process and every device gets the same images for one seed, where a
    CUDA generator draws other numbers than the CPU's."""
    device = devices_of(placed)[0]
    n = placed.layout.local_batch(batch_size)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, placed.in_channels, placed.image_size, placed.image_size, generator=generator)
    y = torch.randint(0, placed.num_classes, (n,), generator=generator)
    return x.to(device), y.to(device)


def make_optimizer(placed: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 over this process's parameters ([paper] section 5)."""
    return torch.optim.SGD(placed.parameters(), lr=LR, momentum=MOMENTUM)


def train_step(
    placed: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    numerics: Numerics = FP32,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """One training step, the same call for every placement: forward and loss under the
    precision's autocast, backward (through ``scaler`` for float16), optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    with numerics.autocast(devices_of(placed)):
        loss = forward_loss(placed, x, y)
    if scaler is None or not scaler.is_enabled():
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def compile_placed(placed: nn.Module, *, backend: str = "inductor") -> nn.Module:
    """Compiles ``placed`` in place with ``torch.compile`` (static shapes: each batch size
    gets its own graph) and returns it: its ``__call__``, and under ``ranks`` also its own
    ``forward_loss``, which the training step calls instead. The first call of each mode
    and batch size compiles; :func:`~.bench.bench_placed` times that call apart.
    ``backend="eager"`` traces with Dynamo without generating code (fast: the tests)."""
    placed.compile(dynamic=False, backend=backend)
    if getattr(type(placed), "forward_loss", None) is not None:  # a placement whose loss is a collective
        placed.forward_loss = torch.compile(placed.forward_loss, dynamic=False, backend=backend)
    return placed
