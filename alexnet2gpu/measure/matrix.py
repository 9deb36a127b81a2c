"""What ``compare`` measures and what it returns: the matrix of variants (a net in one
placement, eager or compiled), its settings, the plain records of the comparison, and the
ratios read off them (speed-ups over the baselines, the compiled gain of each variant, the
gain of each low-precision variant over its float32 twin).

A variant's name is its row of the matrix, then ``+bf16`` or ``+fp16`` where it runs under
autocast in that precision, then ``+compile`` where it runs compiled:
``dual/towers+bf16+compile``.
:mod:`.compare` runs it; :mod:`alexnet2gpu.report.compare` renders it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..errors import ConfigError
from ..parallel.names import PRECISIONS
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
    "base_name",
    "compiled_gains",
    "eager_name",
    "precision_gains",
    "precision_of",
    "speedups",
    "variant_name",
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
    ranks_timeout_s: float = 420.0  # the 2-process job for dual/ranks (bench and memory; parallel.processes)
    seed: int = 0
    compile: bool = False  # also measure each variant under torch.compile (the "+compile" rows)
    # the precisions of the rows (fp32 rows keep their names, others get "+bf16"/"+fp16");
    # None: fp32, and bf16 too where CUDA runs the steps (:meth:`resolved_precisions`)
    precisions: list[str] | None = None
    channels_last: bool = False  # every net and batch in channels-last memory format

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
        bad = [p for p in self.precisions or [] if p not in PRECISIONS]
        if bad or self.precisions == []:
            raise ConfigError(f"unknown precision '{bad[0] if bad else ''}': choose from {', '.join(PRECISIONS)}")

    def resolved_precisions(self) -> list[str]:
        """``precisions``, or by default fp32 and, where a CUDA device runs the steps, bf16."""
        if self.precisions is not None:
            return list(dict.fromkeys(self.precisions))
        return ["fp32", "bf16"] if torch.cuda.is_available() else ["fp32"]

    @classmethod
    def quick(cls, **overrides) -> CompareConfig:
        """The same matrix at the real sizes, smaller batches and fewer repeats."""
        values = {"batch_sizes": [8, 16], "memory_batch_size": 16, "repeats": 2}
        values.update(overrides)
        return cls(**values)

    def model_kwargs(self) -> dict:
        return {"image_size": self.image_size, "width": self.width}


def eager_name(name: str) -> str:
    """``dual/towers+bf16+compile`` -> ``dual/towers+bf16``: the eager twin of a variant."""
    return name.removesuffix(COMPILED)


def precision_of(name: str) -> str:
    """``dual/towers+bf16+compile`` -> ``bf16``; fp32 where the name says none."""
    return next((p for p in PRECISIONS[1:] if eager_name(name).endswith("+" + p)), "fp32")


def base_name(name: str) -> str:
    """``dual/towers+bf16+compile`` -> ``dual/towers``: the row of the matrix (a key of ``VARIANTS``)."""
    eager = eager_name(name)
    precision = precision_of(name)
    return eager if precision == "fp32" else eager.removesuffix("+" + precision)


def variant_name(base: str, precision: str = "fp32", compiled: bool = False) -> str:
    """The inverse of :func:`base_name`, :func:`precision_of` and compiled-or-not."""
    return base + ("" if precision == "fp32" else "+" + precision) + (COMPILED if compiled else "")


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
    precision: str = "fp32"  # fp32, or autocast to bf16/fp16 (the name says so too)

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
            "precision": self.precision,
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
    numerics: dict = field(default_factory=dict)  # precision -> Numerics.record() of its rows

    def to_json(self) -> dict:
        return {
            "variants": [v.to_json() for v in self.variants],
            "numerics": self.numerics,
            "skipped": self.skipped,
            "speedups": speedups(self.variants),
            "compiled_gains": compiled_gains(self.variants),
            "precision_gains": precision_gains(self.variants),
            "overhead": self.overhead.to_json() if self.overhead else None,
            "config": self.config,
            "torch": self.torch,
            "machine": self.machine,
            "wall_s": self.wall_s,
            "command": self.command,
        }


def speedups(variants: list[Variant]) -> list[dict]:
    """images/s of each variant over each baseline's in the same precision (eager), per
    mode and batch size (same machine, same run): ``{"name", "mode", "batch_size", "vs",
    "speedup"}``, ``vs`` the baseline's row name (``dual/towers`` for every precision)."""
    rates = {(v.name, r.mode, r.batch_size): r.images_per_s for v in variants for r in v.results}
    rows = []
    for (name, mode, batch), rate in rates.items():
        for base in BASELINES:
            ref = rates.get((variant_name(base, precision_of(name)), mode, batch))
            if ref:
                rows.append({"name": name, "mode": mode, "batch_size": batch, "vs": base, "speedup": rate / ref})
    return rows


def precision_gains(variants: list[Variant]) -> list[dict]:
    """A low-precision variant's images/s over its float32 twin's (same compilation), per
    mode and batch size (same run): ``{"name", "precision", "mode", "batch_size", "fp32",
    "rate", "gain"}``, ``name`` the float32 twin's."""
    rates = {(v.name, r.mode, r.batch_size): r.images_per_s for v in variants for r in v.results}
    rows = []
    for v in variants:
        if v.precision == "fp32":
            continue
        twin = variant_name(base_name(v.name), "fp32", v.compiled)
        for r in v.results:
            fp32 = rates.get((twin, r.mode, r.batch_size))
            if fp32:
                row = {"name": twin, "precision": v.precision, "mode": r.mode, "batch_size": r.batch_size}
                rows.append({**row, "fp32": fp32, "rate": r.images_per_s, "gain": r.images_per_s / fp32})
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
