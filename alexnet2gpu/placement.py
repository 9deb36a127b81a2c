"""Where a model runs: one validated :class:`Layout` and one :func:`place` call.

Placements of the two-tower net (DESIGN.md section 3):

=========  ===================================================  ==========================
name       where the towers run                                 exchange
=========  ===================================================  ==========================
towers     both on one device, one after the other              ``torch.cat``
grouped    the fused ``groups=2`` single-stream net, one device  inside the kernels
split      tower a (and fc8) on device 0, tower b on device 1   device-to-device copies
ranks      one tower per process under torchrun                 autograd-aware collectives
auto       ranks under torchrun, split with 2+ GPUs, else grouped on one device
=========  ===================================================  ==========================

The model itself never changes: a placement moves its towers and supplies the forward
that joins them, and every placed model keeps the parameter names of
:class:`~alexnet2gpu.models.DualAlexNet`, so state dicts and checkpoints move freely
between placements. The single-stream nets (``simplified``, ``half``, ``torchvision``)
have one placement: one device.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .models import DualAlexNet, Tower

__all__ = ["PLACEMENTS", "ExchangeCounter", "Layout", "place", "parse_devices", "default_device", "devices_of"]

log = logging.getLogger("alexnet2gpu")

PLACEMENTS = ("auto", "towers", "grouped", "split", "ranks")
_DEVICES_NEEDED = {"towers": 1, "grouped": 1, "split": 2}


@dataclass(frozen=True)
class Layout:
    """Where a placed model runs. ``devices`` are this process's devices, in tower order
    for ``split``; ``world_size`` and ``dp_size`` describe a ``ranks`` job."""

    placement: str
    devices: tuple[torch.device, ...]
    world_size: int = 1
    dp_size: int = 1
    reason: str = field(default="", compare=False)  # why `auto` chose this placement

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS or self.placement == "auto":
            raise ConfigError(
                f"unknown placement '{self.placement}': choose one of {', '.join(PLACEMENTS)}"
            )
        need = _DEVICES_NEEDED.get(self.placement)
        if need is not None and len(self.devices) != need:
            hint = " (e.g. --devices cuda:0,cuda:1, or --devices cpu,cpu to test)" if need == 2 else ""
            raise ConfigError(
                f"placement '{self.placement}' takes {need} device(s), got {len(self.devices)}: "
                f"{', '.join(map(str, self.devices)) or 'none'}{hint}"
            )
        if self.world_size < 1 or self.dp_size < 1 or self.world_size % self.dp_size:
            raise ConfigError(
                f"world size {self.world_size} is not a whole number of data-parallel "
                f"replicas ({self.dp_size})"
            )


def default_device() -> torch.device:
    """The first GPU where there is one, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def parse_devices(spec: str | list[str] | tuple | None) -> list[torch.device] | None:
    """``"cuda:0,cuda:1"``, ``["cpu", "cpu"]`` or ``None``; a bare ``cuda`` means cuda:0."""
    if spec is None:
        return None
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    devices = []
    for item in items:
        try:
            device = torch.device(item)
        except (RuntimeError, TypeError):
            raise ConfigError(f"'{item}' is not a device: use e.g. cpu, cuda:0, cuda:1") from None
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", 0)
        devices.append(device)
    if not devices:
        raise ConfigError("the device list is empty: use e.g. cpu, cuda:0 or cuda:0,cuda:1")
    return devices


def check_available(devices: list[torch.device]) -> None:
    """Refuses devices this machine does not have, naming what it has."""
    count = torch.cuda.device_count()
    for device in devices:
        if device.type == "cuda" and device.index >= count:
            raise ConfigError(
                f"device {device} was requested but this machine has {count} CUDA device(s)"
                + ("; use cpu (or --devices cpu,cpu for split)" if count == 0 else "")
            )
        if device.type not in ("cpu", "cuda", "meta"):
            raise ConfigError(f"device type '{device.type}' is not supported: use cpu or cuda:N")


def _is_plan(model: nn.Module) -> bool:
    """A model on the meta device is a plan: placing it allocates nothing real."""
    return any(p.is_meta for p in model.parameters())


def _move(module: nn.Module, device: torch.device, plan: bool) -> nn.Module:
    # A plan is materialised uninitialised (as torchtitan does); under FakeTensorMode that
    # makes fake tensors on `device`, which need no such device to exist.
    return module.to_empty(device=device) if plan else module.to(device)


def devices_of(model: nn.Module) -> tuple[torch.device, ...]:
    """The devices a placed model uses, in order."""
    layout = getattr(model, "layout", None)
    if layout is not None:
        return layout.devices
    return tuple(dict.fromkeys(p.device for p in model.parameters()))


def _choose_auto() -> tuple[str, list[torch.device], str]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.device_count()
    if world > 1:
        return "ranks", [], f"WORLD_SIZE={world}: one tower per process"
    if cuda >= 2:
        return "split", [torch.device("cuda", 0), torch.device("cuda", 1)], (
            f"{cuda} CUDA devices: tower a on cuda:0, tower b on cuda:1"
        )
    if cuda == 1:
        return "grouped", [torch.device("cuda", 0)], "1 CUDA device: the fused grouped net on cuda:0"
    return "grouped", [torch.device("cpu")], "no CUDA device: the fused grouped net on the CPU"


class _PlacedDual(nn.Module):
    """Holds the towers and fc8 of a :class:`DualAlexNet` under the same names."""

    def __init__(self, model: DualAlexNet, layout: Layout) -> None:
        super().__init__()
        self.tower_a, self.tower_b, self.fc8 = model.tower_a, model.tower_b, model.fc8
        self.in_channels, self.num_classes = model.in_channels, model.num_classes
        self.image_size = model.image_size
        self.layout = layout

    towers = DualAlexNet.towers
    check_input = DualAlexNet.check_input


def _fused_conv(x: torch.Tensor, a: nn.Conv2d, b: nn.Conv2d, groups: int) -> torch.Tensor:
    """One convolution with both towers' kernels: groups=2 where each tower sees only its
    own channels (conv2, conv4, conv5), groups=1 where both see everything (conv1, conv3)."""
    weight = torch.cat([a.weight, b.weight])
    bias = torch.cat([a.bias, b.bias])
    return F.conv2d(x, weight, bias, stride=a.stride, padding=a.padding, groups=groups)


def _lrn_within_towers(x: torch.Tensor, norm: nn.LocalResponseNorm) -> torch.Tensor:
    """LRN over each tower's channels, never across the boundary between the towers."""
    n, c, h, w = x.shape
    return norm(x.reshape(n * 2, c // 2, h, w)).reshape(n, c, h, w)


class GroupedDualAlexNet(_PlacedDual):
    """The same function as one single-stream net (Caffe's ``bvlc_alexnet`` layout):
    conv2, conv4 and conv5 are ``groups=2`` convolutions, LRN works within each tower.
    The fully connected layers are dense over both towers in any case, so each tower's
    fc6/fc7 runs on the joined input as it does in ``towers``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        a, b = self.tower_a, self.tower_b
        h = a.relu1(_fused_conv(a.pad1(x), a.conv1, b.conv1, groups=1))
        h = a.pool1(_lrn_within_towers(h, a.norm1))
        h = a.relu2(_fused_conv(h, a.conv2, b.conv2, groups=2))
        h = a.pool2(_lrn_within_towers(h, a.norm2))
        h = a.relu3(_fused_conv(h, a.conv3, b.conv3, groups=1))  # exchange 1, in the kernel
        h = a.relu4(_fused_conv(h, a.conv4, b.conv4, groups=2))
        h = a.relu5(_fused_conv(h, a.conv5, b.conv5, groups=2))
        h = a.flatten(a.pool5(h))  # tower a's channels first, as torch.cat orders them
        for stage in (2, 3):
            h = torch.cat([a.stage(stage, h), b.stage(stage, h)], dim=1)
        return self.fc8(h)


class ExchangeCounter:
    """Bytes that crossed between the towers' devices, forward and backward, counted at
    the exchanges themselves (so ``split`` on ``cpu,cpu`` counts what two GPUs would send)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.transfers = 0

    def add(self, tensor: torch.Tensor) -> None:
        self.bytes += tensor.numel() * tensor.element_size()
        self.transfers += 1

    def reset(self) -> None:
        self.bytes = self.transfers = 0


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


class SplitDualAlexNet(_PlacedDual):
    """Tower a and fc8 on the first device, tower b on the second ([paper] section 3.2).

    Tensors cross between the devices only here: the image to tower b, each tower's output
    to the other device at exchanges 1-3 (conv3, fc6, fc7), and tower b's fc7 output to the
    first device for fc8 (exchange 4). Kernels are launched asynchronously, so on two GPUs
    the towers compute at the same time."""

    def __init__(self, model: DualAlexNet, layout: Layout) -> None:
        super().__init__(model, layout)
        self.exchange_counter = ExchangeCounter()

    def send(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        return _Send.apply(tensor, device, self.exchange_counter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        dev_a, dev_b = self.layout.devices
        a, b = self.tower_a, self.tower_b
        h_a, h_b = x.to(dev_a), x.to(dev_b)
        for stage in range(Tower.NUM_STAGES - 1):
            out_a, out_b = a.stage(stage, h_a), b.stage(stage, h_b)
            h_a = torch.cat([out_a, self.send(out_b, dev_a)], dim=1)  # exchanges 1-3, b -> a
            h_b = torch.cat([self.send(out_a, dev_b), out_b], dim=1)  # exchanges 1-3, a -> b
        out_a, out_b = a.stage(3, h_a), b.stage(3, h_b)
        return self.fc8(torch.cat([out_a, self.send(out_b, dev_a)], dim=1))  # exchange 4, b -> a


def place(model: nn.Module, placement: str = "auto", devices=None) -> nn.Module:
    """Places ``model`` and returns the module to call; its ``layout`` says where it runs.

    ``devices`` is a list (or comma-separated string) of devices: one for ``towers`` and
    ``grouped`` (default: the first GPU, else the CPU), two for ``split`` (default:
    cuda:0, cuda:1). ``auto`` chooses and says why in ``layout.reason`` (and the log).
    A model built on the meta device is a plan: it is materialised uninitialised, which
    under ``FakeTensorMode`` allocates nothing and needs none of the devices.
    """
    if placement not in PLACEMENTS:
        raise ConfigError(f"unknown placement '{placement}': choose one of {', '.join(PLACEMENTS)}")
    devices = parse_devices(devices)
    plan = _is_plan(model)
    reason = ""
    if placement == "auto":
        if not isinstance(model, DualAlexNet):
            placement, reason = "towers", "a single-stream net runs on one device"
            devices = devices or [default_device()]
        else:
            placement, auto_devices, reason = _choose_auto()
            devices = devices or auto_devices
        log.info("placement auto -> %s (%s)", placement, reason)
    if not isinstance(model, DualAlexNet) and placement != "towers":
        raise ConfigError(
            f"placement '{placement}' splits the two-tower net 'dual'; a single-stream net "
            "runs on one device: use --placement auto (or towers)"
        )
    if placement == "ranks":
        from .ranks import place_ranks  # torch.distributed only where it is used

        return place_ranks(model, devices)
    if devices is None:
        if placement == "split":
            count = torch.cuda.device_count()
            if count < 2 and not plan:
                raise ConfigError(
                    f"placement 'split' needs two CUDA devices and this machine has {count}: "
                    "use --placement grouped (one device), or --devices cpu,cpu to test split on the CPU"
                )
            devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
        else:
            devices = [default_device()]
    if not plan:
        check_available(devices)
    layout = Layout(placement, tuple(devices), reason=reason)
    if placement == "split":
        _move(model.tower_a, devices[0], plan)
        _move(model.tower_b, devices[1], plan)
        _move(model.fc8, devices[0], plan)
        placed: nn.Module = SplitDualAlexNet(model, layout)
    else:
        _move(model, devices[0], plan)
        placed = GroupedDualAlexNet(model, layout) if placement == "grouped" else model
    placed.layout = layout
    return placed
