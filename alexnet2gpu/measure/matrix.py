"""What ``compare`` measures and what it returns: the matrix of variants (a net in one
placement, eager or compiled), its settings, the plain records of the comparison, and the
ratios read off them (speed-ups over the baselines, the compiled gain of each variant).
:mod:`.compare` runs it; :mod:`alexnet2gpu.report.compare` renders it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..errors import ConfigError
from .accounting import MemoryReport
from .bench import BenchResult, OverheadResult

__all__ = [
    "BASELINES",
    "COMPILED",
    "VARIANTS",
    "CompareConfig",
    "CompareReport",
    "Variant",
    "VariantSpec",
    "compiled_gains",
    "eager_name",
    "speedups",
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
COMPILED = "+compile"  # the suffix of a compiled variant's name: dual/towers+compile


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
    compile: bool = False  # also measure each variant under torch.compile (the "+compile" rows)

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]  # "+compile" rows come from `compile`
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


def eager_name(name: str) -> str:
    """``dual/towers+compile`` -> ``dual/towers``: the row of the matrix a variant comes from."""
    return name.removesuffix(COMPILED)


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
    compiled: bool = False  # measured under torch.compile (its memory is not measured)

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
            "compiled": self.compiled,
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
            "compiled_gains": compiled_gains(self.variants),
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


def compiled_gains(variants: list[Variant]) -> list[dict]:
    """The compiled variant's images/s over its eager twin's, per mode and batch size (same
    run): ``{"name", "mode", "batch_size", "eager", "compiled", "gain"}``, ``name`` the
    eager variant's."""
    rates = {(v.name, r.mode, r.batch_size): r.images_per_s for v in variants for r in v.results}
    rows = []
    for v in variants:
        if not v.compiled:
            continue
        for r in v.results:
            eager = rates.get((eager_name(v.name), r.mode, r.batch_size))
            if eager:
                row = {"name": eager_name(v.name), "mode": r.mode, "batch_size": r.batch_size}
                rows.append({**row, "eager": eager, "compiled": r.images_per_s, "gain": r.images_per_s / eager})
    return rows
