"""The fit planner: the largest training batch whose step fits on each device, for every
model x placement x precision, on a named card or a given memory size.

A step's estimated memory on a device is a fixed part (parameters, gradients, momentum,
weight casts, a few scalars) plus a part linear in the batch (saved activations, the
input). Each configuration is planned once at batch 2 and batch 4 with
:func:`~.estimate.plan_memory` (the estimator's accounting of a step run under
``FakeTensorMode``: shapes, dtypes and storages, no arithmetic), each category's line is
drawn through the two, and every card is solved from the lines:

    largest batch on a device = floor((capacity - reserve - fixed) / per image)

and the placement's largest batch is the smallest over its devices (that device binds).
The estimate leaves out temporaries (the gradients of activations while the backward runs,
convolution workspaces); the *reserve* stands for them and for the CUDA context: measured
on CUDA where there is one (:func:`measure_reserve`), else :data:`DEFAULT_CONTEXT_BYTES` +
:data:`DEFAULT_WORKSPACE_BYTES`, stated in every output. With ``temporaries``, one-device
placements must also fit the step's peak over time, temporaries included (torch's
MemTracker, :mod:`.tracked`, drawn as a line through :data:`TRACKED_BATCHES`): in bf16 the
nets with the LRN hold hundreds of MiB more than the estimate. ``ranks`` runs one tower per
process: it is planned as ``split`` (device ``rank 0`` holds tower a and fc8), with one
data-parallel replica.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from ..errors import ConfigError
from ..models.names import MODEL_NAMES
from ..parallel import Layout, Numerics
from ..parallel.names import PRECISIONS, TWO_TOWER_PLACEMENTS
from .cards import Card
from .estimate import plan_memory
from .timing import machine_info
from .tracked import tracked_peak as _tracked_peak

__all__ = [
    "DEFAULT_CONTEXT_BYTES",
    "DEFAULT_WORKSPACE_BYTES",
    "FIT_CATEGORIES",
    "FitPlan",
    "FitRow",
    "Reserve",
    "StepLine",
    "check_boundary",
    "configurations",
    "default_reserve",
    "measure_reserve",
    "plan_fit",
    "solve",
    "step_line",
    "tracked_peak",
]

MiB = 2**20
# The CUDA context of a PyTorch process: PyTorch PR #86509 (github.com/pytorch/pytorch/pull/86509)
# measured 287,047,680 bytes with CUDA_MODULE_LOADING=LAZY (PyTorch's default since 1.13, the
# driver's since CUDA 12.2) and 666,632,192 without; 512 MiB leaves room for the cuBLAS and
# cuDNN kernels a training step loads. An assumption where no GPU is here to measure it.
DEFAULT_CONTEXT_BYTES = 512 * MiB
# Temporaries the estimate leaves out (activation gradients during the backward, cuDNN and
# cuBLAS workspaces) and the driver's own share of the card: an assumption, not measured.
DEFAULT_WORKSPACE_BYTES = 256 * MiB
# Categories of a device's memory, as DeviceMemory names their bytes.
FIT_CATEGORIES = ("params", "grads", "optimizer", "activations", "input", "weight_casts")
PLAN_BATCHES = (2, 4)  # the two batches each line is drawn through
_BATCH_FREE = ("params", "grads", "optimizer")
# MemTracker's peak is drawn through larger batches: at a few images the peak can sit in the
# optimizer step rather than the backward, off the line that large batches follow
TRACKED_BATCHES = (64, 128)  # the parameters' shapes: no part grows with the batch


@dataclass
class Reserve:
    """What ``fit`` keeps off every device besides the step: the CUDA context and workspaces."""

    bytes: int
    context_bytes: int
    workspace_bytes: int
    source: str  # "default (assumption)", "measured on cuda:0 ...", or "given (--reserve)"

    def to_json(self) -> dict:
        return asdict(self)


def default_reserve() -> Reserve:
    return Reserve(
        DEFAULT_CONTEXT_BYTES + DEFAULT_WORKSPACE_BYTES,
        DEFAULT_CONTEXT_BYTES,
        DEFAULT_WORKSPACE_BYTES,
        "default (assumption): CUDA context 512 MiB (PyTorch PR #86509 measured 274 MiB with lazy "
        "loading) + 256 MiB for workspaces and temporaries the estimate leaves out",
    )


def measure_reserve(device: str = "cuda:0") -> Reserve:
    """The CUDA context measured on ``device``: what ``mem_get_info`` says is used once the
    context exists and cuBLAS and cuDNN have run (a small conv and matmul), less what the
    caching allocator holds; other processes on the device count too. The workspace part
    stays the default assumption."""
    dev = torch.device(device)
    x = torch.randn(4, 3, 32, 32, device=dev)
    w = torch.randn(8, 3, 3, 3, device=dev)
    (torch.nn.functional.conv2d(x, w).flatten(1) @ torch.randn(8 * 30 * 30, 8, device=dev)).sum().item()
    torch.cuda.synchronize(dev)
    free, total = torch.cuda.mem_get_info(dev)
    context = total - free - torch.cuda.memory_reserved(dev)
    del x, w
    return Reserve(
        context + DEFAULT_WORKSPACE_BYTES,
        context,
        DEFAULT_WORKSPACE_BYTES,
        f"measured on {device} ({torch.cuda.get_device_name(dev)}): CUDA context {context / MiB:,.0f} MiB "
        "(mem_get_info used less the allocator's reserved, after a conv and a matmul) + 256 MiB for "
        "workspaces and temporaries (assumption)",
    )


def configurations(models=None, placements=None, precisions=None) -> list[tuple[str, str, str]]:
    """(model, placement, precision) for every combination that applies: ``dual`` runs as
    towers, grouped, split and ranks, the single-stream nets as single."""
    models = list(models or MODEL_NAMES)
    placements = list(placements or (*TWO_TOWER_PLACEMENTS, "single"))
    precisions = list(precisions or PRECISIONS)
    for kind, given, known in (
        ("model", models, MODEL_NAMES),
        ("placement", placements, (*TWO_TOWER_PLACEMENTS, "single")),
        ("precision", precisions, PRECISIONS),
    ):
        bad = [g for g in given if g not in known]
        if bad:
            raise ConfigError(f"unknown {kind} '{bad[0]}': choose from {', '.join(known)}")
    configs = [
        (m, p, q)
        for m in models
        for p in placements
        if (p in TWO_TOWER_PLACEMENTS) == (m == "dual")
        for q in precisions
    ]
    if not configs:
        raise ConfigError(
            f"no placement in {','.join(placements)} applies to {','.join(models)}: dual runs as "
            f"{', '.join(TWO_TOWER_PLACEMENTS)}; the other nets as single"
        )
    return configs


def _plan_layout(placement: str) -> Layout:
    cpu = torch.device("cpu")
    if placement in ("split", "ranks"):
        return Layout("split", (cpu, cpu))
    return Layout(placement, (cpu,))


def device_labels(placement: str) -> list[str]:
    """The devices a plan is for: ``cuda:0`` (and ``cuda:1`` for split), ``rank 0``/``rank 1``."""
    return {"split": ["cuda:0", "cuda:1"], "ranks": ["rank 0", "rank 1"]}.get(placement, ["cuda:0"])


@dataclass
class StepLine:
    """One configuration's memory per device and category: bytes = fixed + per_image * batch."""

    model: str
    placement: str
    precision: str
    devices: list[str]
    fixed: list[dict[str, float]]  # per device: category -> bytes at batch 0
    per_image: list[dict[str, float]]  # per device: category -> bytes per image
    image_size: int = 0
    width: float = 1.0
    # one device only, with --temporaries: MemTracker's peak over the step, temporaries
    # included, as a line too: {"fixed": bytes, "per_image": bytes}
    tracked: dict[str, float] | None = None

    def breakdown(self, slot: int, batch: int) -> dict[str, int]:
        return {c: round(self.fixed[slot][c] + self.per_image[slot][c] * batch) for c in FIT_CATEGORIES}

    def tracked_peak(self, batch: int) -> int | None:
        return None if self.tracked is None else round(self.tracked["fixed"] + self.tracked["per_image"] * batch)

    def peak(self, slot: int, batch: int) -> int:
        return sum(self.breakdown(slot, batch).values())

    def to_json(self) -> dict:
        return asdict(self)


def step_line(model: str, placement: str, precision: str, *, temporaries: bool = False, **model_kwargs) -> StepLine:
    """Plans the step at the two batches of :data:`PLAN_BATCHES` and draws each category's
    line; ``temporaries`` (one-device placements): also MemTracker's peak at the two
    batches of :data:`TRACKED_BATCHES`, as a line."""
    small, large = PLAN_BATCHES
    layout, numerics = _plan_layout(placement), Numerics(precision)
    a = plan_memory(model, layout, small, numerics=numerics, **model_kwargs)
    # gradients and momentum have the parameters' shapes whatever the batch: the second
    # plan runs the forward alone (the backward is half a plan's time) and keeps them fixed
    b = plan_memory(model, layout, large, numerics=numerics, backward=False, **model_kwargs)
    fixed, per_image = [], []
    for da, db in zip(a.devices, b.devices):
        slope = {
            c: 0.0 if c in _BATCH_FREE else (getattr(db, f"{c}_bytes") - getattr(da, f"{c}_bytes")) / (large - small)
            for c in FIT_CATEGORIES
        }
        per_image.append(slope)
        fixed.append({c: getattr(da, f"{c}_bytes") - slope[c] * small for c in FIT_CATEGORIES})
    tracked = None
    if temporaries and len(device_labels(placement)) == 1:
        t1, t2 = (_tracked_peak(model, layout, precision, n, **model_kwargs) for n in TRACKED_BATCHES)
        slope = (t2 - t1) / (TRACKED_BATCHES[1] - TRACKED_BATCHES[0])
        tracked = {"fixed": t1 - slope * TRACKED_BATCHES[0], "per_image": slope}
    labels = device_labels(placement)
    return StepLine(model, placement, precision, labels, fixed, per_image, a.image_size, a.width, tracked)


@dataclass
class FitRow:
    """One configuration on one card: the largest batch, the device that binds, and each
    device's memory at that batch (the breakdown, reserve included)."""

    model: str
    placement: str
    precision: str
    card: str
    capacity_bytes: int
    largest_batch: int  # 0: the fixed part alone does not fit
    binding_device: str
    devices: list[dict] = field(default_factory=list)
    check: dict | None = None  # the boundary checked by estimating, or on CUDA

    def to_json(self) -> dict:
        return asdict(self)


def _fits(room: float, per_image: float) -> int:
    return max(0, math.floor(room / per_image)) if per_image > 0 else (10**9 if room >= 0 else 0)


def solve(line: StepLine, card: Card, reserve: Reserve) -> FitRow:
    """The largest batch of ``line`` on ``card`` with ``reserve`` kept off each device."""
    per_device = []
    for slot, label in enumerate(line.devices):
        fixed = sum(line.fixed[slot].values()) + reserve.bytes
        slope = sum(line.per_image[slot].values())
        fits = _fits(card.capacity_bytes - fixed, slope)
        if line.tracked is not None:  # the step's peak with temporaries must fit too
            tracked_room = card.capacity_bytes - reserve.bytes - line.tracked["fixed"]
            fits = min(fits, _fits(tracked_room, line.tracked["per_image"]))
        per_device.append((fits, slot, label, fixed, slope))
    largest, binding, binding_label = min((f, s, lab) for f, s, lab, _fx, _sl in per_device)
    at = max(largest, 1)
    devices = []
    for fits, slot, label, fixed, slope in per_device:
        breakdown = line.breakdown(slot, at)
        if line.tracked is not None:  # what the peak over time holds beyond the estimate
            breakdown["temporaries"] = max(0, line.tracked_peak(at) - sum(breakdown.values()))
        breakdown["reserve"] = reserve.bytes
        devices.append(
            {
                "device": label,
                "largest_batch_alone": fits,
                "fixed_bytes": round(fixed),
                "per_image_bytes": slope,
                "at_batch": at,
                "breakdown": breakdown,
                "total_bytes": sum(breakdown.values()),
            }
        )
    return FitRow(
        line.model, line.placement, line.precision, card.name, card.capacity_bytes, largest, binding_label, devices
    )


def check_boundary(row: FitRow, reserve: Reserve, **model_kwargs) -> dict:
    """Estimates the step at the predicted batch and one above it directly (not from the
    line): at the predicted batch every device must fit, one above at least one must not."""
    layout = _plan_layout(row.placement)
    totals = {}
    for batch in (row.largest_batch, row.largest_batch + 1):
        if batch < 1:
            continue
        report = plan_memory(row.model, layout, batch, numerics=Numerics(row.precision), **model_kwargs)
        totals[batch] = [d.peak_bytes + reserve.bytes for d in report.devices]
    fits = all(t <= row.capacity_bytes for t in totals.get(row.largest_batch, [0]))
    above = any(t > row.capacity_bytes for t in totals[row.largest_batch + 1])
    check = {
        "source": "estimated",
        "batch": row.largest_batch,
        "totals_bytes": {str(b): t for b, t in totals.items()},
        "fits_at_batch": fits,
        "exceeds_above": above,
        "on_boundary": fits and above,
    }
    if len(row.devices) == 1 and row.largest_batch >= 1:
        check.update(_tracked_check(row, reserve, **model_kwargs))
        if "tracked_exceeds_above" in check:  # planned with temporaries: both must hold
            check["fits_at_batch"] = fits and check["tracked_fits_at_batch"]
            check["exceeds_above"] = above or check["tracked_exceeds_above"]
            check["on_boundary"] = check["fits_at_batch"] and check["exceeds_above"]
    return check


def _tracked_check(row: FitRow, reserve: Reserve, **model_kwargs) -> dict:
    """MemTracker's peak with temporaries, measured directly. Planned with temporaries
    (``--temporaries``): with the whole reserve, at the batch and one above, part of the
    boundary. Otherwise: at the batch, beside the CUDA context alone, for information."""
    b, capacity = row.largest_batch, row.capacity_bytes
    if "temporaries" not in row.devices[0]["breakdown"]:
        tracked = tracked_peak(row.model, row.placement, row.precision, b, **model_kwargs)
        return {"tracked_peak_bytes": tracked, "tracked_fits_with_context": tracked + reserve.context_bytes <= capacity}
    at, above = (
        tracked_peak(row.model, row.placement, row.precision, n, **model_kwargs) + reserve.bytes for n in (b, b + 1)
    )
    return {
        "tracked_totals_bytes": {str(b): at, str(b + 1): above},
        "tracked_fits_at_batch": at <= capacity,
        "tracked_exceeds_above": above > capacity,
    }


def tracked_peak(model: str, placement: str, precision: str, batch: int, **model_kwargs) -> int:
    """MemTracker's peak of one step with temporaries (:func:`.tracked.tracked_peak`) for a
    single-device placement."""
    return _tracked_peak(model, _plan_layout(placement), precision, batch, **model_kwargs)


@dataclass
class FitPlan:
    rows: list[FitRow]
    lines: list[StepLine]
    cards: list[dict]
    reserve: Reserve
    elapsed_s: float
    machine: dict
    model_kwargs: dict = field(default_factory=dict)
    torch: str = torch.__version__
    note: str = ""

    def to_json(self) -> dict:
        return {
            "rows": [r.to_json() for r in self.rows],
            "lines": [line.to_json() for line in self.lines],
            "cards": self.cards,
            "reserve": self.reserve.to_json(),
            "elapsed_s": self.elapsed_s,
            "machine": self.machine,
            "model_kwargs": self.model_kwargs,
            "torch": self.torch,
            "note": self.note,
        }


def plan_fit(
    cards: list[Card],
    models=None,
    placements=None,
    precisions=None,
    *,
    reserve: Reserve | None = None,
    temporaries: bool = False,
    **model_kwargs,
) -> FitPlan:
    """Plans every configuration that applies once, and solves it on every card;
    ``temporaries``: one-device placements must also fit MemTracker's peak (slower)."""
    start = time.perf_counter()
    reserve = reserve or default_reserve()
    planned: dict[tuple, StepLine] = {}
    lines = []
    for m, p, q in configurations(models, placements, precisions):
        key = (m, _plan_layout(p).placement, q)  # ranks is planned as split: one plan for both
        if key not in planned:
            planned[key] = step_line(m, p, q, temporaries=temporaries, **model_kwargs)
        lines.append(dataclasses.replace(planned[key], placement=p, devices=device_labels(p)))
    rows = [solve(line, card, reserve) for card in cards for line in lines]
    return FitPlan(
        rows=rows,
        lines=lines,
        cards=[asdict(card) for card in cards],
        reserve=reserve,
        elapsed_s=time.perf_counter() - start,
        machine=machine_info(),
        model_kwargs=dict(model_kwargs),
        note=(
            "planned: each configuration's step accounted under FakeTensorMode at batch 2 and 4 (CPU "
            "autocast standing in for CUDA's), its memory solved as fixed + per image x batch; "
            + (
                "one-device placements also fit MemTracker's peak with temporaries (at batch 64 and 128, a line)"
                if temporaries
                else "temporaries are not in the estimate, the reserve stands for them"
            )
        ),
    )
