"""Throughput of a placed net in images/s, for a training step and for inference, over a
sweep of batch sizes. Returns plain records; :mod:`alexnet2gpu.report.bench` renders them.

How it measures (DESIGN.md section 4):

* synthetic batches are made once, on the device that takes the input: no loader, no
  host-to-device copy in the timed loop;
* ``warmup`` steps run first and are not timed (allocator, cuDNN algorithm choice);
* before the clock is read, *every* CUDA device in use is synchronised
  (``torch.cuda.synchronize()`` alone waits only for the current one), and under
  ``ranks`` all processes meet at a barrier, so the time covers the slowest tower;
* each of ``repeats`` timings covers ``steps`` steps; the figure is the median of the
  repeats and the spread is half their range (max - min) / 2, both in images/s.

A training step is ``forward_loss(placed, x, y).backward()`` and an SGD step (momentum
0.9) for every placement, with ``zero_grad(set_to_none=True)`` first; inference is
``placed(x)`` under ``torch.inference_mode()``, the network in eval mode.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import build_model, is_two_tower
from ..parallel import devices_of, forward_loss, own_forward_placement, place

__all__ = [
    "MODES",
    "BenchResult",
    "OverheadResult",
    "bench_placed",
    "check_batch_sizes",
    "device_label",
    "machine_info",
    "make_batch",
    "make_optimizer",
    "measure_overhead",
    "parse_batch_sizes",
    "run_bench",
    "synchronize",
    "time_repeats",
    "train_step",
]

MODES = ("train", "infer")
LR, MOMENTUM = 0.01, 0.9  # [paper] section 5: SGD, momentum 0.9 (lr does not change the timing)


@dataclass
class BenchResult:
    """One (model, placement, mode, batch size) measurement. ``images_per_s`` is the median
    over the repeats, ``spread`` half their range, both in images/s (global batch under
    ``ranks``). ``source`` is always ``measured``: nothing here is estimated."""

    model: str
    placement: str
    mode: str  # "train" or "infer"
    batch_size: int
    images_per_s: float
    spread: float
    device: str  # e.g. "cpu", "cuda:0,cuda:1", "cpu x2 processes"
    repeats_images_per_s: list[float] = field(default_factory=list)
    steps_per_repeat: int = 1
    image_size: int = 0
    width: float = 1.0
    threads: int = 0  # CPU threads per process
    processes: int = 1
    # CPU seconds per step of the busiest process (median over the repeats): on a machine
    # shared with other jobs it stays put while the wall-clock figures drop
    cpu_s_per_step: float = 0.0
    source: str = "measured"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class OverheadResult:
    """``bench``'s training-step figure against a plain PyTorch loop (forward, loss,
    backward, SGD step) on the same model and batch, timed alternately so that a change
    in machine load hits both. ``overhead`` = plain / harness - 1 (0.03 = 3 % slower),
    from the medians; ``overhead_best`` from each side's fastest repeat; ``overhead_cpu``
    from the CPU seconds per step (harness / plain - 1)."""

    model: str
    batch_size: int
    device: str
    harness_images_per_s: float
    plain_images_per_s: float
    overhead: float
    repeats: int
    steps_per_repeat: int
    image_size: int
    threads: int
    # the same from each side's fastest repeat: less sensitive to other load on the machine
    harness_best_images_per_s: float = 0.0
    plain_best_images_per_s: float = 0.0
    overhead_best: float = 0.0
    # from process CPU seconds per step (medians): what the harness adds in work, which
    # other jobs' load on a shared machine does not inflate as it does wall time
    harness_cpu_s_per_step: float = 0.0
    plain_cpu_s_per_step: float = 0.0
    overhead_cpu: float = 0.0
    source: str = "measured"

    def to_json(self) -> dict:
        return asdict(self)


def machine_info() -> dict:
    """What the figures were measured on: CPU model and cores, GPUs, load, torch."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        if match:
            cpu = match.group(1).strip()
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "gpus": gpus,
        "load_average": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def parse_batch_sizes(spec: str | Iterable[int]) -> list[int]:
    """``"32,64,128"`` (or a list) to ``[32, 64, 128]``; refuses anything below 1."""
    if isinstance(spec, str):
        try:
            sizes = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"batch sizes '{spec}' are not whole numbers: use e.g. 32,64,128") from None
    else:
        sizes = [int(s) for s in spec]
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"batch sizes must be whole numbers >= 1, e.g. 32,64,128; got '{spec}'")
    return sizes


def check_batch_sizes(placed: nn.Module, sizes: list[int]) -> None:
    """Under ``ranks`` with k data-parallel replicas the batch is global: k must divide it."""
    dp = placed.layout.dp_size if hasattr(placed, "layout") else 1
    bad = [b for b in sizes if b % dp]
    if bad:
        raise ConfigError(
            f"batch size {bad[0]} does not divide among {dp} data-parallel replicas: use a multiple of {dp}"
        )


def device_label(placed: nn.Module) -> str:
    """Where a placed net runs, in words: ``cpu``, ``cuda:0,cuda:1``, ``cpu x2 processes``."""
    layout = getattr(placed, "layout", None)
    devices = devices_of(placed)
    if layout is not None and layout.placement == "ranks":
        return f"{devices[0].type} x{layout.world_size} processes"
    return ",".join(str(d) for d in devices)


def _input_device(placed: nn.Module) -> torch.device:
    return devices_of(placed)[0]


def _local_batch(placed: nn.Module, batch_size: int) -> int:
    layout = getattr(placed, "layout", None)
    if layout is not None and layout.placement == "ranks":
        return batch_size // layout.dp_size
    return batch_size


def make_batch(placed: nn.Module, batch_size: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic batch (this process's share of it under ``ranks``) made on the device
    that takes the input, from a seeded generator so every process draws the same images."""
    device = _input_device(placed)
    n = _local_batch(placed, batch_size)
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, placed.in_channels, placed.image_size, placed.image_size, device=device, generator=generator)
    y = torch.randint(0, placed.num_classes, (n,), device=device, generator=generator)
    return x, y


def make_optimizer(placed: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 over this process's parameters ([paper] section 5)."""
    return torch.optim.SGD(placed.parameters(), lr=LR, momentum=MOMENTUM)


def train_step(placed: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One training step, the same call for every placement."""
    optimizer.zero_grad(set_to_none=True)
    forward_loss(placed, x, y).backward()
    optimizer.step()


def synchronize(devices: Iterable[torch.device]) -> None:
    """Waits for every CUDA device in ``devices`` (each one: ``torch.cuda.synchronize()``
    alone waits only for the current device); the CPU needs nothing. Under torch.distributed
    all processes then meet at a barrier."""
    for device in dict.fromkeys(torch.device(d) for d in devices):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def time_repeats(
    step: Callable[[], None],
    devices,
    *,
    warmup: int,
    repeats: int,
    steps: int,
    on_repeat: Callable[[], None] | None = None,
    cpu_seconds: list[float] | None = None,
) -> list[float]:
    """Seconds per step for each of ``repeats`` timings of ``steps`` calls of ``step``,
    after ``warmup`` untimed calls, with every device synchronised around each timing.
    ``cpu_seconds``, if given, receives this process's CPU time per step for each repeat."""
    if repeats < 1 or steps < 1 or warmup < 0:
        raise ConfigError(f"need repeats >= 1, steps >= 1, warmup >= 0; got {repeats}, {steps}, {warmup}")
    devices = list(devices)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        synchronize(devices)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step()
        synchronize(devices)
        times.append((time.perf_counter() - start) / steps)
        if cpu_seconds is not None:
            cpu_seconds.append((time.process_time() - cpu_start) / steps)
        if on_repeat is not None:
            on_repeat()
    return times


def _summarise(batch_size: int, seconds: list[float]) -> tuple[float, float, list[float]]:
    rates = [batch_size / s for s in seconds]
    return statistics.median(rates), (max(rates) - min(rates)) / 2, rates


def _busiest(cpu_seconds: list[float]) -> list[float]:
    """Per repeat, the largest CPU time of any process of a torch.distributed job."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return cpu_seconds
    every: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, cpu_seconds)
    return [max(values) for values in zip(*every)]


def _threads() -> int:
    return torch.get_num_threads()


def bench_placed(
    placed: nn.Module,
    model_name: str,
    batch_sizes: list[int],
    modes: Iterable[str] = MODES,
    *,
    warmup: int = 1,
    repeats: int = 3,
    steps: int = 1,
    seed: int = 0,
    width: float = 1.0,
    model_kwargs: dict | None = None,
    on_repeat: Callable[[], None] | None = None,
) -> list[BenchResult]:
    """Measures ``placed`` for every (mode, batch size); one record each. A CUDA
    out-of-memory error becomes an :class:`Alexnet2gpuError` that names the device, the
    batch and the largest batch the memory estimate says would fit."""
    modes = list(modes)
    for mode in modes:
        if mode not in MODES:
            raise ConfigError(f"unknown mode '{mode}': choose train, infer or both")
    check_batch_sizes(placed, batch_sizes)
    devices = devices_of(placed)
    layout = placed.layout
    label = device_label(placed)
    results = []
    for batch_size in batch_sizes:
        x, y = make_batch(placed, batch_size, seed=seed)
        for mode in modes:
            cpu: list[float] = []
            try:
                if mode == "train":
                    placed.train()
                    optimizer = make_optimizer(placed)
                    seconds = time_repeats(
                        lambda: train_step(placed, optimizer, x, y),  # noqa: B023 (called before the loop moves on)
                        devices,
                        warmup=warmup,
                        repeats=repeats,
                        steps=steps,
                        on_repeat=on_repeat,
                        cpu_seconds=cpu,
                    )
                    del optimizer
                    placed.zero_grad(set_to_none=True)
                else:
                    placed.eval()

                    def infer() -> None:
                        with torch.inference_mode():
                            placed(x)  # noqa: B023 (called before the loop moves on)

                    seconds = time_repeats(
                        infer,
                        devices,
                        warmup=warmup,
                        repeats=repeats,
                        steps=steps,
                        on_repeat=on_repeat,
                        cpu_seconds=cpu,
                    )
            except torch.OutOfMemoryError as error:
                placed.zero_grad(set_to_none=True)
                from .memory import out_of_memory_error

                raise out_of_memory_error(
                    error, model_name, placed, batch_size, mode, model_kwargs=model_kwargs
                ) from None
            median, spread, rates = _summarise(batch_size, seconds)
            cpu = _busiest(cpu)
            results.append(
                BenchResult(
                    model=model_name,
                    placement=layout.placement,
                    mode=mode,
                    batch_size=batch_size,
                    images_per_s=median,
                    spread=spread,
                    device=label,
                    repeats_images_per_s=rates,
                    steps_per_repeat=steps,
                    image_size=placed.image_size,
                    width=width,
                    threads=_threads(),
                    processes=layout.world_size,
                    cpu_s_per_step=statistics.median(cpu),
                )
            )
    placed.train()
    return results


def run_bench(
    model_name: str,
    placement: str,
    devices=None,
    *,
    batch_sizes: list[int],
    modes: Iterable[str] = MODES,
    warmup: int = 1,
    repeats: int = 3,
    steps: int = 1,
    seed: int = 0,
    on_repeat: Callable[[], None] | None = None,
    **model_kwargs,
) -> list[BenchResult]:
    """Builds and places ``model_name`` and measures it (see :func:`bench_placed`)."""
    torch.manual_seed(seed)
    model = build_model(model_name, **model_kwargs)
    placed = place(model, placement, devices)
    return bench_placed(
        placed,
        model_name,
        batch_sizes,
        modes,
        warmup=warmup,
        repeats=repeats,
        steps=steps,
        seed=seed,
        width=model_kwargs.get("width", 1.0),
        model_kwargs=model_kwargs,
        on_repeat=on_repeat,
    )


def measure_overhead(
    model_name: str = "simplified",
    *,
    device="cpu",
    batch_size: int = 64,
    warmup: int = 1,
    repeats: int = 5,
    steps: int = 1,
    seed: int = 0,
    on_repeat: Callable[[], None] | None = None,
    **model_kwargs,
) -> OverheadResult:
    """``bench``'s training step against the plainest PyTorch loop on the same model,
    optimizer settings and batch. Repeats alternate between the two (harness, plain,
    harness, ...) so that other load on the machine falls on both alike."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = build_model(model_name, **model_kwargs)
    placed = place(model, own_forward_placement(is_two_tower(model)), [device])
    x, y = make_batch(placed, batch_size, seed=seed)
    harness_opt = make_optimizer(placed)

    # The plain loop, written as a user would, with nothing from this package in it.
    plain = build_model(model_name, **model_kwargs).to(device)
    plain.load_state_dict(model.state_dict())
    plain.train()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=LR, momentum=MOMENTUM)

    def plain_step() -> None:
        plain_opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(plain(x), y)
        loss.backward()
        plain_opt.step()

    def harness_step() -> None:
        train_step(placed, harness_opt, x, y)

    placed.train()
    harness, plain_times, harness_cpu, plain_cpu = [], [], [], []
    for _ in range(warmup):
        harness_step()
        plain_step()
    for _ in range(repeats):
        harness += time_repeats(harness_step, [device], warmup=0, repeats=1, steps=steps, cpu_seconds=harness_cpu)
        plain_times += time_repeats(plain_step, [device], warmup=0, repeats=1, steps=steps, cpu_seconds=plain_cpu)
        if on_repeat is not None:
            on_repeat()
    harness_rate = batch_size / statistics.median(harness)
    plain_rate = batch_size / statistics.median(plain_times)
    harness_best, plain_best = batch_size / min(harness), batch_size / min(plain_times)
    return OverheadResult(
        model=model_name,
        batch_size=batch_size,
        device=str(device),
        harness_images_per_s=harness_rate,
        plain_images_per_s=plain_rate,
        overhead=plain_rate / harness_rate - 1.0,
        repeats=repeats,
        steps_per_repeat=steps,
        image_size=placed.image_size,
        threads=_threads(),
        harness_best_images_per_s=harness_best,
        plain_best_images_per_s=plain_best,
        overhead_best=plain_best / harness_best - 1.0,
        harness_cpu_s_per_step=statistics.median(harness_cpu),
        plain_cpu_s_per_step=statistics.median(plain_cpu),
        overhead_cpu=statistics.median(harness_cpu) / statistics.median(plain_cpu) - 1.0,
    )
