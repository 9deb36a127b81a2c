"""Where a model runs, decided in one place: :class:`Layout` and :func:`resolve_layout`.

Placements of the two-tower net (DESIGN.md section 3), and the one of a single-stream net:

=========  ===================================================  ==========================
name       where the towers run                                 exchange
=========  ===================================================  ==========================
towers     both on one device, one after the other              ``torch.cat``
grouped    the fused ``groups=2`` single-stream net, one device  inside the kernels
split      tower a (and fc8) on device 0, tower b on device 1   device-to-device copies
ranks      one tower per process under torchrun                 autograd-aware collectives
single     a single-stream net (simplified, half, torchvision)  none
auto       ranks under torchrun, split with 2+ GPUs, else grouped on one device
           (single for a single-stream net)
=========  ===================================================  ==========================

Under ``ranks`` with ``WORLD_SIZE = 2k`` global rank ``2 * replica + tower`` holds tower
``tower`` of data-parallel replica ``replica`` (the row-major order of the (k, 2)
``("dp", "tower")`` device mesh); :attr:`Layout.replica` and :attr:`Layout.tower` are the
only place that arithmetic is done.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from .names import PLACEMENTS, TWO_TOWER_PLACEMENTS

__all__ = [
    "PLACEMENTS",
    "TWO_TOWER_PLACEMENTS",
    "Layout",
    "TorchrunEnv",
    "check_available",
    "default_device",
    "own_forward_placement",
    "parse_devices",
    "resolve_layout",
]

log = logging.getLogger("alexnet2gpu")

_DEVICES_NEEDED = {"towers": 1, "grouped": 1, "split": 2, "ranks": 1, "single": 1}
_LAUNCH_HINT = (
    "launch one process per tower with torchrun, e.g. "
    "`torchrun --nproc-per-node 2 -m alexnet2gpu train --placement ranks ...`"
)


@dataclass(frozen=True)
class TorchrunEnv:
    """What torchrun told this process: rank, local rank, world size, and how many
    processes run on this node (``LOCAL_WORLD_SIZE``, torchrun's ``--nproc-per-node``)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @classmethod
    def from_environ(cls) -> TorchrunEnv:
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        )

    @property
    def launched(self) -> bool:
        """True under torchrun (or any launcher that sets WORLD_SIZE)."""
        return "WORLD_SIZE" in os.environ

    @property
    def is_rank0(self) -> bool:
        """Only rank 0 prints and writes."""
        return self.rank == 0


@dataclass(frozen=True)
class Layout:
    """Where a placed model runs. ``devices`` are this process's devices, in tower order
    for ``split``; ``world_size``, ``rank`` and ``dp_size`` describe a ``ranks`` job."""

    placement: str
    devices: tuple[torch.device, ...]
    world_size: int = 1
    dp_size: int = 1
    rank: int = 0
    reason: str = field(default="", compare=False)  # why `auto` chose this placement

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS or self.placement == "auto":
            raise ConfigError(f"unknown placement '{self.placement}': choose one of {', '.join(PLACEMENTS)}")
        need = _DEVICES_NEEDED[self.placement]
        if len(self.devices) != need:
            hint = " (e.g. --devices cuda:0,cuda:1, or --devices cpu,cpu to test)" if need == 2 else ""
            raise ConfigError(
                f"placement '{self.placement}' takes {need} device(s), got {len(self.devices)}: "
                f"{', '.join(map(str, self.devices)) or 'none'}{hint}"
            )
        if self.distributed:
            if self.world_size < 2 or self.world_size % 2:
                raise ConfigError(
                    f"placement 'ranks' needs an even WORLD_SIZE (two processes, one per tower, for each "
                    f"data-parallel replica), got WORLD_SIZE={self.world_size}: use --nproc-per-node 2 or 4, "
                    "or --nnodes N --nproc-per-node 2"
                )
            if self.dp_size != self.world_size // 2:
                raise ConfigError(
                    f"world size {self.world_size} is {self.world_size // 2} replicas of 2 towers, not {self.dp_size}"
                )
        elif self.world_size != 1 or self.dp_size != 1:
            raise ConfigError(
                f"placement '{self.placement}' runs in one process, got world size "
                f"{self.world_size} and {self.dp_size} replica(s)"
            )
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.placement == "split" and self.devices[0] == self.devices[1] and self.device.type == "cuda":
            # On one GPU the "exchanges" copy nothing, yet the counter would report their bytes as
            # sent; cpu,cpu stays allowed: it is split's CPU test, counting what two GPUs would send.
            raise ConfigError(
                f"placement 'split' on {self.device},{self.device} runs both towers on one GPU with no "
                "copies between devices, yet would count their bytes as exchanged: use two GPUs "
                f"(cuda:0,cuda:1), {self.device},cpu for a real cross-device run on one GPU, or "
                "--placement grouped on the one GPU"
            )

    @property
    def distributed(self) -> bool:
        """One tower per process (``ranks``): the loss is a collective and so is the state dict."""
        return self.placement == "ranks"

    @property
    def device(self) -> torch.device:
        """The device that receives the input and holds fc8 and the loss."""
        return self.devices[0]

    @property
    def two_towers(self) -> bool:
        """The net has two towers (every placement but ``single``)."""
        return self.placement != "single"

    @property
    def towers_apart(self) -> bool:
        """The towers sit on different devices (``split``, ``ranks``): memory is per device."""
        return self.placement in ("split", "ranks")

    @property
    def fused(self) -> bool:
        """Both towers' kernels run as one fused convolution per layer (``grouped``)."""
        return self.placement == "grouped"

    @property
    def replica(self) -> int:
        """This process's data-parallel replica (0 outside ``ranks``)."""
        return self.rank // 2 if self.distributed else 0

    @property
    def tower(self) -> int:
        """The tower this process holds under ``ranks`` (0: a, with fc8; 1: b)."""
        return self.rank % 2 if self.distributed else 0

    @property
    def is_rank0(self) -> bool:
        """Only rank 0 prints and writes."""
        return self.rank == 0

    def describe(self) -> str:
        """The devices in words, e.g. ``cpu``, ``cuda:0,cuda:1``, ``2 processes (1 x 2 towers) on cpu (gloo)``."""
        if self.distributed:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            return f"{self.world_size} processes ({self.dp_size} x 2 towers) on {self.device.type} ({backend})"
        return ",".join(str(d) for d in self.devices)


def own_forward_placement(two_tower: bool) -> str:
    """The placement that runs a model's own ``forward`` on one device: ``towers`` for the
    two-tower net (the reference), ``single`` for a single-stream net."""
    return "towers" if two_tower else "single"


def default_device() -> torch.device:
    """The first GPU where there is one, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def parse_devices(spec: str | list | tuple | None) -> list[torch.device] | None:
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


def _choose_auto(two_tower: bool, env: TorchrunEnv) -> tuple[str, list[torch.device] | None, str]:
    if not two_tower:
        return "single", None, "a single-stream net runs on one device"
    if env.world_size > 1:
        return "ranks", None, f"WORLD_SIZE={env.world_size}: one tower per process"
    cuda = torch.cuda.device_count()
    if cuda >= 2:
        return (
            "split",
            [torch.device("cuda", 0), torch.device("cuda", 1)],
            (f"{cuda} CUDA devices: tower a on cuda:0, tower b on cuda:1"),
        )
    if cuda == 1:
        return "grouped", [torch.device("cuda", 0)], "1 CUDA device: the fused grouped net on cuda:0"
    return "grouped", [torch.device("cpu")], "no CUDA device: the fused grouped net on the CPU"


def _local_device(devices: list[torch.device] | None, local_rank: int) -> torch.device:
    """``cuda:LOCAL_RANK`` where CUDA exists, else the CPU; ``devices`` overrides: one device
    for every process (e.g. ``cpu``), or one per local rank."""
    if devices is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if len(devices) == 1:
        return devices[0]
    if local_rank < len(devices):
        return devices[local_rank]
    raise ConfigError(
        f"--devices lists {len(devices)} devices but this is local rank {local_rank}: "
        "give one device for every process (e.g. cpu) or one per local rank"
    )


def _one_gpu_hint(processes: int) -> str:
    return (
        f"use a machine with {processes} GPUs, or --devices cpu to run the ranks on the CPU with gloo, "
        "or run without torchrun with --placement grouped (or towers) on one GPU"
    )


def _check_one_process_per_gpu(devices: list[torch.device] | None, env: TorchrunEnv, plan: bool) -> None:
    """NCCL takes one process per GPU ("Duplicate GPU detected" otherwise): refuses a CUDA
    device that two local ranks of this node would share, and (unless ``plan``) a local
    rank whose GPU this machine lacks, e.g. ``cuda:LOCAL_RANK`` with more processes than
    GPUs. Every local rank checks the whole node, so all of them refuse with one line."""
    processes = max(env.local_world_size, env.local_rank + 1)
    count = torch.cuda.device_count()
    if devices is None:
        if plan or not torch.cuda.is_available() or processes <= count:
            return
        raise ConfigError(
            f"placement 'ranks' runs one process per GPU: {processes} processes on this node "
            f"(torchrun --nproc-per-node {processes}) need cuda:0 to cuda:{processes - 1} and this machine "
            f"has {count} CUDA device(s): {_one_gpu_hint(processes)}"
        )
    known = range(processes) if len(devices) == 1 else range(min(processes, len(devices)))
    sharing: dict[torch.device, list[int]] = {}
    for local_rank in known:
        device = _local_device(devices, local_rank)
        if device.type == "cuda":
            sharing.setdefault(device, []).append(local_rank)
    for device, ranks in sharing.items():
        if len(ranks) > 1:
            raise ConfigError(
                "placement 'ranks' runs one process per GPU and NCCL refuses two processes on one GPU "
                f"({device} for local ranks {', '.join(map(str, ranks[:-1]))} and {ranks[-1]}): "
                f"{_one_gpu_hint(processes)}"
            )
        if not plan and device.index >= count:
            raise ConfigError(
                f"placement 'ranks' puts local rank {ranks[0]} on {device} and this machine has {count} "
                f"CUDA device(s): {_one_gpu_hint(processes)}"
            )


def _ranks_layout(devices: list[torch.device] | None, env: TorchrunEnv, reason: str, plan: bool) -> Layout:
    if not env.launched:
        raise ConfigError(f"placement 'ranks' runs one tower per process and needs torchrun: {_LAUNCH_HINT}")
    _check_one_process_per_gpu(devices, env, plan)
    device = _local_device(devices, env.local_rank)
    return Layout(
        "ranks",
        (device,),
        world_size=env.world_size,
        dp_size=max(1, env.world_size // 2),
        rank=env.rank,
        reason=reason or f"WORLD_SIZE={env.world_size}: {env.world_size // 2} replica(s) x 2 towers",
    )


def resolve_layout(
    placement: str = "auto", devices=None, *, two_tower: bool = True, plan: bool = False, env: TorchrunEnv | None = None
) -> Layout:
    """The :class:`Layout` for ``placement`` on ``devices`` (a list or ``"cuda:0,cuda:1"``;
    None: the placement's default), for the two-tower net or (``two_tower=False``) a
    single-stream one. ``auto`` chooses and says why in ``reason``. ``plan``: the model is
    on the meta device, so the devices need not exist (``summary`` plans ``split`` on a
    machine without GPUs)."""
    if placement not in PLACEMENTS:
        raise ConfigError(f"unknown placement '{placement}': choose one of {', '.join(PLACEMENTS)}")
    env = env or TorchrunEnv.from_environ()
    devices = parse_devices(devices)
    reason = ""
    if placement == "auto":
        placement, auto_devices, reason = _choose_auto(two_tower, env)
        devices = devices or auto_devices
        log.info("placement auto -> %s (%s)", placement, reason)
    if two_tower and placement == "single":
        raise ConfigError(
            "placement 'single' is for the single-stream nets; the two-tower net 'dual' runs "
            f"as {', '.join(TWO_TOWER_PLACEMENTS)} (or auto)"
        )
    if not two_tower and placement != "single":
        raise ConfigError(
            f"placement '{placement}' splits the two-tower net 'dual'; a single-stream net "
            "runs on one device: use --placement auto (or single)"
        )
    if placement == "ranks":
        layout = _ranks_layout(devices, env, reason, plan)
    else:
        if devices is None and placement == "split":
            count = torch.cuda.device_count()
            if count < 2 and not plan:
                raise ConfigError(
                    f"placement 'split' needs two CUDA devices and this machine has {count}: "
                    "use --placement grouped (one device), or --devices cpu,cpu to test split on the CPU"
                )
            devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
        layout = Layout(placement, tuple(devices or [default_device()]), reason=reason)
    if not plan:
        check_available(list(layout.devices))
    return layout
