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
replicas   any net, whole in every process under torchrun    DDP's gradient all-reduce
           (``dual`` as the fused grouped net): data parallel
hybrid     a single-stream net under torchrun: conv trunk      the trunk's gradients, and
           data parallel, fc6-fc8 tensor parallel (2014)       the fc activations (DTensor)
auto       ranks under torchrun (replicas for a single-stream net), split with 2+ GPUs,
           else towers on the CPU and grouped on one GPU (single for a single-stream net)
=========  ===================================================  ==========================

Under ``ranks`` with ``WORLD_SIZE = 2k`` global rank ``2 * replica + tower`` holds tower
``tower`` of data-parallel replica ``replica`` (the row-major order of the (k, 2)
``("dp", "tower")`` device mesh); under ``replicas`` and ``hybrid`` every rank is a
replica of its own (its own share of the global batch: ``dp_size = WORLD_SIZE``).
:attr:`Layout.replica` and :attr:`Layout.tower` are the only place that arithmetic is done.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from ..data.shares import local_batch
from ..errors import ConfigError
from .devices import check_available, default_device, parse_devices, set_cpu_threads
from .names import ANY_NET_PLACEMENTS, PLACEMENTS, PROCESS_PLACEMENTS, SINGLE_STREAM_PLACEMENTS, TWO_TOWER_PLACEMENTS

__all__ = [
    "PLACEMENTS",
    "TWO_TOWER_PLACEMENTS",
    "Layout",
    "TorchrunEnv",
    "check_available",
    "check_net",
    "default_device",
    "own_forward_placement",
    "parse_devices",
    "resolve_layout",
    "set_cpu_threads",
]

log = logging.getLogger("alexnet2gpu")

_DEVICES_NEEDED = {"towers": 1, "grouped": 1, "split": 2, "ranks": 1, "single": 1, "replicas": 1, "hybrid": 1}
_LAUNCH_WHAT = {
    "ranks": "one tower per process",
    "replicas": "one replica per process",
    "hybrid": "one worker per process",
}


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
    for ``split``; ``world_size``, ``rank`` and ``dp_size`` describe a torchrun job
    (``ranks``, ``replicas``, ``hybrid``). ``two_tower_net``: the net is ``dual`` (None:
    what the placement implies; only ``replicas`` runs both kinds)."""

    placement: str
    devices: tuple[torch.device, ...]
    world_size: int = 1
    dp_size: int = 1
    rank: int = 0
    reason: str = field(default="", compare=False)  # why `auto` chose this placement
    two_tower_net: bool | None = None

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS or self.placement == "auto":
            raise ConfigError(f"unknown placement '{self.placement}': choose one of {', '.join(PLACEMENTS)}")
        if self.two_tower_net is None:  # frozen: set once, here
            object.__setattr__(self, "two_tower_net", self.placement in TWO_TOWER_PLACEMENTS)
        check_net(self.placement, self.two_tower_net)
        need = _DEVICES_NEEDED[self.placement]
        if len(self.devices) != need:
            hint = " (e.g. --devices cuda:0,cuda:1, or --devices cpu,cpu to test)" if need == 2 else ""
            raise ConfigError(
                f"placement '{self.placement}' takes {need} device(s), got {len(self.devices)}: "
                f"{', '.join(map(str, self.devices)) or 'none'}{hint}"
            )
        if self.placement == "ranks":
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
        elif self.distributed:
            if self.dp_size != self.world_size:
                raise ConfigError(
                    f"placement '{self.placement}' makes every one of the {self.world_size} processes a "
                    f"data-parallel replica, not {self.dp_size}"
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
        """Several processes under torchrun (``ranks``, ``replicas``, ``hybrid``): the loss
        is summed over the ranks and the full state dict is a collective."""
        return self.placement in PROCESS_PLACEMENTS

    @property
    def device(self) -> torch.device:
        """The device that receives the input and holds fc8 and the loss."""
        return self.devices[0]

    @property
    def two_towers(self) -> bool:
        """The net has two towers (``dual``: every two-tower placement, and ``replicas`` of it)."""
        return bool(self.two_tower_net)

    @property
    def towers_apart(self) -> bool:
        """The towers sit on different devices (``split``, ``ranks``): memory is per device."""
        return self.placement in ("split", "ranks")

    @property
    def fused(self) -> bool:
        """Both towers' kernels run as one fused convolution per layer (``grouped``, and
        ``replicas`` of ``dual``, which holds the grouped net)."""
        return self.placement == "grouped" or (self.placement == "replicas" and self.two_towers)

    @property
    def replica(self) -> int:
        """This process's data-parallel replica, the share of the global batch it reads: ``rank
        // 2`` under ``ranks``, ``rank`` under ``replicas`` and ``hybrid``, else 0."""
        if self.placement == "ranks":
            return self.rank // 2
        return self.rank if self.distributed else 0

    @property
    def tower(self) -> int:
        """The tower this process holds under ``ranks`` (0: a, with fc8; 1: b); 0 elsewhere."""
        return self.rank % 2 if self.placement == "ranks" else 0

    @property
    def is_rank0(self) -> bool:
        """Only rank 0 prints and writes."""
        return self.rank == 0

    def local_batch(self, global_batch: int) -> int:
        """This process's share of ``global_batch``: the batch divided over the data-parallel
        replicas (``dp_size``), refused with the numbers when it does not divide."""
        return local_batch(global_batch, self.dp_size)

    def describe(self) -> str:
        """The devices in words, e.g. ``cpu``, ``cuda:0,cuda:1``, ``2 processes (1 x 2 towers) on cpu (gloo)``."""
        if self.distributed:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            what = {
                "ranks": f"{self.dp_size} x 2 towers",
                "replicas": f"{self.dp_size} replicas",
                "hybrid": f"trunk x {self.dp_size} replicas, fc6-fc8 split {self.world_size} ways",
            }[self.placement]
            return f"{self.world_size} processes ({what}) on {self.device.type} ({backend})"
        return ",".join(str(d) for d in self.devices)

    def label(self) -> str:
        """The devices in a table cell: ``cpu``, ``cuda:0,cuda:1``, ``cpu x2 processes``."""
        if self.distributed:
            return f"{self.device.type} x{self.world_size} processes"
        return ",".join(str(d) for d in self.devices)

    def slot_labels(self) -> list[str]:
        """One label per device slot of this process: ``cuda:0 (rank 1)`` under torchrun,
        ``cpu #0``/``cpu #1`` when split runs on ``cpu,cpu``, else the devices."""
        devices = [str(d) for d in self.devices]
        if self.distributed:
            return [f"{devices[0]} (rank {self.rank})"]
        if len(set(devices)) < len(devices):
            return [f"{d} #{i}" for i, d in enumerate(devices)]
        return devices


def check_net(placement: str, two_tower: bool) -> None:
    """Refuses a placement that does not fit the net: the two-tower ones for a single-stream
    net, ``single`` and ``hybrid`` for ``dual``."""
    if placement == "auto" or placement in ANY_NET_PLACEMENTS:
        return
    if two_tower and placement in SINGLE_STREAM_PLACEMENTS:
        if placement == "hybrid":
            raise ConfigError(
                "placement 'hybrid' splits a single stream's fc6-fc8 across the processes; the two-tower "
                "net 'dual' splits its towers with --placement ranks, or runs data parallel with "
                "--placement replicas"
            )
        raise ConfigError(
            "placement 'single' is for the single-stream nets; the two-tower net 'dual' runs "
            f"as {', '.join(TWO_TOWER_PLACEMENTS)}, replicas (or auto)"
        )
    if not two_tower and placement not in SINGLE_STREAM_PLACEMENTS:
        raise ConfigError(
            f"placement '{placement}' splits the two-tower net 'dual'; a single-stream net runs on one "
            "device (single), or under torchrun as replicas or hybrid: use --placement auto (or single)"
        )


def own_forward_placement(two_tower: bool) -> str:
    """The placement that runs a model's own ``forward`` on one device: ``towers`` for the
    two-tower net (the reference), ``single`` for a single-stream net."""
    return "towers" if two_tower else "single"


def _choose_auto(two_tower: bool, env: TorchrunEnv) -> tuple[str, list[torch.device] | None, str]:
    if not two_tower:
        if env.world_size > 1:
            return "replicas", None, f"WORLD_SIZE={env.world_size}: a single-stream net, one replica per process"
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
        # Not measured against towers on a GPU yet: the fused kernels are cuDNN's usual case.
        return "grouped", [default_device()], "1 CUDA device: the fused grouped net on cuda:0"
    # Measured on this project's CPU (docs/results.md, "dual/grouped against dual/towers"):
    # grouped trains at 0.88, 0.92, 0.83x the speed of towers (227 px, batch 64, one thread,
    # interleaved rounds), and at 0.79-0.88x in every measurement before: towers on the CPU.
    return "towers", [default_device()], "no CUDA device: both towers on the CPU (measured faster than grouped)"


def _local_device(devices: list[torch.device] | None, local_rank: int) -> torch.device:
    """``cuda:LOCAL_RANK`` where CUDA exists, else the CPU; ``devices`` overrides: one device
    for every process (e.g. ``cpu``), or one per local rank."""
    if devices is None:
        return default_device(local_rank)
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
        f"use a machine with {processes} GPUs, or --devices cpu to run the processes on the CPU with gloo, "
        "or run without torchrun on one GPU (--placement grouped or towers for dual, single for the others)"
    )


def _check_one_process_per_gpu(
    devices: list[torch.device] | None, env: TorchrunEnv, plan: bool, placement: str = "ranks"
) -> None:
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
            f"placement '{placement}' runs one process per GPU: {processes} processes on this node "
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
                f"placement '{placement}' runs one process per GPU and NCCL refuses two processes on one GPU "
                f"({device} for local ranks {', '.join(map(str, ranks[:-1]))} and {ranks[-1]}): "
                f"{_one_gpu_hint(processes)}"
            )
        if not plan and device.index >= count:
            raise ConfigError(
                f"placement '{placement}' puts local rank {ranks[0]} on {device} and this machine has {count} "
                f"CUDA device(s): {_one_gpu_hint(processes)}"
            )


def _process_layout(
    placement: str, devices: list[torch.device] | None, env: TorchrunEnv, reason: str, plan: bool, two_tower: bool
) -> Layout:
    """The layout of a torchrun placement (``ranks``, ``replicas``, ``hybrid``) for this process."""
    if not env.launched:
        raise ConfigError(
            f"placement '{placement}' runs {_LAUNCH_WHAT[placement]} and needs torchrun: launch it with "
            f"torchrun, e.g. `torchrun --nproc-per-node 2 -m alexnet2gpu COMMAND --placement {placement} ...` "
            "(train, bench, memory, summary)"
        )
    _check_one_process_per_gpu(devices, env, plan, placement)
    device = _local_device(devices, env.local_rank)
    if placement == "ranks":
        dp_size = max(1, env.world_size // 2)
        reason = reason or f"WORLD_SIZE={env.world_size}: {env.world_size // 2} replica(s) x 2 towers"
    else:
        dp_size = env.world_size
        reason = reason or f"WORLD_SIZE={env.world_size}: {_LAUNCH_WHAT[placement]}"
    return Layout(
        placement,
        (device,),
        world_size=env.world_size,
        dp_size=dp_size,
        rank=env.rank,
        reason=reason,
        two_tower_net=two_tower,
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
    check_net(placement, two_tower)
    if placement in PROCESS_PLACEMENTS:
        layout = _process_layout(placement, devices, env, reason, plan, two_tower)
    else:
        if devices is None and placement == "split":
            count = torch.cuda.device_count()
            if count < 2 and not plan:
                raise ConfigError(
                    f"placement 'split' needs two CUDA devices and this machine has {count}: "
                    "use --placement grouped (one device), or --devices cpu,cpu to test split on the CPU"
                )
            devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
        layout = Layout(placement, tuple(devices or [default_device()]), reason=reason, two_tower_net=two_tower)
    if not plan:
        check_available(list(layout.devices))
    return layout
