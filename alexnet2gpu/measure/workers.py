"""Two workers, three ways (issue 17, "Compared"): for each net, one device beside the ways
to use two processes — the 2012 towers (``ranks``, ``dual`` only), data parallel
(``replicas``) and the 2014 hybrid (``hybrid``, single-stream nets) — with, per way, the
memory each process holds, the bytes each process sends per step counted at the collectives
beside the closed form (:mod:`alexnet2gpu.parallel.traffic`), and the throughput.

**One launch.** :func:`measure_workers` starts the processes once through
:func:`~.processes.launch` (``elastic_launch``, ``@record``) and gets the records back as
rank 0's return value; a failing rank comes back as one
:class:`~alexnet2gpu.parallel.processes.WorkersFailed` naming it and its exception.

**Per net, in every process at once:**

* every way is placed side by side (``one device``: the net on this process alone,
  ``towers`` for ``dual``, ``single`` for the others; no collectives);
* a first training step per way, counted and accounted: the bytes sent at the collectives
  (:func:`~alexnet2gpu.parallel.traffic.count_collectives`, ``ranks``'s exchange counter)
  and the memory (below); then ``warmup`` untimed steps;
* ``repeats`` rounds; in each, every way is timed for ``steps`` steps, the ways in an order
  rotated by one each round, so that the machine's load hits each way alike. Every timing
  ends at a barrier, so it is the slower process's time; throughput is images/s of the
  *global* batch (``batch_size``: 64 per process under data parallel and hybrid, the whole
  batch on each tower's process under ``ranks``, the whole batch on one process for
  ``one device``). ``one device`` runs on every process at the same time (each its own
  copy, no communication): the machine is as loaded as under the other ways, and the
  figure is what one process does with its share of it (one core at ``threads=1``).

**Memory per process.** Parameters, gradients and momentum are the bytes of the tensors
this process holds (a DTensor's local shard; the other tower of ``ranks`` is on the meta
device and holds nothing). On the CPU activations are the tensors autograd saves,
accounted by the estimator's rule (:class:`~.estimate.SavedTensorAccountant`, here on
DTensors' local shards) and the peak is
their sum with the input: labelled ``estimated``; DDP's gradient buckets (about the
all-reduced gradients' bytes again) and temporaries are not in it. On CUDA the peak is
``max_memory_allocated`` over one step after a warm-up step and the activations the growth
of ``memory_allocated`` during the forward pass: labelled ``measured``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import torch
from torch import nn

from ..data.shares import local_batch
from ..models import build_model, is_two_tower
from ..parallel import forward_loss, place
from ..parallel.processes import launch
from ..parallel.traffic import closed_form_bytes, counted_bytes
from .accounting import collectives_counted, reset_exchange_counter
from .estimate import SavedTensorAccountant
from .timing import rates_summary, synchronize, time_repeats
from .workload import make_batch, make_optimizer, train_step

__all__ = [
    "MODELS",
    "workers_run",
    "ProcessMemory",
    "TrafficLine",
    "WorkerRecord",
    "crossing",
    "measure_workers",
    "traffic_lines",
    "ways_for",
]

MODELS = ("dual", "torchvision", "simplified")
ONE_DEVICE, TOWERS, DATA_PARALLEL, HYBRID = "one device", "towers", "data parallel", "hybrid"


def ways_for(model_name: str) -> list[tuple[str, str]]:
    """(way, placement) for a net: one device, then the towers (``dual``) or the hybrid
    (single-stream nets), and data parallel for every net."""
    if model_name == "dual":
        return [(ONE_DEVICE, "towers"), (TOWERS, "ranks"), (DATA_PARALLEL, "replicas")]
    return [(ONE_DEVICE, "single"), (DATA_PARALLEL, "replicas"), (HYBRID, "hybrid")]


@dataclass
class ProcessMemory:
    """What one process holds for one training step, in bytes."""

    rank: int
    source: str  # "estimated" (CPU: accounted from the tensors) or "measured" (CUDA allocator)
    params: int  # parameters held here (local shards)
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int  # SGD momentum
    activations_bytes: int
    input_bytes: int
    peak_bytes: int


@dataclass
class WorkerRecord:
    """One way of one net: memory per process, bytes sent per process, throughput."""

    model: str
    way: str  # "one device", "towers", "data parallel", "hybrid"
    placement: str
    processes: int  # processes the way uses (1 for one device)
    batch_size: int  # the global batch
    image_size: int
    width: float
    threads: int  # CPU threads per process
    device: str  # "cpu" or "cuda"
    memory: list[ProcessMemory] = field(default_factory=list)
    sent_bytes: list[float] = field(default_factory=list)  # counted per process, one step
    closed_form_bytes: float | None = None  # per process, one step (None: sends nothing)
    sent_by_kind: dict[str, float] = field(default_factory=dict)  # rank 0's, by collective
    images_per_s: float = 0.0  # median of the rounds, global batch
    spread_images_per_s: float = 0.0  # half the range
    rates: list[float] = field(default_factory=list)  # every round's images/s
    steps: int = 1  # timed steps per round
    torch: str = torch.__version__
    note: str = ""

    @property
    def bytes_match(self) -> bool:
        expected = self.closed_form_bytes or 0.0
        return all(sent == expected for sent in self.sent_bytes)

    def to_json(self) -> dict:
        return {**asdict(self), "bytes_match": self.bytes_match}

    @classmethod
    def from_json(cls, data: dict) -> WorkerRecord:
        data = {k: v for k, v in data.items() if k != "bytes_match"}
        return cls(**{**data, "memory": [ProcessMemory(**m) for m in data.get("memory", [])]})


# --- closed forms as lines over the batch ------------------------------------------------


@dataclass(frozen=True)
class TrafficLine:
    """A way's closed form, bytes each process sends per step = ``fixed + per_image x B``
    for a global batch ``B`` (every closed form of :mod:`~alexnet2gpu.parallel.traffic` is
    affine in the batch). Fractions: exact."""

    model: str
    way: str
    processes: int
    fixed: Fraction
    per_image: Fraction

    def bytes_at(self, batch: float) -> float:
        return float(self.fixed + self.per_image * Fraction(batch))

    def to_json(self) -> dict:  # the fractions exact, as "numerator/denominator" strings
        return {**asdict(self), "fixed": str(self.fixed), "per_image": str(self.per_image)}

    @classmethod
    def from_json(cls, data: dict) -> TrafficLine:
        return cls(**{**data, "fixed": Fraction(data["fixed"]), "per_image": Fraction(data["per_image"])})


def traffic_lines(models=MODELS, processes: int = 2, **model_kwargs) -> list[TrafficLine]:
    """The closed forms of every multi-process way of ``models`` as lines, from the nets
    built on the meta device, checked affine at a large batch."""
    lines = []
    for name in models:
        with torch.device("meta"):
            model = build_model(name, **model_kwargs)
        for way, placement in ways_for(name):
            if way == ONE_DEVICE:
                continue
            at = [Fraction(closed_form_bytes(placement, model, b, processes)) for b in (0, processes, 4096)]
            per_image = (at[1] - at[0]) / processes
            if at[2] != at[0] + per_image * 4096:
                raise AssertionError(f"{name} {way}: the closed form is not affine in the batch")
            lines.append(TrafficLine(name, way, processes, at[0], per_image))
    return lines


def crossing(a: TrafficLine, b: TrafficLine) -> Fraction | None:
    """The global batch at which ``a`` and ``b`` send the same (solved exactly); None if
    they never cross at a positive batch. Below it the way with the smaller ``per_image``
    sends more, above it less."""
    if a.per_image == b.per_image:
        return None
    batch = (b.fixed - a.fixed) / (a.per_image - b.per_image)
    return batch if batch > 0 else None


# --- inside each process -----------------------------------------------------------------


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor's local shard; a plain tensor as it is."""
    if t is None or not hasattr(t, "to_local"):
        return t
    with torch.no_grad():
        return t.to_local()


def _nbytes(t: torch.Tensor | None) -> int:
    t = _local(t)
    return 0 if t is None or t.is_meta else t.numel() * t.element_size()


def _state_memory(placed: nn.Module, optimizer, rank: int, source: str) -> dict:
    params = [p for p in placed.parameters() if not p.is_meta]
    momentum = [v for p in params for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
    return {
        "rank": rank,
        "source": source,
        "params": sum(_local(p).numel() for p in params),
        "params_bytes": sum(_nbytes(p) for p in params),
        "grads_bytes": sum(_nbytes(p.grad) for p in params),
        "optimizer_bytes": sum(_nbytes(v) for v in momentum),
    }


def _counted_step(placed: nn.Module, optimizer, x, y) -> tuple[ProcessMemory, float, dict]:
    """One training step, counted (bytes sent) and accounted (memory; on CUDA measured over
    this step, which then follows a warm-up step)."""
    device = placed.layout.device
    cuda = device.type == "cuda"
    if cuda:
        train_step(placed, optimizer, x, y)
        synchronize([device])
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    counter = placed.exchange_counter
    reset_exchange_counter(placed)
    optimizer.zero_grad(set_to_none=True)
    with collectives_counted(placed):
        with SavedTensorAccountant(placed, 1, skip=[x]) as saved:
            loss = forward_loss(placed, x, y)
        if cuda:
            synchronize([device])
            activations = torch.cuda.memory_allocated(device) - before
        loss.backward()
    optimizer.step()
    synchronize([device])
    rank = torch.distributed.get_rank()
    state = _state_memory(placed, optimizer, rank, "measured" if cuda else "estimated")
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
    else:
        # the estimator's rule; joined or cast copies of the weights (grouped's) stay in this figure
        activations = saved.activations[0] + saved.weight_casts[0]
        peak = state["params_bytes"] + state["grads_bytes"] + state["optimizer_bytes"] + activations + _nbytes(x)
    memory = ProcessMemory(**state, activations_bytes=activations, input_bytes=_nbytes(x), peak_bytes=peak)
    if counter is not None:
        return memory, float(counter.bytes), {"tower exchanges": float(counter.bytes)}
    if placed.traffic is not None:
        return memory, float(counted_bytes(placed)), placed.traffic.by_kind()
    return memory, 0.0, {}


def _gather(value):
    every: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, value)
    return every


def _release(placed: nn.Module) -> None:
    if placed.layout.distributed:
        torch.distributed.barrier()
    placed.release_groups()


@dataclass
class _Way:
    name: str
    placement: str
    placed: nn.Module
    step: object
    record: WorkerRecord
    seconds: list[float] = field(default_factory=list)


def _place_way(model: nn.Module, name: str, way: str, placement: str, settings: dict) -> _Way:
    device = torch.device("cuda", torch.cuda.current_device()) if settings["device"] == "cuda" else torch.device("cpu")
    placed = place(copy.deepcopy(model), placement, devices=[device])
    placed.train()
    batch = settings["batch_size"]
    x, y = make_batch(placed, batch, seed=settings["seed"])
    optimizer = make_optimizer(placed)
    memory, sent, by_kind = _counted_step(placed, optimizer, x, y)
    processes = 1 if way == ONE_DEVICE else torch.distributed.get_world_size()
    record = WorkerRecord(
        model=name,
        way=way,
        placement=placement,
        processes=processes,
        batch_size=batch,
        image_size=model.image_size,
        width=settings["width"],
        threads=torch.get_num_threads(),
        device=device.type,
        memory=_gather(memory)[:processes],
        sent_bytes=_gather(sent)[:processes],
        closed_form_bytes=None if way == ONE_DEVICE else float(closed_form_bytes(placement, model, batch, processes)),
        sent_by_kind=by_kind,
        steps=settings["steps"],
    )
    return _Way(way, placement, placed, lambda: train_step(placed, optimizer, x, y), record)


def _measure_net(name: str, settings: dict) -> list[WorkerRecord]:
    """Every way of net ``name`` in this process: placed, counted, then timed in rounds."""
    torch.manual_seed(settings["seed"])
    model = build_model(name, image_size=settings["image_size"], width=settings["width"])
    ways = [_place_way(model, name, way, placement, settings) for way, placement in ways_for(name)]
    device = [ways[0].placed.layout.device]
    for way in ways:
        for _ in range(settings["warmup"]):
            way.step()
    for round_ in range(settings["repeats"]):
        shift = round_ % len(ways)
        for way in ways[shift:] + ways[:shift]:
            way.seconds += time_repeats(way.step, device, warmup=0, repeats=1, steps=settings["steps"])
    records = []
    for way in ways:
        median, spread, rates = rates_summary(settings["batch_size"], way.seconds)
        record = way.record
        record.images_per_s, record.spread_images_per_s, record.rates = median, spread, rates
        record.note = _note(way, is_two_tower(model), settings)
        records.append(record)
        _release(way.placed)
    return records


def _note(way: _Way, two_tower: bool, settings: dict) -> str:
    source = way.record.memory[0].source if way.record.memory else ""
    rounds = (
        f"{settings['repeats']} interleaved rounds of {settings['steps']} step(s) after {settings['warmup']} warm-up"
    )
    if way.name == ONE_DEVICE:
        return f"{rounds}; memory {source}; one process, run on every process at once (no communication)"
    fused = " (dual fused as the grouped net)" if two_tower and way.placement == "replicas" else ""
    return f"{rounds}; memory {source} per process{fused}"


def workers_job(models: tuple[str, ...], settings: dict) -> list[dict]:
    """What every launched process runs: each net's ways in turn; JSON-ready records."""
    return [r.to_json() for name in models for r in _measure_net(name, settings)]


def measure_workers(
    models=MODELS,
    *,
    batch_size: int = 128,
    processes: int = 2,
    image_size: int | None = None,
    width: float = 1.0,
    threads: int = 1,
    repeats: int = 3,
    steps: int = 1,
    warmup: int = 1,
    seed: int = 0,
    device: str = "cpu",
    timeout_s: float = 3600.0,
) -> list[WorkerRecord]:
    """The two-workers comparison of ``models`` at global ``batch_size`` over ``processes``
    processes of ``threads`` CPU threads each (``device`` ``cpu``, or ``cuda``: one GPU per
    process), launched once (:func:`~.processes.launch`); the records in the order of
    :func:`ways_for` per net. ``image_size`` None: each net's own. Raises
    :class:`~alexnet2gpu.parallel.processes.WorkersFailed` naming the rank and exception if a process fails, and
    ``ConfigError`` if the batch does not divide over the processes."""

    local_batch(batch_size, processes)  # every process an equal share, or one clear refusal
    settings = {
        "batch_size": batch_size,
        "image_size": image_size,
        "width": width,
        "repeats": repeats,
        "steps": steps,
        "warmup": warmup,
        "seed": seed,
        "device": device,
    }
    found = launch(
        workers_job, tuple(models), settings, processes=processes, threads=threads, timeout_s=timeout_s, device=device
    )
    return [WorkerRecord.from_json(r) for r in found]


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def workers_run(models=MODELS, *, command: str, processes: int = 2, **settings) -> dict:
    """:func:`measure_workers` with what a record of it needs: the command, the load average
    before and after, the seconds, the machine, the settings, the records and the closed
    forms' lines (what ``compare --workers`` and ``scripts/two_workers.py`` write)."""
    from .timing import machine_info

    models = tuple(models)
    net_size = {k: settings[k] for k in ("image_size", "width") if settings.get(k) is not None}
    before, start = _loadavg(), time.perf_counter()
    records = measure_workers(models, processes=processes, **settings)
    return {
        "command": command,
        "loadavg_before": before,
        "loadavg_after": _loadavg(),
        "seconds": round(time.perf_counter() - start, 1),
        "machine": machine_info(),
        "settings": {"models": list(models), "processes": processes, **settings},
        "records": [r.to_json() for r in records],
        "lines": [line.to_json() for line in traffic_lines(models, processes, **net_size)],
    }
