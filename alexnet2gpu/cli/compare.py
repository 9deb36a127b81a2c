"""The main job: the simplified net, the two-tower net in every placement this machine can
run (towers, grouped; split on two GPUs; ranks in 2 processes it launches itself), and the
peers half and torchvision, side by side: parameters and memory per device, training and
inference images/s over batch sizes, bytes exchanged per step and speed-ups. Writes
DIR/compare.json, DIR/compare.md and PNG plots, atomically: an interrupted run leaves the
previous report as it was. Defaults fit 10 minutes on a 2-core CPU; --quick fits 2 and
writes to compare-out/quick. --precision fp32,bf16 adds every row again under bf16
autocast (VARIANT+bf16; the default where CUDA runs the steps) with its gain over fp32."""

from __future__ import annotations

import argparse
import shlex
import sys

from ..errors import Alexnet2gpuError
from .arguments import check_output_dir, precision_list

FULL_OUT, QUICK_OUT = "compare-out", "compare-out/quick"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help=f"folder for compare.json, compare.md and the plots (default: {FULL_OUT}; with --quick {QUICK_OUT}, "
        "so that a quick run never replaces the full report)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller batches (8,16; memory at 16) and 2 repeats: under 2 minutes on a 2-core CPU",
    )
    parser.add_argument(
        "--variants",
        default=None,
        help="comma-separated subset, e.g. simplified,dual/towers (default: all: "
        "simplified, dual/towers, dual/grouped, dual/split, dual/ranks, half, torchvision)",
    )
    parser.add_argument("--batch-sizes", default=None, help="throughput sweep (default: 16,32,64; --quick 8,16)")
    parser.add_argument(
        "--memory-batch-size", type=int, default=None, help="batch of the memory step (default: 64; --quick 16)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (default: 3; --quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed repeat (default: 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per process, also for each of the 2 ranks processes; 0 for torch's "
        "choice (default: %(default)s, so ranks' 2 processes x 1 thread meet towers' 1 x 1)",
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="input side for every net (default: each net's own)"
    )
    parser.add_argument("--width", type=float, default=None, help="width multiplier for every net (default: 1)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also measure every variant under torch.compile (rows named VARIANT+compile), with the compiled "
        "gain and the compile time reported apart (default: off)",
    )
    parser.add_argument(
        "--precision",
        type=precision_list,
        default=None,
        metavar="LIST",
        help="comma-separated precisions of the rows, from fp32, bf16, fp16; rows beyond fp32 run under "
        "torch.autocast and are named VARIANT+bf16 (default: fp32,bf16 where CUDA runs the steps, fp32 on the CPU)",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="every net and batch in channels-last memory format (default: off)",
    )
    _add_workers_arguments(parser)
    parser.add_argument(
        "--overhead",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time bench against a plain PyTorch loop on the simplified net (default: on)",
    )


def _add_workers_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("two workers (the 2012 towers, data parallel, the 2014 hybrid)")
    group.add_argument(
        "--workers",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also launch 2 processes and compare one device, the towers (dual), data parallel and the hybrid: "
        "memory per process, bytes sent per step counted beside the closed form, images/s; writes "
        "two-workers.json/.md and two-workers-bytes.png (default: off; at batch 128 on a 2-core CPU about "
        "5 minutes per round)",
    )
    group.add_argument(
        "--workers-models",
        default="dual,torchvision,simplified",
        help="nets of the two-workers section (default: %(default)s)",
    )
    group.add_argument(
        "--workers-batch-size", type=int, default=None, help="its global batch (default: 128; --quick 16)"
    )
    group.add_argument(
        "--workers-repeats", type=int, default=1, help="its interleaved timed rounds (default: %(default)s)"
    )


def config_from_args(args: argparse.Namespace):
    from ..measure.matrix import CompareConfig
    from ..measure.workload import parse_batch_sizes

    overrides = {}
    if args.variants:
        overrides["variants"] = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.batch_sizes:
        overrides["batch_sizes"] = parse_batch_sizes(args.batch_sizes)
    for key in ("memory_batch_size", "repeats", "warmup", "steps", "image_size", "width"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    overrides["threads"] = args.threads or None
    overrides["overhead"] = args.overhead
    overrides["compile"] = args.compile
    overrides["precisions"] = args.precision
    overrides["channels_last"] = args.channels_last
    return CompareConfig.quick(**overrides) if args.quick else CompareConfig(**overrides)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..measure.compare import plan_variants, run_compare, units_of_work
    from ..parallel import TorchrunEnv
    from ..report.bench import progress_bar
    from ..report.compare import render_compare, write_compare

    config = config_from_args(args)
    if args.out is None:
        args.out = QUICK_OUT if args.quick else FULL_OUT
    env = TorchrunEnv.from_environ()
    if env.is_rank0:
        check_output_dir(args.out, "--out")  # before minutes of measuring, not after
    names, _ = plan_variants(config)
    total = sum(units_of_work(config, names).values()) + (config.repeats if config.overhead else 0)
    command = shlex.join(["alexnet2gpu", *sys.argv[1:]]) if sys.argv[1:2] == ["compare"] else "alexnet2gpu compare"
    with progress_bar(total, "compare", enabled=env.is_rank0) as bar:

        def on_progress(units: int, description: str) -> None:
            bar.advance(units, description=description)

        report = run_compare(config, command=command, on_progress=on_progress)
    if report is None:  # a torchrun worker other than rank 0
        return 0
    render_compare(report)
    try:
        paths = write_compare(report, args.out)
    except OSError as error:
        raise Alexnet2gpuError(f"could not write the report to {args.out}: {error.strerror or error}") from None
    print(f"wrote {', '.join(str(p) for p in paths)} (torch {torch.__version__})")
    if args.workers and not env.launched:
        _two_workers(args, command)
    return 0


def _two_workers(args: argparse.Namespace, command: str) -> None:
    """The two-workers section: measured in 2 launched processes, written beside the report."""
    import json
    from pathlib import Path

    from ..errors import ConfigError
    from ..measure.workers import MODELS, workers_run
    from ..report import console, write_text_atomic
    from ..report.workers import render_run

    models = tuple(m.strip() for m in args.workers_models.split(",") if m.strip())
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise ConfigError(f"--workers-models {args.workers_models}: choose from {', '.join(MODELS)}")
    batch = args.workers_batch_size or (16 if args.quick else 128)
    import torch

    device = "cuda" if torch.cuda.device_count() >= 2 else "cpu"  # one process per GPU, or gloo on the CPU
    settings = dict(batch_size=batch, threads=args.threads or 1, repeats=args.workers_repeats, warmup=0, device=device)
    if args.image_size or args.width:
        settings.update(image_size=args.image_size, width=args.width or 1.0)
    with console().status(
        f"two workers: {', '.join(models)} at batch {batch}, 2 processes (each way's step counted, "
        f"then {args.workers_repeats} timed round(s))"
    ):
        data = workers_run(models, command=f"{command} (two workers)", **settings)
    out = Path(args.out) / "two-workers.json"
    write_text_atomic(out, json.dumps(data, indent=2) + "\n")
    written = render_run(out, out.with_name("two-workers-bytes.png"))
    print(f"wrote {', '.join(map(str, [out, *written]))} ({data['seconds']:.0f} s)")
