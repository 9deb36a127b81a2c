"""Memory records, and the accounting that both the estimator and the CUDA measurement
share: which device slot owns each part of the net, the bytes of parameters, gradients
and momentum by owner, the bytes exchanged in a step, and the per-device report.

A *slot* is a device as the placement sees it: ``split`` has two (tower a and fc8 on
slot 0, tower b on slot 1, even when it runs on ``cpu,cpu``), every other placement one
per process."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..parallel import FP32, Numerics

__all__ = [
    "CATEGORIES",
    "DeviceMemory",
    "MemoryReport",
    "build_report",
    "nbytes",
    "parts",
    "reset_exchange_counter",
    "rss_peak_bytes",
    "slot_labels",
]

# the parts of a device's memory; weight casts: autocast's low-precision copies of the
# float32 weights, saved for the backward (none in fp32)
CATEGORIES = ("params", "grads", "optimizer", "activations", "weight_casts")


@dataclass
class DeviceMemory:
    """One device's memory for one training step, in bytes."""

    device: str
    source: str  # "measured" (CUDA allocator) or "estimated" (accounted from tensors)
    params: int  # number of parameters held here
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    peak_bytes: int
    input_bytes: int = 0  # the synthetic batch held on this device
    parts: list[str] = field(default_factory=list)  # which parts of the net live here
    rss_peak_bytes: int | None = None  # ranks on the CPU: this process's peak RSS (measured)
    weight_casts_bytes: int = 0  # autocast's low-precision copies of the weights, saved for the backward
    activations_by_dtype: dict[str, int] = field(default_factory=dict)  # saved tensors' bytes by dtype

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class MemoryReport:
    model: str
    placement: str
    batch_size: int
    devices: list[DeviceMemory]
    comm_bytes_per_step: int  # crossed between devices in one step, forward + backward, all directions
    image_size: int = 0
    width: float = 1.0
    torch: str = torch.__version__
    note: str = ""
    numerics: dict = field(default_factory=lambda: {"precision": "fp32"})  # Numerics.record()

    @property
    def precision(self) -> str:
        return self.numerics.get("precision", "fp32")

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "placement": self.placement,
            "batch_size": self.batch_size,
            "devices": [d.to_json() for d in self.devices],
            "comm_bytes_per_step": self.comm_bytes_per_step,
            "image_size": self.image_size,
            "width": self.width,
            "torch": self.torch,
            "note": self.note,
            "numerics": self.numerics,
        }

    @classmethod
    def from_json(cls, data: dict) -> MemoryReport:
        keys = ("model", "placement", "batch_size", "comm_bytes_per_step", "image_size", "width", "torch", "note")
        keys += ("numerics",)
        return cls(devices=[DeviceMemory(**d) for d in data["devices"]], **{k: data[k] for k in keys if k in data})

    @property
    def largest_peak_bytes(self) -> int:
        return max(d.peak_bytes for d in self.devices)


def nbytes(t: torch.Tensor) -> int:
    """Bytes this process holds of ``t`` (a DTensor's local shard: ``hybrid``'s fc layers)."""
    t = getattr(t, "_local_tensor", t)
    return t.numel() * t.element_size()


def collectives_counted(placed: nn.Module):
    """The context a step runs in so that ``replicas``' and ``hybrid``'s collectives are
    counted (:func:`~alexnet2gpu.parallel.traffic.count_collectives`); nothing for the rest
    (``ranks`` counts its exchanges itself)."""
    if placed.traffic is None:
        return contextlib.nullcontext()
    from ..parallel.traffic import count_collectives

    return count_collectives(placed)


def parts(placed: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """(name, module, slot): which device slot each part of the net belongs to. Towers on
    two devices of one process (``split``) own two slots, tower a with fc8 on 0 and tower b
    on 1; everything else has one slot per process."""
    layout = placed.layout
    if layout.placement in ("replicas", "hybrid"):  # the whole net (or its share) in each process
        return [("net", placed, 0)]
    if layout.towers_apart and not layout.distributed:
        return [("tower_a", placed.tower_a, 0), ("tower_b", placed.tower_b, 1), ("fc8", placed.fc8, 0)]
    names = [n for n in ("tower_a", "tower_b", "fc8") if isinstance(getattr(placed, n, None), nn.Module)]
    if names:
        return [(n, getattr(placed, n), 0) for n in names]
    return [("net", placed, 0)]


def slot_labels(placed: nn.Module) -> list[str]:
    """One label per device slot (:meth:`~alexnet2gpu.parallel.Layout.slot_labels`)."""
    return placed.layout.slot_labels()


def _owner_slots(placed: nn.Module) -> dict[int, int]:
    """id(parameter) -> slot."""
    owners = {}
    for _name, module, slot in parts(placed):
        for p in module.parameters():
            owners.setdefault(id(p), slot)
    return owners


def _state_bytes(
    placed: nn.Module, optimizer: torch.optim.Optimizer, slots: int
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Parameter counts, and bytes of parameters, gradients and optimizer state (momentum
    buffers), by owner slot."""
    owners = _owner_slots(placed)
    counts, p_bytes, g_bytes, o_bytes = ([0] * slots for _ in range(4))
    for p in placed.parameters():
        slot = owners.get(id(p), 0)
        counts[slot] += getattr(p, "_local_tensor", p).numel()
        p_bytes[slot] += nbytes(p)
        if p.grad is not None:
            g_bytes[slot] += nbytes(p.grad)
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, torch.Tensor):
                o_bytes[slot] += nbytes(value)
    return counts, p_bytes, g_bytes, o_bytes


def reset_exchange_counter(placed: nn.Module) -> None:
    """Zeroes the count of bytes exchanged, where the placement keeps one."""
    if placed.exchange_counter is not None:
        placed.exchange_counter.reset()


def _comm_bytes(placed: nn.Module) -> int:
    """Bytes exchanged in the step just run, summed over processes under ``ranks``."""
    counter = placed.exchange_counter or placed.traffic
    if counter is None:
        return 0
    if placed.layout.distributed and torch.distributed.is_initialized():
        # each process counts what it sends (alexnet2gpu.parallel.ranks, .traffic): the step's total is the sum
        sent: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(sent, int(counter.bytes))
        return int(sum(sent))
    return int(counter.bytes)


def rss_peak_bytes() -> int:
    """This process's peak resident set size, measured by the kernel: Linux's ``VmHWM``,
    the high-water mark of this program's own memory since it started. ``getrusage``'s
    ``ru_maxrss`` is the fallback (macOS): on Linux it carries the parent's peak across
    fork and exec, so a worker spawned by a large process (compare) reported compare's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _gather(records: list[DeviceMemory]) -> list[DeviceMemory]:
    """Under torch.distributed every process's records, in rank order (on every rank)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return records
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, records)
    return [r for rank_records in gathered for r in rank_records]


def build_report(
    placed: nn.Module,
    model_name: str,
    batch_size: int,
    width: float,
    optimizer: torch.optim.Optimizer,
    labels: list[str],
    source: str,
    *,
    activations: list[int],
    peaks: list[int] | None,
    input_bytes: list[int],
    rss_peak_bytes: int | None = None,
    note: str,
    activations_by_dtype: list[dict[str, int]] | None = None,
    weight_casts: list[int] | None = None,
    numerics: Numerics = FP32,
) -> MemoryReport:
    """The report for the step just run: state bytes and parameters by owner slot beside
    the ``activations`` (by dtype where known), ``weight_casts`` and ``peaks`` that the
    estimator or the allocator gave (``peaks`` None: the estimate's sum, params + grads +
    optimizer + activations + weight casts + input); then the step's gradients are dropped."""
    slots = len(labels)
    counts, p_bytes, g_bytes, o_bytes = _state_bytes(placed, optimizer, slots)
    weight_casts = weight_casts or [0] * slots
    by_dtype = activations_by_dtype or [{} for _ in range(slots)]
    if peaks is None:
        peaks = [
            p_bytes[s] + g_bytes[s] + o_bytes[s] + activations[s] + weight_casts[s] + input_bytes[s]
            for s in range(slots)
        ]
    parts_of = [[n for n, _m, s in parts(placed) if s == slot] for slot in range(slots)]
    records = [
        DeviceMemory(
            device=labels[s],
            source=source,
            params=counts[s],
            params_bytes=p_bytes[s],
            grads_bytes=g_bytes[s],
            optimizer_bytes=o_bytes[s],
            activations_bytes=activations[s],
            peak_bytes=peaks[s],
            input_bytes=input_bytes[s],
            parts=parts_of[s],
            rss_peak_bytes=rss_peak_bytes,
            weight_casts_bytes=weight_casts[s],
            activations_by_dtype=dict(sorted(by_dtype[s].items())),
        )
        for s in range(slots)
    ]
    comm = _comm_bytes(placed)
    placed.zero_grad(set_to_none=True)
    return MemoryReport(
        model=model_name,
        placement=placed.layout.placement,
        batch_size=batch_size,
        devices=_gather(records),
        comm_bytes_per_step=comm,
        image_size=placed.image_size,
        width=width,
        note=note,
        numerics=numerics.record(),
    )
