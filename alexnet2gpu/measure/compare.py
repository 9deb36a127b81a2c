"""The main job: every net and placement this machine can run, side by side, for
parameters, memory per device, throughput over batch sizes and bytes exchanged.
Returns one plain :class:`CompareReport`; :mod:`alexnet2gpu.report.compare` renders it.

The matrix (issue 4): ``simplified``, ``dual/towers``, ``dual/grouped``, ``dual/split``
(two GPUs; without them only its memory, estimated on ``cpu,cpu``), ``dual/ranks`` (a
2-process torchrun job, launched here when this process is not one, with its JSON read
back), and the peers ``half`` and ``torchvision``. Every figure carries its source
(measured or estimated) and device.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ..errors import Alexnet2gpuError, ConfigError
from ..parallel import TorchrunEnv
from .bench import BenchResult, OverheadResult, machine_info, measure_overhead, run_bench
from .memory import DeviceMemory, MemoryReport, run_memory

__all__ = ["CompareConfig", "CompareReport", "Variant", "VARIANTS", "plan_variants", "run_compare", "speedups"]

# name -> (model, placement); the order of the tables
VARIANTS = {
    "simplified": ("simplified", "single"),
    "dual/towers": ("dual", "towers"),
    "dual/grouped": ("dual", "grouped"),
    "dual/split": ("dual", "split"),
    "dual/ranks": ("dual", "ranks"),
    "half": ("half", "single"),
    "torchvision": ("torchvision", "single"),
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

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)


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
        if name == "dual/ranks":
            if gpus == 1:
                notes[name] = "skipped: ranks puts one tower per GPU and this machine has 1 GPU"
                continue
        if name == "dual/split" and gpus < 2:
            notes[name] = (
                f"throughput not measured: split needs two GPUs and this machine has {gpus}; "
                "memory estimated for two devices (run on cpu,cpu)"
            )
        run.append(name)
    return run, notes


def _devices_for(name: str) -> list[str] | None:
    gpus = torch.cuda.device_count()
    if name == "dual/split":
        return ["cuda:0", "cuda:1"] if gpus >= 2 else ["cpu", "cpu"]
    if name == "dual/ranks":
        return None  # cuda:LOCAL_RANK, else the CPU
    return ["cuda:0"] if gpus else ["cpu"]


def _param_count(report: MemoryReport | None) -> int:
    return sum(d.params for d in report.devices) if report else 0


def _ranks_job(config: CompareConfig, command: list[str], out: str, notes: list[str]) -> dict:
    """Runs ``alexnet2gpu COMMAND ...`` as a 2-process torchrun job and returns its JSON.

    Rank 0 writes the JSON atomically once its measurement is complete, so a JSON that
    exists is whole even if a worker then fails on its way out (as gloo's threads once made
    it do at interpreter exit: "terminate called without an active exception"); that is
    said in ``notes``. A job that wrote nothing is tried once more, then reported as one
    error."""
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "alexnet2gpu",
        *command,
        "--json",
        out,
    ]
    env = dict(os.environ)
    if config.threads is not None:
        env["OMP_NUM_THREADS"] = str(config.threads)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    failures = []
    for _attempt in range(2):
        returncode, stderr = _launch(argv, env, config.ranks_timeout_s)
        if os.path.exists(out):
            if returncode != 0:
                notes.append(
                    f"`{command[0]}`: a worker exited abnormally ({_why(returncode, stderr)}) after "
                    "rank 0 had written its complete results"
                )
            with open(out) as f:
                return json.load(f)
        failures.append(_why(returncode, stderr))
        if returncode == 0 or "error:" in stderr and "alexnet2gpu" in stderr:
            break  # a usage error or a clean exit without results: trying again cannot help
    raise Alexnet2gpuError(
        f"the dual/ranks torchrun job failed: {'; then: '.join(failures)}; command: {shlex.join(argv)}"
    )


def _launch(argv: list[str], env: dict, timeout_s: float) -> tuple[int | None, str]:
    """(exit code or None on timeout, stderr). A session of its own, so that a timeout or
    Ctrl-C ends torchrun *and* its workers."""
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return None, f"did not finish in {timeout_s:.0f} s"
    except BaseException:
        _kill_group(proc)
        raise
    return proc.returncode, stderr or ""


def _why(returncode: int | None, stderr: str) -> str:
    """The most telling line of a failed torchrun job: our own error line, else an
    exception, else the signal that ended a worker."""
    if returncode is None:
        return stderr
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for pick in (
        lambda s: s.startswith("alexnet2gpu ") and ": error:" in s,
        lambda s: "Error:" in s and "ChildFailedError" not in s,
        lambda s: s.startswith("traceback : Signal") or s.startswith("terminate called"),
    ):
        found = [line for line in lines if pick(line)]
        if found:
            return f"exit {returncode}: {found[-1]}"
    return f"exit {returncode}: {lines[-1] if lines else 'no output'}"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def _memory_from_json(data: dict) -> MemoryReport:
    devices = [DeviceMemory(**d) for d in data["devices"]]
    keys = ("model", "placement", "batch_size", "comm_bytes_per_step", "image_size", "width", "torch", "note")
    return MemoryReport(devices=devices, **{k: data[k] for k in keys if k in data})


def _size_flags(config: CompareConfig) -> list[str]:
    flags = ["--width", repr(config.width)]
    if config.image_size is not None:
        flags += ["--image-size", str(config.image_size)]
    return flags


def _run_ranks(config: CompareConfig) -> Variant:
    """dual/ranks: this process when it is a torchrun worker, else a 2-process torchrun job."""
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="alexnet2gpu-ranks-") as tmp:
        threads = ["--threads", str(config.threads)] if config.threads else []
        bench = _ranks_job(
            config,
            [
                "bench",
                "--model",
                "dual",
                "--placement",
                "ranks",
                *_size_flags(config),
                "--batch-sizes",
                ",".join(map(str, config.batch_sizes)),
                "--mode",
                "both",
                "--repeats",
                str(config.repeats),
                "--warmup",
                str(config.warmup),
                "--steps",
                str(config.steps),
                "--seed",
                str(config.seed),
                *threads,
            ],
            os.path.join(tmp, "bench.json"),
            notes,
        )
        memory = _ranks_job(
            config,
            [
                "memory",
                "--model",
                "dual",
                "--placement",
                "ranks",
                *_size_flags(config),
                "--batch-size",
                str(config.memory_batch_size),
                "--seed",
                str(config.seed),
                *threads,
            ],
            os.path.join(tmp, "memory.json"),
            notes,
        )
    results = [BenchResult(**r) for r in bench["results"]]
    report = _memory_from_json(memory)
    return Variant(
        name="dual/ranks",
        model="dual",
        placement="ranks",
        devices=results[0].device if results else "",
        params=_param_count(report),
        memory=report,
        results=results,
        comm_bytes_per_step=report.comm_bytes_per_step,
        note="; ".join(["2 processes launched with torch.distributed.run (gloo on the CPU), one tower each", *notes]),
    )


def _run_ranks_here(config: CompareConfig, on_repeat: Callable[[], None] | None) -> Variant:
    """dual/ranks in this torchrun job (every rank calls it): bench and memory collectively."""
    kwargs = config.model_kwargs()
    results = run_bench(
        "dual",
        "ranks",
        None,
        batch_sizes=config.batch_sizes,
        warmup=config.warmup,
        repeats=config.repeats,
        steps=config.steps,
        seed=config.seed,
        on_repeat=on_repeat,
        **kwargs,
    )
    report = run_memory("dual", "ranks", None, batch_size=config.memory_batch_size, seed=config.seed, **kwargs)
    if on_repeat is not None:
        on_repeat()
    world = results[0].processes if results else 2
    return Variant(
        name="dual/ranks",
        model="dual",
        placement="ranks",
        devices=results[0].device if results else "",
        params=_param_count(report),
        memory=report,
        results=results,
        comm_bytes_per_step=report.comm_bytes_per_step,
        note=f"this torchrun job's {world} processes, one tower each",
    )


def _run_single(
    name: str, config: CompareConfig, measure_throughput: bool, on_repeat: Callable[[], None] | None
) -> Variant:
    model, placement = VARIANTS[name]
    devices = _devices_for(name)
    kwargs = config.model_kwargs()
    report = run_memory(model, placement, devices, batch_size=config.memory_batch_size, seed=config.seed, **kwargs)
    if on_repeat is not None:
        on_repeat()
    results = []
    if measure_throughput:
        results = run_bench(
            model,
            placement,
            devices,
            batch_sizes=config.batch_sizes,
            warmup=config.warmup,
            repeats=config.repeats,
            steps=config.steps,
            seed=config.seed,
            on_repeat=on_repeat,
            **kwargs,
        )
    label = results[0].device if results else ",".join(devices)
    return Variant(
        name=name,
        model=model,
        placement=placement,
        devices=label,
        params=_param_count(report),
        memory=report,
        results=results,
        comm_bytes_per_step=report.comm_bytes_per_step,
    )


def units_of_work(config: CompareConfig, names: list[str]) -> dict[str, int]:
    """Progress units per variant: one for the memory step, one per timed repeat."""
    per_variant = 1 + len(config.batch_sizes) * 2 * config.repeats
    return {name: per_variant for name in names}


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
    skipped = {n: why for n, why in notes.items() if n not in names}
    gpus = torch.cuda.device_count()
    units = units_of_work(config, names)

    def tick(description: str) -> Callable[[], None]:
        return lambda: on_progress(1, description) if on_progress else None

    variants = []
    env = TorchrunEnv.from_environ()
    try:
        if env.launched and "dual/ranks" in names:
            # Started under torchrun: every rank measures dual/ranks here, then the group is
            # closed and rank 0 alone goes on with the single-process variants.
            from ..parallel import close_distributed

            try:
                variants.append(_run_ranks_here(config, tick("dual/ranks")))
            finally:
                close_distributed()
            names.remove("dual/ranks")
            if not env.is_rank0:
                return None
        elif env.launched and not env.is_rank0:
            return None
        for name in names:
            if on_progress:
                on_progress(0, name)
            if name == "dual/ranks":
                variant = _run_ranks(config)
                if on_progress:
                    on_progress(units[name], name)
            else:
                measure = not (name == "dual/split" and gpus < 2)
                variant = _run_single(name, config, measure, tick(name))
                if not measure and on_progress:
                    on_progress(units[name] - 1, name)
            variant.note = "; ".join(filter(None, [variant.note, notes.get(name, "")]))
            variants.append(variant)
        overhead = None
        if config.overhead:
            if on_progress:
                on_progress(0, "harness against a plain loop")
            overhead = measure_overhead(
                "simplified",
                device=_devices_for("simplified")[0],
                batch_size=max(config.batch_sizes),
                warmup=config.warmup,
                repeats=config.repeats,
                steps=config.steps,
                seed=config.seed,
                on_repeat=tick("harness against a plain loop"),
                **config.model_kwargs(),
            )
    finally:
        torch.set_num_threads(previous_threads)
    order = list(VARIANTS)
    variants.sort(key=lambda v: order.index(v.name))
    machine = machine_info()
    machine["load_average_before"] = machine_before["load_average"]
    return CompareReport(
        variants=variants,
        skipped=skipped,
        config=asdict(config),
        machine=machine,
        overhead=overhead,
        wall_s=time.perf_counter() - started,
        command=command,
    )
