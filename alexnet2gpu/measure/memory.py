"""Memory per device for one training step: parameters, gradients, optimizer state (SGD
momentum), activations and peak, plus the bytes exchanged between devices. Returns plain
records (:mod:`.accounting`); :mod:`alexnet2gpu.report.memory` renders them.

Two sources, always labelled (DESIGN.md section 4):

``measured`` (CUDA)
    one warm-up step (so the momentum buffers exist and cuDNN has chosen its kernels), then
    on every device in use ``reset_peak_memory_stats``; activations are what
    ``memory_allocated`` grows by during the forward pass (what autograd keeps for the
    backward) less the weight casts, the peak is ``max_memory_allocated`` over forward,
    backward and optimizer step. Parameters, gradients and optimizer state are the sizes of
    those tensors; the split of the activations by dtype and the weight casts (autocast's
    low-precision copies of the weights) come from the saved tensors, as in the estimate.

``estimated`` (no CUDA, or devices this machine lacks)
    accounted per intended device from the real tensors of a real step (:mod:`.estimate`).
    CUDA devices that are not here (``--placement split`` on a machine without two GPUs)
    are planned as ``summary`` plans them: the step runs on CPU stand-ins and the figures
    are labelled with the intended devices, ``cuda:0`` and ``cuda:1``, as estimated.

Under ``ranks`` each process accounts its own tower, and on the CPU adds its peak
resident set size (``resource.getrusage``), a real measurement of the whole process.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..models import build_model, is_two_tower
from ..parallel import FP32, Layout, Numerics, devices_of, forward_loss, place, resolve_layout
from .accounting import MemoryReport, build_report, nbytes, reset_exchange_counter, slot_labels
from .estimate import SavedTensorAccountant, estimate_memory
from .oom import out_of_memory_error
from .timing import synchronize
from .workload import make_batch, make_optimizer, train_step

__all__ = ["SOURCES", "EstimatorCheck", "check_estimator", "measure_memory", "run_memory"]

SOURCES = ("auto", "measured", "estimated")


def measure_memory(
    placed: nn.Module,
    model_name: str,
    batch_size: int,
    *,
    seed: int = 0,
    width: float = 1.0,
    snapshot: str | None = None,
    numerics: Numerics = FP32,
) -> MemoryReport:
    """Measures one training step on CUDA with the caching allocator's statistics, on
    every device in use, the forward under ``numerics``' autocast. ``snapshot``: also write
    a memory-history pickle for pytorch.org/memory_viz (of the measured step)."""
    layout = placed.layout
    devices = list(layout.devices)
    if any(d.type != "cuda" for d in devices):
        raise ConfigError(
            f"measured memory needs CUDA devices, got {','.join(map(str, devices))}: "
            "on the CPU the report is estimated (use --source estimated or auto)"
        )
    labels = slot_labels(placed)
    slot_devices = list(dict.fromkeys(devices))
    if len(slot_devices) != len(labels):  # split on cuda:0,cuda:0: one allocator, report it once
        raise ConfigError(
            f"measured memory needs distinct devices per tower, got {','.join(map(str, devices))}: "
            "use cuda:0,cuda:1, or --source estimated"
        )
    x, y = make_batch(placed, batch_size, seed=seed)
    optimizer = make_optimizer(placed)
    placed.train()
    train_step(placed, optimizer, x, y, numerics)  # warm-up: momentum buffers, cuDNN choices
    optimizer.zero_grad(set_to_none=True)
    reset_exchange_counter(placed)
    snapshot = snapshot if layout.is_rank0 else None  # one file: rank 0's tower (fc8 and the loss)
    if snapshot:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    synchronize(slot_devices)
    before = []
    for d in slot_devices:
        torch.cuda.reset_peak_memory_stats(d)
        before.append(torch.cuda.memory_allocated(d))
    with SavedTensorAccountant(placed, len(labels), skip=[x]) as saved, numerics.autocast(devices_of(placed)):
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
    return build_report(
        placed,
        model_name,
        batch_size,
        width,
        optimizer,
        labels,
        "measured",
        activations=[max(0, a - b - c) for a, b, c in zip(after_forward, before, saved.weight_casts)],
        activations_by_dtype=saved.by_dtype,
        weight_casts=saved.weight_casts,
        numerics=numerics,
        peaks=peaks,
        input_bytes=[nbytes(x) if d == x.device else 0 for d in slot_devices],
        note=(
            f"measured in {numerics.precision}: torch.cuda max_memory_allocated per device over one training "
            "step after a warm-up step; activations = memory_allocated growth during the forward pass "
            "less the weight casts (by dtype and weight casts: from the saved tensors)"
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


def _absent(layout: Layout) -> bool:
    """The layout names CUDA devices this machine does not have."""
    count = torch.cuda.device_count()
    return any(d.type == "cuda" and d.index >= count for d in layout.devices)


def _on_cpu(layout: Layout) -> Layout:
    """The same layout with every device replaced by the CPU (the estimate's stand-ins)."""
    return dataclasses.replace(layout, devices=tuple(torch.device("cpu") for _ in layout.devices))


def run_memory(
    model_name: str,
    placement: str,
    devices=None,
    *,
    batch_size: int = 64,
    source: str = "auto",
    seed: int = 0,
    snapshot: str | None = None,
    numerics: Numerics = FP32,
    **model_kwargs,
) -> MemoryReport:
    """Builds and places ``model_name`` and reports its memory for one training step in
    ``numerics``' precision: measured where every device is a CUDA device (``source='auto'``), else estimated;
    CUDA devices this machine lacks (``split`` without two GPUs) are estimated on CPU
    stand-ins and labelled with the devices they stand for."""
    if source not in SOURCES:
        raise ConfigError(f"unknown memory source '{source}': choose {', '.join(SOURCES)}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    torch.manual_seed(seed)
    model = build_model(model_name, **model_kwargs)
    intended = resolve_layout(placement, devices, two_tower=is_two_tower(model), plan=True)
    planned = _absent(intended)
    if planned and source == "measured":
        raise ConfigError(
            f"measured memory needs the devices {intended.describe()} and this machine has "
            f"{torch.cuda.device_count()} CUDA device(s): use --source estimated (or auto) to estimate them"
        )
    placed = place(model, _on_cpu(intended) if planned else intended)
    placed.layout.local_batch(batch_size)
    if source == "auto":
        source = "measured" if all(d.type == "cuda" for d in placed.layout.devices) else "estimated"
    if snapshot and source != "measured":
        raise ConfigError("--snapshot records the CUDA allocator: it needs CUDA devices (and --source measured/auto)")
    width = model_kwargs.get("width", 1.0)
    try:
        if source == "measured":
            return measure_memory(
                placed, model_name, batch_size, seed=seed, width=width, snapshot=snapshot, numerics=numerics
            )
        if planned:
            labels, planned_for = [str(d) for d in intended.devices], intended.describe()
            return estimate_memory(
                placed,
                model_name,
                batch_size,
                seed=seed,
                width=width,
                labels=labels,
                planned_for=planned_for,
                numerics=numerics,
            )
        return estimate_memory(placed, model_name, batch_size, seed=seed, width=width, numerics=numerics)
    except torch.OutOfMemoryError as error:
        placed.zero_grad(set_to_none=True)
        raise out_of_memory_error(
            error, model_name, placed, batch_size, "train", model_kwargs=model_kwargs, numerics=numerics
        ) from None


@dataclass
class EstimatorCheck:
    """The CPU estimator against ``max_memory_allocated`` for the same step, per device
    (run on a GPU: scripts/gpu_checks.sh)."""

    model: str
    placement: str
    batch_size: int
    devices: list[dict]  # device, estimated/measured activations and peak, relative errors
    numerics: dict = field(default_factory=lambda: {"precision": "fp32"})  # Numerics.record()

    def to_json(self) -> dict:
        return asdict(self)


def check_estimator(
    model_name: str,
    placement: str,
    devices,
    *,
    batch_size: int = 64,
    seed: int = 0,
    numerics: Numerics = FP32,
    **model_kwargs,
) -> EstimatorCheck:
    """Measures on ``devices`` (CUDA), estimates the same placement on as many CPU
    stand-ins (CPU autocast standing in for CUDA's), and returns both per device with the
    estimate's relative error."""
    common = {"batch_size": batch_size, "seed": seed, "numerics": numerics, **model_kwargs}
    measured = run_memory(model_name, placement, devices, source="measured", **common)
    stand_ins = ["cpu"] * len(measured.devices)
    estimated = run_memory(model_name, measured.placement, stand_ins, source="estimated", **common)
    rows = []
    keys = ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "weight_casts_bytes", "peak_bytes")
    for est, mea in zip(estimated.devices, measured.devices):
        row = {"device": mea.device, "estimated_device": est.device}
        for key in keys:
            e, m = getattr(est, key), getattr(mea, key)
            row[f"estimated_{key}"], row[f"measured_{key}"] = e, m
            row[f"{key.removesuffix('_bytes')}_rel_err"] = (e - m) / m if m else 0.0
        rows.append(row)
    return EstimatorCheck(
        model=model_name, placement=placement, batch_size=batch_size, devices=rows, numerics=numerics.record()
    )
