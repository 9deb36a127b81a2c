"""Throughput of a placed net in images/s, for a training step and for inference, over a
sweep of batch sizes. Returns plain records; :mod:`alexnet2gpu.report.bench` renders them.

How it measures (DESIGN.md section 4; the clock is :mod:`.timing`, the step
:mod:`.workload`): synthetic batches made once on the device that takes the input, warm-up
steps first and untimed, every device synchronised before the clock is read, the median and
half the range of the repeats.

A training step is ``forward_loss(placed, x, y).backward()`` and an SGD step (momentum
0.9) for every placement, with ``zero_grad(set_to_none=True)`` first; inference is
``placed(x)`` under ``torch.inference_mode()``, the network in eval mode. Both run under
the step's :class:`~alexnet2gpu.parallel.Numerics` (autocast to bf16/fp16, channels-last),
whose settings every record carries.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import build_model, is_two_tower
from ..parallel import FP32, Numerics, devices_of, own_forward_placement, place
from .oom import out_of_memory_error
from .timing import busiest_cpu_seconds, rates_summary, time_once, time_repeats
from .workload import (
    LR,
    MOMENTUM,
    check_batch_sizes,
    compile_placed,
    device_label,
    make_batch,
    make_optimizer,
    train_step,
)

__all__ = ["MODES", "BenchResult", "OverheadResult", "bench_placed", "measure_overhead", "run_bench"]

MODES = ("train", "infer")


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
    compiled: bool = False  # the net ran under torch.compile
    # seconds of the first, compiling call (compilation plus one step) for this mode and
    # batch; never inside images/s, which the timed repeats after the warm-up give
    compile_s: float | None = None
    # the step's arithmetic: precision, memory format, cudnn.benchmark, TF32 (Numerics.record)
    numerics: dict = field(default_factory=dict)

    @property
    def precision(self) -> str:
        return self.numerics.get("precision", "fp32")

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


def _threads() -> int:
    return torch.get_num_threads()


def _mode_step(
    placed: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor, numerics: Numerics = FP32
) -> Callable[[], None]:
    """The call that ``mode`` times: a training step (the net in train mode, a fresh SGD
    optimizer, float16's GradScaler) or inference (eval mode, ``torch.inference_mode``),
    both under the precision's autocast."""
    devices = devices_of(placed)
    if mode == "train":
        placed.train()
        optimizer = make_optimizer(placed)
        scaler = numerics.grad_scaler(devices[0].type) if numerics.scaled else None
        return lambda: train_step(placed, optimizer, x, y, numerics, scaler)
    placed.eval()

    def infer() -> None:
        with torch.inference_mode(), numerics.autocast(devices):
            placed(x)

    return infer


def _measure(
    placed: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor, compiled: bool, timing: dict, numerics: Numerics
) -> tuple[list[float], list[float], float | None]:
    """(seconds per step, CPU seconds per step, compile seconds or None) for one mode and
    batch. A compiled step is compiled afresh by its first call, timed on its own and kept
    out of the repeats; the ``warmup`` calls follow it."""
    step = _mode_step(placed, mode, x, y, numerics)
    devices = devices_of(placed)
    compile_s = None
    if compiled:
        torch._dynamo.reset()  # each (mode, batch) pays its own compilation, reported as such
        compile_s = time_once(step, devices)
    cpu: list[float] = []
    seconds = time_repeats(step, devices, cpu_seconds=cpu, **timing)
    placed.zero_grad(set_to_none=True)
    return seconds, cpu, compile_s


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
    compiled: bool = False,
    numerics: Numerics = FP32,
) -> list[BenchResult]:
    """Measures ``placed`` for every (mode, batch size); one record each. ``compiled``:
    ``placed`` was prepared by :func:`~.workload.compile_placed`; its compile time is
    measured apart. ``numerics``: the step's precision and memory format (``placed`` is
    put in its memory format here, and so is each batch; cudnn.benchmark is set). A CUDA
    out-of-memory error becomes an :class:`Alexnet2gpuError` that names the device, the
    batch and the largest batch the memory estimate says would fit."""
    modes = list(modes)
    for mode in modes:
        if mode not in MODES:
            raise ConfigError(f"unknown mode '{mode}': choose train, infer or both")
    check_batch_sizes(placed, batch_sizes)
    layout = placed.layout
    timing = {"warmup": warmup, "repeats": repeats, "steps": steps, "on_repeat": on_repeat}
    numerics.apply()
    numerics.format_model(placed)
    results = []
    for batch_size in batch_sizes:
        x, y = make_batch(placed, batch_size, seed=seed)
        x = numerics.format_input(x)
        for mode in modes:
            try:
                seconds, cpu, compile_s = _measure(placed, mode, x, y, compiled, timing, numerics)
            except torch.OutOfMemoryError as error:
                placed.zero_grad(set_to_none=True)
                raise out_of_memory_error(
                    error, model_name, placed, batch_size, mode, model_kwargs=model_kwargs
                ) from None
            median, spread, rates = rates_summary(batch_size, seconds)
            results.append(
                BenchResult(
                    model=model_name,
                    placement=layout.placement,
                    mode=mode,
                    batch_size=batch_size,
                    images_per_s=median,
                    spread=spread,
                    device=device_label(placed),
                    repeats_images_per_s=rates,
                    steps_per_repeat=steps,
                    image_size=placed.image_size,
                    width=width,
                    threads=_threads(),
                    processes=layout.world_size,
                    cpu_s_per_step=statistics.median(busiest_cpu_seconds(cpu)),
                    compiled=compiled,
                    compile_s=compile_s,
                    numerics=numerics.record(),
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
    compiled: bool = False,
    numerics: Numerics = FP32,
    **model_kwargs,
) -> list[BenchResult]:
    """Builds and places ``model_name`` (``compiled``: then compiles it with
    :func:`~.workload.compile_placed`) and measures it (see :func:`bench_placed`)."""
    torch.manual_seed(seed)
    model = build_model(model_name, **model_kwargs)
    placed = place(model, placement, devices)
    if compiled:
        compile_placed(placed)
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
        compiled=compiled,
        numerics=numerics,
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
