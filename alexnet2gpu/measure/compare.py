"""The main job: every net and placement this machine can run, side by side, for
parameters, memory per device, throughput over batch sizes and bytes exchanged.
Returns one plain :class:`CompareReport`; :mod:`alexnet2gpu.report.compare` renders it.

The matrix: ``simplified``, ``dual/towers``, ``dual/grouped``, ``dual/split``
(two GPUs; without them only its memory, estimated on ``cpu,cpu``), ``dual/ranks`` (a
2-process torchrun job, launched here when this process is not one, with its JSON read
back), and the peers ``half`` and ``torchvision``. Every figure carries its source
(measured or estimated) and device.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch

from ..errors import ConfigError
from ..parallel import TorchrunEnv, close_distributed
from .accounting import MemoryReport
from .bench import BenchResult, OverheadResult, measure_overhead, run_bench
from .launch import run_torchrun_job
from .memory import run_memory
from .timing import machine_info

__all__ = [
    "BASELINES",
    "VARIANTS",
    "CompareConfig",
    "CompareReport",
    "Variant",
    "VariantSpec",
    "plan_variants",
    "run_compare",
    "speedups",
    "units_of_work",
]


class VariantSpec(NamedTuple):
    """A row of the matrix: the net, its placement, and what it needs to be measured."""

    model: str
    placement: str
    devices: int = 1  # devices of one process (split: 2 GPUs)
    processes: int = 1  # a torchrun job of this many processes (ranks: 2)


# name -> what it runs; the order of the tables
VARIANTS = {
    "simplified": VariantSpec("simplified", "single"),
    "dual/towers": VariantSpec("dual", "towers"),
    "dual/grouped": VariantSpec("dual", "grouped"),
    "dual/split": VariantSpec("dual", "split", devices=2),
    "dual/ranks": VariantSpec("dual", "ranks", processes=2),
    "half": VariantSpec("half", "single"),
    "torchvision": VariantSpec("torchvision", "single"),
}
BASELINES = ("simplified", "dual/towers")  # speed-ups are given against these


@dataclass
class CompareConfig:
    """What ``compare`` measures. The defaults fit the 2-core CPU budget (10 minutes;
    ``quick()``: 2 minutes) at the nets' real sizes."""

    batch_sizes: list[int] = field(default_factory=lambda: [16, 32, 64])  # the throughput sweep
    memory_batch_size: int = 64  # the batch of the memory step
    repeats: int = 3  # timed repeats per figure (median, spread)
    warmup: int = 1  # untimed steps first
    steps: int = 1  # steps per timed repeat
    threads: int | None = 1  # CPU threads per process (None: torch's choice); ranks: per process too
    image_size: int | None = None  # None: each net's own (227; simplified 224)
    width: float = 1.0  # width multiplier for every net
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    overhead: bool = True  # also time bench against a plain PyTorch loop (simplified)
    ranks_timeout_s: float = 420.0  # each torchrun job for dual/ranks (bench, then memory)
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"unknown variant '{unknown[0]}': choose from {', '.join(VARIANTS)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1 or self.memory_batch_size < 1:
            raise ConfigError(f"batch sizes must be >= 1, got {self.batch_sizes} and {self.memory_batch_size}")
        if self.repeats < 1 or self.steps < 1 or self.warmup < 0:
            raise ConfigError(
                f"need repeats >= 1, steps >= 1, warmup >= 0; got {self.repeats}, {self.steps}, {self.warmup}"
            )
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")

    @classmethod
    def quick(cls, **overrides) -> CompareConfig:
        """The same matrix at the real sizes, smaller batches and fewer repeats."""
        values = {"batch_sizes": [8, 16], "memory_batch_size": 16, "repeats": 2}
        values.update(overrides)
        return cls(**values)

    def model_kwargs(self) -> dict:
        return {"image_size": self.image_size, "width": self.width}


@dataclass
class Variant:
    """One row of the comparison: a net in one placement and what was found."""

    name: str
    model: str
    placement: str
    devices: str  # where it ran, in words
    params: int  # parameters in all
    memory: MemoryReport | None
    results: list[BenchResult]
    comm_bytes_per_step: int  # at the memory batch, forward + backward
    note: str = ""  # e.g. why throughput is missing

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "model": self.model,
            "placement": self.placement,
            "devices": self.devices,
            "params": self.params,
            "comm_bytes_per_step": self.comm_bytes_per_step,
            "memory": self.memory.to_json() if self.memory else None,
            "results": [r.to_json() for r in self.results],
            "note": self.note,
        }


@dataclass
class CompareReport:
    variants: list[Variant]
    skipped: dict[str, str]  # variant -> why it was not run
    config: dict
    machine: dict
    overhead: OverheadResult | None
    wall_s: float
    command: str
    torch: str = torch.__version__

    def to_json(self) -> dict:
        return {
            "variants": [v.to_json() for v in self.variants],
            "skipped": self.skipped,
            "speedups": speedups(self.variants),
            "overhead": self.overhead.to_json() if self.overhead else None,
            "config": self.config,
            "torch": self.torch,
            "machine": self.machine,
            "wall_s": self.wall_s,
            "command": self.command,
        }


def speedups(variants: list[Variant]) -> list[dict]:
    """images/s of each variant over each baseline's, per mode and batch size (same
    machine, same run): ``{"name", "mode", "batch_size", "vs", "speedup"}``."""
    rates = {(v.name, r.mode, r.batch_size): r.images_per_s for v in variants for r in v.results}
    rows = []
    for (name, mode, batch), rate in rates.items():
        for base in BASELINES:
            ref = rates.get((base, mode, batch))
            if ref:
                rows.append({"name": name, "mode": mode, "batch_size": batch, "vs": base, "speedup": rate / ref})
    return rows


def plan_variants(config: CompareConfig) -> tuple[list[str], dict[str, str]]:
    """The variants this machine runs, and a reason for each one it skips or only estimates."""
    gpus = torch.cuda.device_count()
    run, notes = [], {}
    for name in config.variants:
        spec = VARIANTS[name]
        if spec.processes > 1 and gpus == 1:
            notes[name] = f"skipped: {spec.placement} puts one tower per GPU and this machine has 1 GPU"
            continue
        if spec.devices > 1 and gpus < spec.devices:
            notes[name] = (
                f"throughput not measured: {spec.placement} needs two GPUs and this machine has {gpus}; "
                "memory estimated for two devices (run on cpu,cpu)"
            )
        run.append(name)
    return run, notes


def _measurable(spec: VariantSpec) -> bool:
    """Its throughput can be measured here: the devices it needs exist."""
    return spec.devices == 1 or torch.cuda.device_count() >= spec.devices


def _devices_for(spec: VariantSpec) -> list[str] | None:
    """The devices of one process; None under torchrun (cuda:LOCAL_RANK, else the CPU)."""
    if spec.processes > 1:
        return None
    if torch.cuda.device_count() >= spec.devices:
        return [f"cuda:{i}" for i in range(spec.devices)]
    return ["cpu"] * spec.devices


def _param_count(report: MemoryReport | None) -> int:
    return sum(d.params for d in report.devices) if report else 0


def _size_flags(config: CompareConfig) -> list[str]:
    flags = ["--width", repr(config.width)]
    if config.image_size is not None:
        flags += ["--image-size", str(config.image_size)]
    return flags


def _ranks_flags(config: CompareConfig) -> list[str]:
    threads = ["--threads", str(config.threads)] if config.threads else []
    return ["--model", "dual", "--placement", "ranks", *_size_flags(config), "--seed", str(config.seed), *threads]


def _run_ranks(config: CompareConfig) -> Variant:
    """dual/ranks as a 2-process torchrun job (this process is not a torchrun worker)."""
    notes: list[str] = []
    job = {"threads": config.threads, "timeout_s": config.ranks_timeout_s}
    with tempfile.TemporaryDirectory(prefix="alexnet2gpu-ranks-") as tmp:
        sweep = ["--batch-sizes", ",".join(map(str, config.batch_sizes)), "--mode", "both"]
        timing = ["--repeats", str(config.repeats), "--warmup", str(config.warmup), "--steps", str(config.steps)]
        bench_argv = ["bench", *_ranks_flags(config), *sweep, *timing]
        bench = run_torchrun_job(bench_argv, os.path.join(tmp, "bench.json"), notes, **job)
        memory_argv = ["memory", *_ranks_flags(config), "--batch-size", str(config.memory_batch_size)]
        memory = run_torchrun_job(memory_argv, os.path.join(tmp, "memory.json"), notes, **job)
    results = [BenchResult(**r) for r in bench["results"]]
    report = MemoryReport.from_json(memory)
    note = "2 processes launched with torch.distributed.run (gloo on the CPU), one tower each"
    return _variant("dual/ranks", report, results, "; ".join([note, *notes]))


def _run_ranks_here(config: CompareConfig, on_repeat: Callable[[], None] | None) -> Variant:
    """dual/ranks in this torchrun job (every rank calls it): bench and memory collectively."""
    kwargs = config.model_kwargs()
    timing = {"warmup": config.warmup, "repeats": config.repeats, "steps": config.steps, "seed": config.seed}
    results = run_bench("dual", "ranks", None, batch_sizes=config.batch_sizes, on_repeat=on_repeat, **timing, **kwargs)
    report = run_memory("dual", "ranks", None, batch_size=config.memory_batch_size, seed=config.seed, **kwargs)
    if on_repeat is not None:
        on_repeat()
    world = results[0].processes if results else 2
    return _variant("dual/ranks", report, results, f"this torchrun job's {world} processes, one tower each")


def _variant(
    name: str, report: MemoryReport | None, results: list[BenchResult], note: str = "", devices: str = ""
) -> Variant:
    spec = VARIANTS[name]
    return Variant(
        name=name,
        model=spec.model,
        placement=spec.placement,
        devices=results[0].device if results else devices,
        params=_param_count(report),
        memory=report,
        results=results,
        comm_bytes_per_step=report.comm_bytes_per_step if report else 0,
        note=note,
    )


def _run_single(name: str, config: CompareConfig, on_repeat: Callable[[], None] | None) -> Variant:
    """A one-process variant: its memory step, then its throughput where it can be measured."""
    spec = VARIANTS[name]
    devices = _devices_for(spec)
    kwargs = config.model_kwargs()
    report = run_memory(
        spec.model, spec.placement, devices, batch_size=config.memory_batch_size, seed=config.seed, **kwargs
    )
    if on_repeat is not None:
        on_repeat()
    results = []
    if _measurable(spec):
        timing = {"warmup": config.warmup, "repeats": config.repeats, "steps": config.steps, "seed": config.seed}
        results = run_bench(
            spec.model, spec.placement, devices, batch_sizes=config.batch_sizes, on_repeat=on_repeat, **timing, **kwargs
        )
    return _variant(name, report, results, devices=",".join(devices or []))


def units_of_work(config: CompareConfig, names: list[str]) -> dict[str, int]:
    """Progress units per variant: one for the memory step, one per timed repeat."""
    per_variant = 1 + len(config.batch_sizes) * 2 * config.repeats
    return {name: per_variant for name in names}


def _ticker(on_progress: Callable[[int, str], None] | None, description: str) -> Callable[[], None]:
    return lambda: on_progress(1, description) if on_progress else None


def _run_variants(
    config: CompareConfig, names: list[str], notes: dict[str, str], on_progress: Callable[[int, str], None] | None
) -> list[Variant] | None:
    """Measures ``names``; None on a torchrun worker other than rank 0 (which only helps
    measure the distributed variant)."""
    variants = []
    env = TorchrunEnv.from_environ()
    distributed = [n for n in names if VARIANTS[n].processes > 1]
    if env.launched and distributed:
        # Started under torchrun: every rank measures dual/ranks here, then the group is
        # closed and rank 0 alone goes on with the single-process variants.
        try:
            variants.append(_run_ranks_here(config, _ticker(on_progress, distributed[0])))
        finally:
            close_distributed()
        names = [n for n in names if n not in distributed]
    if env.launched and not env.is_rank0:
        return None
    units = units_of_work(config, names)
    for name in names:
        if on_progress:
            on_progress(0, name)
        if VARIANTS[name].processes > 1:
            variant = _run_ranks(config)
            if on_progress:
                on_progress(units[name], name)
        else:
            variant = _run_single(name, config, _ticker(on_progress, name))
            if not variant.results and on_progress:
                on_progress(units[name] - 1, name)
        variant.note = "; ".join(filter(None, [variant.note, notes.get(name, "")]))
        variants.append(variant)
    return variants


def _run_overhead(config: CompareConfig, on_progress: Callable[[int, str], None] | None) -> OverheadResult:
    what = "harness against a plain loop"
    if on_progress:
        on_progress(0, what)
    return measure_overhead(
        "simplified",
        device=_devices_for(VARIANTS["simplified"])[0],
        batch_size=max(config.batch_sizes),
        warmup=config.warmup,
        repeats=config.repeats,
        steps=config.steps,
        seed=config.seed,
        on_repeat=_ticker(on_progress, what),
        **config.model_kwargs(),
    )


def run_compare(
    config: CompareConfig,
    *,
    command: str = "",
    on_progress: Callable[[int, str], None] | None = None,
) -> CompareReport | None:
    """Runs the matrix. ``on_progress(units, description)`` is called as work completes
    (see :func:`units_of_work`; the overhead check adds ``config.repeats`` units). Under
    torchrun every rank runs dual/ranks, and only rank 0 the rest: other ranks get None."""
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    machine_before = machine_info()
    names, notes = plan_variants(config)
    try:
        variants = _run_variants(config, names, notes, on_progress)
        if variants is None:
            return None
        overhead = _run_overhead(config, on_progress) if config.overhead else None
    finally:
        torch.set_num_threads(previous_threads)
    order = list(VARIANTS)
    variants.sort(key=lambda v: order.index(v.name))
    machine = machine_info()
    machine["load_average_before"] = machine_before["load_average"]
    return CompareReport(
        variants=variants,
        skipped={n: why for n, why in notes.items() if n not in names},
        config=asdict(config),
        machine=machine,
        overhead=overhead,
        wall_s=time.perf_counter() - started,
        command=command,
    )
