"""Memory per device for one training step: parameters, gradients, optimizer state (SGD
momentum), activations and peak, and the bytes exchanged between devices. Measured with
the CUDA allocator's statistics on GPUs; without CUDA, accounted per intended device from
the real tensors of a real step and labelled estimated (so --placement split --devices
cpu,cpu estimates what each of two GPUs would hold). Under torchrun with --placement ranks
each process reports its tower, on the CPU with its peak RSS (measured). --precision bf16 or
fp16 runs the forward under autocast: weights, gradients and momentum stay float32, the saved
activations are counted by dtype from the real saved tensors, and autocast's low-precision
copies of the weights are shown apart (weight casts)."""

from __future__ import annotations

import argparse

from ..errors import Alexnet2gpuError, ConfigError
from ..parallel.names import PRECISIONS
from .arguments import add_model_arguments, add_placement_arguments, model_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_placement_arguments(parser)
    parser.add_argument(
        "--batch-size", type=int, default=64, help="batch size (global under ranks) (default: %(default)s)"
    )
    parser.add_argument(
        "--source",
        choices=("auto", "measured", "estimated"),
        default="auto",
        help="measured (CUDA allocator), estimated (from tensors, any device), or auto: measured "
        "where every device is a GPU (default: %(default)s)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="arithmetic of the step: fp32 (the paper's), or autocast to bf16/fp16 with float32 weights "
        "(default: %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights and the batch (default: %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH ('-' for stdout)")
    parser.add_argument(
        "--snapshot",
        metavar="PATH",
        help="CUDA only: write a memory-history pickle of the step that pytorch.org/memory_viz opens",
    )
    parser.add_argument(
        "--check-estimate",
        action="store_true",
        help="CUDA only: compare the CPU estimate with the measured step, per device",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from ..measure.memory import check_estimator, run_memory
    from ..parallel import Numerics, TorchrunEnv, close_distributed, set_cpu_threads

    set_cpu_threads(args.threads)
    env = TorchrunEnv.from_environ()
    kwargs = model_kwargs(args)
    numerics = Numerics(args.precision)
    if args.check_estimate:
        if not torch.cuda.is_available():
            raise ConfigError("--check-estimate measures on CUDA and this machine has no CUDA device")
        check = check_estimator(
            args.model,
            args.placement,
            args.devices,
            batch_size=args.batch_size,
            seed=args.seed,
            numerics=numerics,
            **kwargs,
        )
        from ..report import console, write_json

        for row in check.devices:
            console().print(
                f"{row['device']} ({args.precision}): peak estimated "
                f"{row['estimated_peak_bytes'] / 2**20:,.1f} MiB, measured "
                f"{row['measured_peak_bytes'] / 2**20:,.1f} MiB ({100 * row['peak_rel_err']:+.1f} %); activations "
                f"estimated {row['estimated_activations_bytes'] / 2**20:,.1f}, measured "
                f"{row['measured_activations_bytes'] / 2**20:,.1f} MiB ({100 * row['activations_rel_err']:+.1f} %)"
            )
        if args.json:
            write_json(args.json, check.to_json())
        return 0
    try:
        report = run_memory(
            args.model,
            args.placement,
            args.devices,
            batch_size=args.batch_size,
            source=args.source,
            seed=args.seed,
            snapshot=args.snapshot,
            numerics=numerics,
            **kwargs,
        )
    finally:
        if env.launched:  # destroy_process_group on every exit path
            close_distributed()
    if not env.is_rank0:
        return 0
    from ..report import write_json
    from ..report.memory import render_memory

    if args.json != "-":
        render_memory(report)
    if args.json:
        try:
            write_json(args.json, report.to_json())
        except OSError as error:
            raise Alexnet2gpuError(f"could not write {args.json}: {error.strerror or error}") from None
    return 0
