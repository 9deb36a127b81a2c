"""Throughput in images/s, for a training step and for inference, over a sweep of batch
sizes: synthetic data made on the device, warm-up first, every device synchronised before
the clock is read, median and spread of the repeats. Under torchrun with --placement ranks
it measures that setup (one tower per process) and rank 0 reports."""

from __future__ import annotations

import argparse
import os

from ..errors import Alexnet2gpuError, ConfigError
from ..parallel.names import PROCESS_PLACEMENTS
from .arguments import (
    add_model_arguments,
    add_placement_arguments,
    add_precision_arguments,
    model_kwargs,
    numerics_from_args,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_placement_arguments(parser)
    add_precision_arguments(parser, channels_last=True, cudnn_benchmark=True)
    group = parser.add_argument_group("measuring")
    group.add_argument(
        "--batch-sizes",
        default="32,64,128",
        help="comma-separated batch sizes (global under ranks, replicas and hybrid) (default: %(default)s)",
    )
    group.add_argument(
        "--mode",
        choices=("train", "infer", "both"),
        default="both",
        help="a training step (forward, loss, backward, SGD step), inference, or both (default: %(default)s)",
    )
    group.add_argument(
        "--repeats", type=int, default=5, help="timed repeats; the median is reported (default: %(default)s)"
    )
    group.add_argument("--steps", type=int, default=1, help="steps per timed repeat (default: %(default)s)")
    group.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: %(default)s)")
    group.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: torch's choice)")
    group.add_argument(
        "--seed", type=int, default=0, help="seed for the weights and the synthetic batch (default: %(default)s)"
    )
    group.add_argument(
        "--against-plain-loop",
        action="store_true",
        help="also time a plain PyTorch loop (forward, loss, backward, SGD step) on the same "
        "model and the first batch size, and report the harness overhead",
    )
    group.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run the placed net under torch.compile; each mode and batch size compiles on its first call, "
        "which is timed and reported on its own (never inside images/s) (default: off)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-' for stdout)")


def _overhead(args: argparse.Namespace, placed, batch_size: int, kwargs: dict, show: bool):
    """The harness against a plain PyTorch loop on the same device and first batch size."""
    from ..measure.bench import measure_overhead
    from ..report.bench import progress_bar

    if args.precision != "fp32" or args.channels_last:
        raise ConfigError("--against-plain-loop times float32 contiguous steps: drop --precision and --channels-last")
    if placed.layout.towers_apart or placed.layout.distributed:
        raise ConfigError(
            "--against-plain-loop compares one device in one process: use --placement towers, grouped, single or auto"
        )
    with progress_bar(args.repeats, "harness against a plain loop", enabled=show) as bar:
        return measure_overhead(
            args.model,
            device=placed.layout.devices[0],
            batch_size=batch_size,
            warmup=args.warmup,
            repeats=args.repeats,
            steps=args.steps,
            seed=args.seed,
            on_repeat=bar.advance,
            **kwargs,
        )


def _write(path: str, results, overhead, machine: dict) -> None:
    import torch

    from ..report import write_json

    data = {"results": [r.to_json() for r in results], "torch": torch.__version__, "machine": machine}
    if overhead is not None:
        data["overhead"] = overhead.to_json()
    try:
        write_json(path, data)
    except OSError as error:
        raise Alexnet2gpuError(f"could not write {path}: {error.strerror or error}") from None


def check_launched(placement: str, command: str) -> None:
    """Refuses a torchrun placement outside torchrun, with the line that launches it."""
    if placement in PROCESS_PLACEMENTS and "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            f"placement '{placement}' runs one process per device: launch {command} with torchrun, e.g. "
            f"`torchrun --nproc-per-node 2 -m alexnet2gpu {command} --placement {placement} ...`"
        )


def run(args: argparse.Namespace) -> int:
    check_launched(args.placement, "bench")
    import torch

    from ..measure.bench import MODES, bench_placed
    from ..measure.timing import machine_info
    from ..measure.workload import compile_placed, parse_batch_sizes
    from ..models import build_model
    from ..parallel import TorchrunEnv, close_distributed, place, set_cpu_threads
    from ..report.bench import progress_bar, render_bench, render_overhead

    set_cpu_threads(args.threads)
    batch_sizes = parse_batch_sizes(args.batch_sizes)
    modes = list(MODES) if args.mode == "both" else [args.mode]
    kwargs = model_kwargs(args)
    env = TorchrunEnv.from_environ()
    show = env.is_rank0 and args.json != "-"
    try:
        torch.manual_seed(args.seed)
        placed = place(build_model(args.model, **kwargs), args.placement, args.devices)
        numerics = numerics_from_args(args, cuda=placed.layout.device.type == "cuda")
        if args.compile:
            compile_placed(placed)
        total = len(batch_sizes) * len(modes) * args.repeats
        with progress_bar(total, f"{args.model}/{placed.layout.placement}", enabled=show) as bar:
            results = bench_placed(
                placed,
                args.model,
                batch_sizes,
                modes,
                warmup=args.warmup,
                repeats=args.repeats,
                steps=args.steps,
                seed=args.seed,
                width=args.width,
                model_kwargs=kwargs,
                on_repeat=bar.advance,
                compiled=args.compile,
                numerics=numerics,
            )
        overhead = _overhead(args, placed, batch_sizes[0], kwargs, show) if args.against_plain_loop else None
    finally:
        if env.launched:  # destroy_process_group on every exit path
            close_distributed()
    if not env.is_rank0:
        return 0
    machine = machine_info()
    if show:
        render_bench(results, machine)
        if overhead is not None:
            render_overhead(overhead)
    if args.json:
        _write(args.json, results, overhead, machine)
    return 0
