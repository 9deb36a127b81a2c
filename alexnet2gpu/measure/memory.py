"""Memory per device for one training step: parameters, gradients, optimizer state (SGD
momentum), activations and peak, plus the bytes exchanged between devices. Returns plain
records; :mod:`alexnet2gpu.report.memory` renders them.

Two sources, always labelled (DESIGN.md section 4):

``measured`` (CUDA)
    one warm-up step (so the momentum buffers exist and cuDNN has chosen its kernels), then
    on every device in use ``reset_peak_memory_stats``; activations are what
    ``memory_allocated`` grows by during the forward pass (what autograd keeps for the
    backward), the peak is ``max_memory_allocated`` over forward, backward and optimizer
    step. Parameters, gradients and optimizer state are the sizes of those tensors.

``estimated`` (no CUDA)
    accounted per *intended* device from the real tensors of a real step on the CPU:
    parameters, gradients and momentum buffers by owner (``split``: tower a and fc8 on
    device 0, tower b on device 1, even when split runs on ``cpu,cpu``); activations are
    the tensors autograd saves for the backward, seen through
    ``torch.autograd.graph.saved_tensors_hooks`` and charged to the part of the net that
    was running (forward pre-hooks on its modules), each storage once per device. The
    estimated peak is params + grads + optimizer + activations + the input batch: it
    leaves out temporaries (workspaces, the gradient of the activation being freed), and
    counts gradients and activations as if they coexisted in full.

Under ``ranks`` each process accounts its own tower, and on the CPU adds its peak
resident set size (``resource.getrusage``), a real measurement of the whole process.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import Alexnet2gpuError, ConfigError
from ..models import build_model
from ..parallel import devices_of, forward_loss, place
from .bench import make_batch, make_optimizer, synchronize, train_step

__all__ = [
    "CATEGORIES",
    "DeviceMemory",
    "EstimatorCheck",
    "MemoryReport",
    "check_estimator",
    "estimate_memory",
    "largest_batch_that_fits",
    "measure_memory",
    "out_of_memory_error",
    "run_memory",
]

CATEGORIES = ("params", "grads", "optimizer", "activations")  # the parts of a device's memory
GiB = 1024**3


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
        }

    @property
    def largest_peak_bytes(self) -> int:
        return max(d.peak_bytes for d in self.devices)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _parts(placed: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """(name, module, slot): which device slot each part of the net belongs to. ``split``
    owns two slots (tower a and fc8 on 0, tower b on 1); everything else one per process."""
    if placed.layout.placement == "split":
        return [("tower_a", placed.tower_a, 0), ("tower_b", placed.tower_b, 1), ("fc8", placed.fc8, 0)]
    names = [n for n in ("tower_a", "tower_b", "fc8") if isinstance(getattr(placed, n, None), nn.Module)]
    if names:
        return [(n, getattr(placed, n), 0) for n in names]
    return [("net", placed, 0)]


def _slot_labels(placed: nn.Module) -> list[str]:
    """One label per device slot; ``cpu #0``/``cpu #1`` when split runs on ``cpu,cpu``."""
    layout = placed.layout
    devices = [str(d) for d in devices_of(placed)]
    if layout.placement == "ranks":
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return [f"{devices[0]} (rank {rank})"]
    if len(set(devices)) < len(devices):
        return [f"{d} #{i}" for i, d in enumerate(devices)]
    return devices


def _owner_slots(placed: nn.Module) -> dict[int, int]:
    """id(parameter) -> slot."""
    owners = {}
    for _name, module, slot in _parts(placed):
        for p in module.parameters():
            owners.setdefault(id(p), slot)
    return owners


def _by_slot(tensors_with_owner, slots: int) -> list[int]:
    sums = [0] * slots
    for slot, t in tensors_with_owner:
        sums[slot] += _nbytes(t)
    return sums


def _param_counts(placed: nn.Module, slots: int) -> list[int]:
    owners = _owner_slots(placed)
    counts = [0] * slots
    for p in placed.parameters():
        counts[owners.get(id(p), 0)] += p.numel()
    return counts


def _state_bytes(
    placed: nn.Module, optimizer: torch.optim.Optimizer, slots: int
) -> tuple[list[int], list[int], list[int]]:
    """Parameters, gradients and optimizer state (momentum buffers), by owner slot."""
    owners = _owner_slots(placed)
    params = list(placed.parameters())
    p_bytes = _by_slot(((owners.get(id(p), 0), p) for p in params), slots)
    g_bytes = _by_slot(((owners.get(id(p), 0), p.grad) for p in params if p.grad is not None), slots)
    o_bytes = [0] * slots
    for p in params:
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, torch.Tensor):
                o_bytes[owners.get(id(p), 0)] += _nbytes(value)
    return p_bytes, g_bytes, o_bytes


class _ActivationAccountant:
    """Charges every tensor autograd saves during a forward pass to the device slot of the
    part of the net that is running, each storage once per slot; parameters (saved by conv
    and linear layers) are already counted as parameters and are skipped."""

    def __init__(self, placed: nn.Module, slots: int, skip: list[torch.Tensor]) -> None:
        self.bytes = [0] * slots
        self.slot = 0
        # parameters are counted as parameters; the input batch is counted where it was made
        # (slot 0), while a copy of it made for another slot is that slot's activation
        self._params = {p.untyped_storage().data_ptr() for p in placed.parameters()}
        self._seen: set[tuple[int, int]] = {(0, t.untyped_storage().data_ptr()) for t in skip}
        self._handles = []
        for _name, module, slot in _parts(placed):
            for sub in module.modules():
                self._handles.append(sub.register_forward_pre_hook(self._entering(slot)))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _entering(self, slot: int):
        def hook(_module, _inputs):
            self.slot = slot

        return hook

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        key = (self.slot, ptr)
        if ptr not in self._params and key not in self._seen:
            self._seen.add(key)
            self.bytes[self.slot] += storage.nbytes()
        return t

    def __enter__(self) -> _ActivationAccountant:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()


def _comm_counter(placed: nn.Module):
    return getattr(placed, "exchange_counter", None)


def _comm_bytes(placed: nn.Module) -> int:
    """Bytes exchanged in the step just run, summed over processes under ``ranks``."""
    counter = _comm_counter(placed)
    if counter is None:
        return 0
    if placed.layout.placement == "ranks" and torch.distributed.is_initialized():
        # each process counts what it sends (see alexnet2gpu.ranks): the step's total is the sum
        sent: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(sent, int(counter.bytes))
        return int(sum(sent))
    return int(counter.bytes)


def _rss_peak_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _gather(records: list[DeviceMemory]) -> list[DeviceMemory]:
    """Under torch.distributed every process's records, in rank order (on every rank)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return records
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, records)
    return [r for rank_records in gathered for r in rank_records]


def _input_slot_bytes(x: torch.Tensor, slots: int) -> list[int]:
    sizes = [0] * slots
    sizes[0] = _nbytes(x)
    return sizes


def estimate_memory(
    placed: nn.Module, model_name: str, batch_size: int, *, seed: int = 0, width: float = 1.0
) -> MemoryReport:
    """Runs one real training step on ``placed`` (wherever it is) and accounts its memory
    per intended device from the tensors. Labelled ``estimated``."""
    labels = _slot_labels(placed)
    slots = len(labels)
    x, y = make_batch(placed, batch_size, seed=seed)
    optimizer = make_optimizer(placed)
    placed.train()
    counter = _comm_counter(placed)
    if counter is not None:
        counter.reset()
    optimizer.zero_grad(set_to_none=True)
    with _ActivationAccountant(placed, slots, skip=[x]) as accountant:
        loss = forward_loss(placed, x, y)
    loss.backward()
    optimizer.step()
    ranks_cpu = placed.layout.placement == "ranks" and devices_of(placed)[0].type == "cpu"
    del loss
    return _report(
        placed,
        model_name,
        batch_size,
        width,
        optimizer,
        labels,
        "estimated",
        activations=accountant.bytes,
        peaks=None,
        input_bytes=_input_slot_bytes(x, slots),
        rss_peak_bytes=_rss_peak_bytes() if ranks_cpu else None,
        note=(
            "estimated: accounted from the tensors of one real step on "
            f"{','.join(sorted({str(d) for d in devices_of(placed)}))}; "
            "peak = params + grads + optimizer + activations + input, without temporaries"
        ),
    )


def _report(
    placed: nn.Module,
    model_name: str,
    batch_size: int,
    width: float,
    optimizer,
    labels: list[str],
    source: str,
    *,
    activations: list[int],
    peaks: list[int] | None,
    input_bytes: list[int],
    rss_peak_bytes: int | None = None,
    note: str,
) -> MemoryReport:
    """The report for the step just run: state bytes and parameters by owner slot beside
    the ``activations`` and ``peaks`` that the estimator or the allocator gave (``peaks``
    None: the estimate's sum, params + grads + optimizer + activations + input); then the
    step's gradients are dropped."""
    slots = len(labels)
    p_bytes, g_bytes, o_bytes = _state_bytes(placed, optimizer, slots)
    if peaks is None:
        peaks = [p_bytes[s] + g_bytes[s] + o_bytes[s] + activations[s] + input_bytes[s] for s in range(slots)]
    parts_of = [[n for n, _m, s in _parts(placed) if s == slot] for slot in range(slots)]
    counts = _param_counts(placed, slots)
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
    )


def measure_memory(
    placed: nn.Module,
    model_name: str,
    batch_size: int,
    *,
    seed: int = 0,
    width: float = 1.0,
    snapshot: str | None = None,
) -> MemoryReport:
    """Measures one training step on CUDA with the caching allocator's statistics, on
    every device in use. ``snapshot``: also write a memory-history pickle for
    pytorch.org/memory_viz (of the measured step)."""
    devices = [d for d in devices_of(placed)]
    if any(d.type != "cuda" for d in devices):
        raise ConfigError(
            f"measured memory needs CUDA devices, got {','.join(map(str, devices))}: "
            "on the CPU the report is estimated (use --source estimated or auto)"
        )
    labels = _slot_labels(placed)
    slots = len(labels)
    x, y = make_batch(placed, batch_size, seed=seed)
    optimizer = make_optimizer(placed)
    placed.train()
    train_step(placed, optimizer, x, y)  # warm-up: momentum buffers, cuDNN choices
    optimizer.zero_grad(set_to_none=True)
    counter = _comm_counter(placed)
    if counter is not None:
        counter.reset()
    slot_devices = list(dict.fromkeys(devices)) if placed.layout.placement != "ranks" else devices[:1]
    if len(slot_devices) != slots:  # split on cuda:0,cuda:0: one allocator, report it once
        raise ConfigError(
            f"measured memory needs distinct devices per tower, got {','.join(map(str, devices))}: "
            "use cuda:0,cuda:1, or --source estimated"
        )
    if snapshot and placed.layout.placement == "ranks" and torch.distributed.get_rank() != 0:
        snapshot = None  # one file: rank 0's tower (the one with fc8 and the loss)
    if snapshot:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    synchronize(slot_devices)
    before = []
    for d in slot_devices:
        torch.cuda.reset_peak_memory_stats(d)
        before.append(torch.cuda.memory_allocated(d))
    loss = forward_loss(placed, x, y)
    synchronize(slot_devices)
    after_forward = [torch.cuda.memory_allocated(d) for d in slot_devices]
    loss.backward()
    optimizer.step()
    synchronize(slot_devices)
    peaks = [torch.cuda.max_memory_allocated(d) for d in slot_devices]
    if snapshot:
        _dump_snapshot_atomic(snapshot)
        torch.cuda.memory._record_memory_history(enabled=None)
    del loss
    return _report(
        placed,
        model_name,
        batch_size,
        width,
        optimizer,
        labels,
        "measured",
        activations=[max(0, after_forward[s] - before[s]) for s in range(slots)],
        peaks=peaks,
        input_bytes=[_nbytes(x) if d == x.device else 0 for d in slot_devices],
        note=(
            "measured: torch.cuda max_memory_allocated per device over one training step after "
            "a warm-up step; activations = memory_allocated growth during the forward pass"
        ),
    )


def _dump_snapshot_atomic(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.cuda.memory._dump_snapshot(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


SOURCES = ("auto", "measured", "estimated")


def run_memory(
    model_name: str,
    placement: str,
    devices=None,
    *,
    batch_size: int = 64,
    source: str = "auto",
    seed: int = 0,
    snapshot: str | None = None,
    **model_kwargs,
) -> MemoryReport:
    """Builds and places ``model_name`` and reports its memory for one training step:
    measured where every device is a CUDA device (``source='auto'``), else estimated."""
    if source not in SOURCES:
        raise ConfigError(f"unknown memory source '{source}': choose {', '.join(SOURCES)}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    torch.manual_seed(seed)
    model = build_model(model_name, **model_kwargs)
    placed = place(model, placement, devices)
    dp = placed.layout.dp_size
    if batch_size % dp:
        raise ConfigError(f"batch size {batch_size} does not divide among {dp} data-parallel replicas")
    on_cuda = all(d.type == "cuda" for d in devices_of(placed))
    if source == "auto":
        source = "measured" if on_cuda else "estimated"
    if snapshot and source != "measured":
        raise ConfigError("--snapshot records the CUDA allocator: it needs CUDA devices (and --source measured/auto)")
    width = model_kwargs.get("width", 1.0)
    try:
        if source == "measured":
            return measure_memory(placed, model_name, batch_size, seed=seed, width=width, snapshot=snapshot)
        return estimate_memory(placed, model_name, batch_size, seed=seed, width=width)
    except torch.OutOfMemoryError as error:
        placed.zero_grad(set_to_none=True)
        raise out_of_memory_error(error, model_name, placed, batch_size, "train", model_kwargs=model_kwargs) from None


# --- Checking the estimator against the allocator (run on a GPU: scripts/gpu_checks.sh) ---


@dataclass
class EstimatorCheck:
    """The CPU estimator against ``max_memory_allocated`` for the same step, per device."""

    model: str
    placement: str
    batch_size: int
    devices: list[dict]  # device, estimated/measured activations and peak, relative errors

    def to_json(self) -> dict:
        return asdict(self)


def check_estimator(
    model_name: str, placement: str, devices, *, batch_size: int = 64, seed: int = 0, **model_kwargs
) -> EstimatorCheck:
    """Estimates on the CPU (split on ``cpu,cpu``), measures on ``devices`` (CUDA), and
    returns both per device with the estimate's relative error."""
    cpu_devices = ["cpu", "cpu"] if placement == "split" else ["cpu"]
    estimated = run_memory(
        model_name, placement, cpu_devices, batch_size=batch_size, source="estimated", seed=seed, **model_kwargs
    )
    measured = run_memory(
        model_name, placement, devices, batch_size=batch_size, source="measured", seed=seed, **model_kwargs
    )
    rows = []
    for est, mea in zip(estimated.devices, measured.devices):
        row = {"device": mea.device, "estimated_device": est.device}
        for key in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "peak_bytes"):
            e, m = getattr(est, key), getattr(mea, key)
            row[f"estimated_{key}"], row[f"measured_{key}"] = e, m
            row[f"{key.removesuffix('_bytes')}_rel_err"] = (e - m) / m if m else 0.0
        rows.append(row)
    return EstimatorCheck(model=model_name, placement=placement, batch_size=batch_size, devices=rows)


# --- Out of memory (issue 5, item 7) ---


def largest_batch_that_fits(
    model_name: str, placement: str, capacity_bytes: int, slot: int = 0, **model_kwargs
) -> tuple[int, int, int]:
    """(largest batch, fixed bytes, bytes per image) for device ``slot`` of ``placement``,
    from the estimator at batch 1 and 2 on the CPU: the estimated peak grows linearly with
    the batch (activations and input), the rest is fixed (params, grads, optimizer)."""
    cpu = {"split": ["cpu", "cpu"], "ranks": ["cpu", "cpu"]}.get(placement, ["cpu"])
    plan = "split" if placement == "ranks" else placement  # one tower per process ~ split's devices
    peaks = []
    for b in (1, 2):
        torch.manual_seed(0)
        placed = place(build_model(model_name, **model_kwargs), plan, cpu)
        report = estimate_memory(placed, model_name, b)
        peaks.append(report.devices[min(slot, len(report.devices) - 1)].peak_bytes)
    per_image = max(1, peaks[1] - peaks[0])
    fixed = peaks[0] - per_image
    return max(0, math.floor((capacity_bytes - fixed) / per_image)), fixed, per_image


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.2f} MiB"


def _oom_device(error: BaseException, placed: nn.Module) -> tuple[str, int]:
    """The device named in a CUDA OOM message ("GPU 1 has a total capacity ..."), and its
    slot in the placement; else the first CUDA device in use."""
    devices = list(devices_of(placed))
    match = re.search(r"GPU (\d+)", str(error))
    if match:
        device = torch.device("cuda", int(match.group(1)))
    else:
        device = next((d for d in devices if d.type == "cuda"), devices[0])
    slot = devices.index(device) if device in devices else 0
    if placed.layout.placement == "ranks":
        slot = getattr(placed, "tower_rank", 0)  # ranks: tower r's process ~ split's device r
    return str(device), slot


def _capacity(error: BaseException, device: str) -> int | None:
    """Total memory of the device: from the OOM message, else from CUDA."""
    match = re.search(r"total capacity of ([\d.]+) (GiB|MiB|KiB)", str(error))
    if match:
        scale = {"GiB": GiB, "MiB": 1024**2, "KiB": 1024}[match.group(2)]
        return int(float(match.group(1)) * scale)
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return None


def out_of_memory_error(
    error: BaseException,
    model_name: str,
    placed: nn.Module,
    batch_size: int,
    mode: str,
    *,
    model_kwargs: dict | None = None,
) -> Alexnet2gpuError:
    """A one-line error for a CUDA out-of-memory: the device, the batch size, and the
    largest batch the memory estimate says would fit (for a training step)."""
    device, slot = _oom_device(error, placed)
    what = f"{model_name}/{placed.layout.placement}, {mode}"
    capacity = _capacity(error, device)
    if capacity is None:
        return Alexnet2gpuError(
            f"out of memory on {device} at batch size {batch_size} ({what}); its capacity is unknown: "
            "try a smaller batch size"
        )
    fits, fixed, per_image = largest_batch_that_fits(
        model_name, placed.layout.placement, capacity, slot, **(model_kwargs or {})
    )
    advice = (
        f"use a batch size of at most {fits}"
        if fits >= 1
        else "the model alone does not fit: use a smaller --width or more devices"
    )
    return Alexnet2gpuError(
        f"out of memory on {device} at batch size {batch_size} ({what}): the memory estimate says "
        f"batch {fits} is the largest that fits in its {_size(capacity)} "
        f"({_size(fixed)} fixed + {_size(per_image)} per image); {advice}"
    )
