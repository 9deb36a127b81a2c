"""The main job: every net and placement this machine can run, side by side, for
parameters, memory per device, throughput over batch sizes and bytes exchanged.
Returns one plain :class:`CompareReport`; :mod:`alexnet2gpu.report.compare` renders it.

The matrix (:mod:`.matrix`): ``simplified``, ``dual/towers``, ``dual/grouped``,
``dual/split`` (two GPUs; without them only its memory, estimated for cuda:0 and cuda:1),
``dual/ranks`` (2 processes, started here through :func:`~alexnet2gpu.parallel.processes.launch`
when this process is not a torchrun worker, with rank 0's record back as data), and the
peers ``half`` and ``torchvision``; with ``compile``, each measurable one again under
``torch.compile`` as ``NAME+compile``; in each precision of ``config.resolved_precisions()``
beyond fp32 (bf16 by default on CUDA), each one again under autocast as ``NAME+bf16``.
Every figure carries its source (measured or estimated), its device and its numerics
(precision, memory format, cudnn.benchmark, TF32).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from ..parallel import Numerics, TorchrunEnv, close_distributed, default_device, set_cpu_threads
from ..parallel.processes import WorkersFailed, launch
from .accounting import MemoryReport
from .bench import BenchResult, OverheadResult, measure_overhead, run_bench
from .matrix import (
    COMPILED,
    VARIANTS,
    CompareConfig,
    CompareReport,
    Variant,
    VariantSpec,
    base_name,
    eager_name,
    precision_of,
    variant_name,
)
from .memory import run_memory
from .timing import machine_info

__all__ = ["numerics_for", "plan_variants", "run_compare", "units_of_work"]


def plan_variants(config: CompareConfig) -> tuple[list[str], dict[str, str]]:
    """The variants this machine runs (in every precision of the config, ``NAME+bf16``
    beyond fp32; with ``config.compile``, each measurable one also as ``NAME+compile``),
    and a reason for each one it skips or only estimates."""
    gpus = torch.cuda.device_count()
    run, notes = [], {}
    for precision in config.resolved_precisions():
        for row in config.variants:
            spec, name = VARIANTS[row], variant_name(row, precision)
            if spec.processes > 1 and gpus == 1:
                notes[name] = f"skipped: {spec.placement} puts one tower per GPU and this machine has 1 GPU"
                continue
            run.append(name)
            if not _measurable(spec):
                notes[name] = (
                    f"throughput not measured: {spec.placement} needs two GPUs and this machine has {gpus}; "
                    "memory estimated for cuda:0 and cuda:1 (one real step on CPU stand-ins)"
                )
                if config.compile:
                    notes[name + COMPILED] = f"skipped: {spec.placement} needs two GPUs to be measured at all"
            elif config.compile:
                run.append(name + COMPILED)
                notes[name + COMPILED] = "compiled with torch.compile (inductor, static shapes); memory not measured"
    return run, notes


def numerics_for(name: str, config: CompareConfig) -> Numerics:
    """The arithmetic of a variant: its name's precision, the config's memory format."""
    return Numerics(precision_of(name), channels_last=config.channels_last)


def _memory_takes_numerics() -> bool:
    """``run_memory`` measures under a precision (its ``numerics`` keyword) in this tree."""
    return "numerics" in inspect.signature(run_memory).parameters


def _memory(spec: VariantSpec, devices, config: CompareConfig, numerics: Numerics) -> MemoryReport | None:
    """The memory step of a variant; None where ``run_memory`` cannot run it in its
    numerics (a tree whose memory step predates them)."""
    kwargs = {"batch_size": config.memory_batch_size, "seed": config.seed, **config.model_kwargs()}
    if _memory_takes_numerics():
        kwargs["numerics"] = numerics
    elif numerics != Numerics():
        return None
    return run_memory(spec.model, spec.placement, devices, **kwargs)


def _measurable(spec: VariantSpec) -> bool:
    """Its throughput can be measured here: the devices it needs exist."""
    return spec.devices == 1 or torch.cuda.device_count() >= spec.devices


def _devices_for(spec: VariantSpec) -> list[str] | None:
    """The devices of one process; None: the placement's own (cuda:LOCAL_RANK, else the CPU,
    under torchrun; cuda:0,cuda:1 for split, planned where they are absent)."""
    if spec.processes > 1 or spec.devices > 1:
        return None
    return ["cuda:0"] if torch.cuda.device_count() else ["cpu"]


def _param_count(report: MemoryReport | None) -> int:
    return sum(d.params for d in report.devices) if report else 0


def _timing(config: CompareConfig) -> dict:
    return {"warmup": config.warmup, "repeats": config.repeats, "steps": config.steps, "seed": config.seed}


def _ranks_job(config: CompareConfig, name: str) -> Variant:
    """What each launched worker runs for dual/ranks: the measurement in this job (module
    level: spawn pickles it by name; rank 0's :class:`Variant` comes back by pickle)."""
    return _run_ranks_here(config, None, name)


def _run_ranks(config: CompareConfig, name: str) -> Variant:
    """dual/ranks (in ``name``'s precision) as 2 processes started here through the one
    launcher (:func:`~alexnet2gpu.parallel.processes.launch`; this process is not a
    torchrun worker): bench, then memory, in one job, and rank 0's record back as data.

    A failure is one :class:`WorkersFailed` naming the rank, never tried again: the
    record comes back in memory or not at all (no file half there), and the crash at exit
    that once made a retry worth it (gloo's threads, "terminate called without an active
    exception") is gone at its source (:func:`~alexnet2gpu.parallel.close_distributed`)."""
    device = "cpu" if default_device(0).type == "cpu" else "cuda"  # cuda: each rank its cuda:LOCAL_RANK
    try:
        variant = launch(
            _ranks_job,
            config,
            name,
            processes=2,
            threads=config.threads or 1,
            timeout_s=config.ranks_timeout_s,
            device=device,
        )
    except WorkersFailed as error:
        raise WorkersFailed(f"dual/ranks: {error}", rank=error.rank, exception=error.exception) from None
    notes = [_ranks_note()]
    if variant.memory is None and name == eager_name(name):
        notes.append(f"memory not measured: this tree's memory step takes no {numerics_for(name, config).precision}")
    variant.note = "; ".join(notes)
    return variant


def _ranks_note(nproc: int = 2) -> str:
    """Where the launched job runs, by the workers' own rule: each takes its local rank's
    default (:func:`alexnet2gpu.parallel.default_device`: cuda:LOCAL_RANK where CUDA
    exists, else the CPU), and the towers' tensors go through NCCL on CUDA, gloo on the CPU
    (as :meth:`~alexnet2gpu.parallel.Layout.describe` says). On one GPU
    :func:`plan_variants` skips dual/ranks: rank 1 would want a cuda:1 that is not there."""
    devices = [default_device(local_rank) for local_rank in range(nproc)]
    if all(d.type == "cpu" for d in devices):
        where = "on the CPU (gloo)"
    else:
        where = f"on {', '.join(map(str, devices[:-1]))} and {devices[-1]} (NCCL)"
    return f"{nproc} processes launched with torch.distributed.launcher (elastic_launch), one tower each, {where}"


def _run_ranks_here(config: CompareConfig, on_repeat: Callable[[], None] | None, name: str) -> Variant:
    """dual/ranks in this torchrun job (every rank calls it): bench and memory collectively."""
    numerics, compiled = numerics_for(name, config), name != eager_name(name)
    results = run_bench(
        "dual",
        "ranks",
        None,
        batch_sizes=config.batch_sizes,
        on_repeat=on_repeat,
        compiled=compiled,
        numerics=numerics,
        **_timing(config),
        **config.model_kwargs(),
    )
    report = None
    if not compiled:
        report = _memory(VARIANTS["dual/ranks"], None, config, numerics)
        if on_repeat is not None:
            on_repeat()
    world = results[0].processes if results else 2
    return _variant(name, report, results, f"this torchrun job's {world} processes, one tower each")


def _variant(name: str, report: MemoryReport | None, results: list[BenchResult], note: str = "") -> Variant:
    spec = VARIANTS[base_name(name)]
    return Variant(
        name=name,
        model=spec.model,
        placement=spec.placement,
        devices=results[0].device if results else ",".join(d.device for d in report.devices) if report else "",
        params=_param_count(report),
        memory=report,
        results=results,
        comm_bytes_per_step=report.comm_bytes_per_step if report else 0,
        note=note,
        compiled=name != eager_name(name),
        precision=precision_of(name),
    )


def _run_single(name: str, config: CompareConfig, on_repeat: Callable[[], None] | None) -> Variant:
    """A one-process variant: its memory step (eager only), then its throughput where it
    can be measured."""
    spec, compiled = VARIANTS[base_name(name)], name != eager_name(name)
    devices = _devices_for(spec)
    kwargs = config.model_kwargs()
    numerics = numerics_for(name, config)
    report = None
    if not compiled:
        report = _memory(spec, devices, config, numerics)
        if on_repeat is not None:
            on_repeat()
    results = []
    if _measurable(spec):
        results = run_bench(
            spec.model,
            spec.placement,
            devices,
            batch_sizes=config.batch_sizes,
            on_repeat=on_repeat,
            compiled=compiled,
            numerics=numerics,
            **_timing(config),
            **kwargs,
        )
    note = "" if report or compiled else f"memory not measured: this tree's memory step takes no {numerics.precision}"
    return _variant(name, report, results, note)


def units_of_work(config: CompareConfig, names: list[str]) -> dict[str, int]:
    """Progress units per variant: one for the memory step (eager variants), one per timed repeat."""
    repeats = len(config.batch_sizes) * 2 * config.repeats
    return {name: repeats + (name == eager_name(name)) for name in names}


def _ticker(on_progress: Callable[[int, str], None] | None, description: str) -> Callable[[], None]:
    return lambda: on_progress(1, description) if on_progress else None


def _run_variants(
    config: CompareConfig, names: list[str], notes: dict[str, str], on_progress: Callable[[int, str], None] | None
) -> list[Variant] | None:
    """Measures ``names``; None on a torchrun worker other than rank 0 (which only helps
    measure the distributed variant)."""
    variants = []
    env = TorchrunEnv.from_environ()
    distributed = [n for n in names if VARIANTS[base_name(n)].processes > 1]
    if env.launched and distributed:
        # Started under torchrun: every rank measures dual/ranks here, then the group is
        # closed and rank 0 alone goes on with the single-process variants.
        try:
            for name in distributed:
                variants.append(_run_ranks_here(config, _ticker(on_progress, name), name))
        finally:
            close_distributed()
        names = [n for n in names if n not in distributed]
    if env.launched and not env.is_rank0:
        return None
    units = units_of_work(config, names)
    for name in names:
        if on_progress:
            on_progress(0, name)
        if VARIANTS[base_name(name)].processes > 1:
            variant = _run_ranks(config, name)  # its workers report no progress: all its units at the end
            if on_progress:
                on_progress(units[name], name)
        else:
            variant = _run_single(name, config, _ticker(on_progress, name))
            if not variant.results and on_progress:
                on_progress(units[name] - 1, name)
        variant.note = "; ".join(filter(None, [variant.note, notes.get(name, "")]))
        variants.append(variant)
    params = {v.name: v.params for v in variants}
    for v in variants:
        # a compiled row holds its eager twin's; a row without memory its float32 twin's
        v.params = v.params or params.get(eager_name(v.name)) or params.get(base_name(v.name), 0)
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
    previous_threads = set_cpu_threads(config.threads)
    machine_before = machine_info()
    names, notes = plan_variants(config)
    try:
        variants = _run_variants(config, names, notes, on_progress)
        if variants is None:
            return None
        overhead = _run_overhead(config, on_progress) if config.overhead else None
    finally:
        set_cpu_threads(previous_threads)
    order = list(VARIANTS)
    precisions = config.resolved_precisions()
    variants.sort(key=lambda v: (order.index(base_name(v.name)), precisions.index(v.precision), v.compiled))
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
        numerics={p: Numerics(p, channels_last=config.channels_last).record() for p in config.resolved_precisions()},
    )
