"""The clock: every device synchronised around each timing, warm-up excluded, the median
and spread of the repeats, and what the figures were measured on.

* ``warmup`` calls run first and are not timed (allocator, cuDNN algorithm choice, and
  under ``--compile`` the compilation itself);
* before the clock is read, *every* CUDA device in use is synchronised
  (``torch.cuda.synchronize()`` alone waits only for the current one), and under
  torch.distributed all processes meet at a barrier, so a time covers the slowest one;
* each of ``repeats`` timings covers ``steps`` calls; the figure is the median of the
  repeats and the spread is half their range, (max - min) / 2.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable

import torch

from ..errors import ConfigError

__all__ = ["busiest_cpu_seconds", "machine_info", "rates_summary", "synchronize", "time_once", "time_repeats"]


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


def time_once(call: Callable[[], None], devices) -> float:
    """Wall seconds of one call, every device synchronised before and after (e.g. the
    first call of a compiled step, which compiles it)."""
    devices = list(devices)
    synchronize(devices)
    start = time.perf_counter()
    call()
    synchronize(devices)
    return time.perf_counter() - start


def rates_summary(batch_size: int, seconds: list[float]) -> tuple[float, float, list[float]]:
    """(median, half the range, every rate) in images/s from seconds per step."""
    rates = [batch_size / s for s in seconds]
    return statistics.median(rates), (max(rates) - min(rates)) / 2, rates


def busiest_cpu_seconds(cpu_seconds: list[float]) -> list[float]:
    """Per repeat, the largest CPU time of any process of a torch.distributed job (this
    process's own outside one)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return cpu_seconds
    every: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, cpu_seconds)
    return [max(values) for values in zip(*every)]


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
