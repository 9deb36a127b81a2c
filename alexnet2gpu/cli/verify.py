"""Checks that every placement this machine can run (towers, grouped, and split on two
GPUs where present, else on cpu,cpu) computes the same logits, loss and gradients as the
float64 reference, on a tiny net. Exits 1 on a mismatch. Run it on a new machine, e.g. a
two-GPU box before training. With --precision bf16 or fp16 the step runs under autocast,
each placement is held to tolerances derived from the dtype's unit roundoff, and the
placements to each other.

With --processes 2 (or 2,4) verify also launches that many CPU processes (gloo, one thread
each) itself and checks the torchrun placements there: ranks for dual, replicas for every
net, hybrid for the single-stream nets, each net at its smallest input, the same loss and
gradients as the single-process float64 reference and the bytes sent at the collectives
equal to the closed form. Off by default: each process count adds a launch (about 15-40 s
on a 2-core CPU) to the few seconds of the one-process rows."""

from __future__ import annotations

import argparse

from ..data.shares import local_batch
from ..errors import ConfigError
from .arguments import add_precision_arguments, check_output_file, numerics_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--width", type=float, default=1 / 16, help="width multiplier of the test net (default: 1/16)")
    parser.add_argument(
        "--image-size", type=int, default=None, help="input side (default: the smallest that works, 64)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="batch size (default: %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for weights, batch and dropout (default: %(default)s)"
    )
    add_precision_arguments(parser)
    group = parser.add_argument_group("process placements")
    group.add_argument(
        "--processes",
        metavar="N[,N]",
        default=None,
        help="also launch N CPU processes (gloo, 1 thread each) and check ranks, replicas and hybrid there, "
        "e.g. 2 or 2,4; each count adds a launch of about 15-40 s on 2 CPU cores (default: off)",
    )
    group.add_argument(
        "--process-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="seconds a process job may take before it fails (default: %(default)g)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-' for stdout)")


def _print_agreements(agreements, limits) -> None:
    """The low-precision lines: what the gradient column measured, and placement against placement."""
    print(
        f"gradients: the norm of all of them together against float64's, relative (tolerance {limits.grads:.3g}); "
        f"logits and loss: largest element (tolerance {limits.forward:.3g})"
    )
    for a in agreements:
        limit = a.tolerance if a.same_forward else a.grads_tolerance
        print(
            f"{a.placement} against {a.against} ({a.precision}): logits {a.logits_rel_err:.2e}, loss "
            f"{a.loss_rel_err:.2e}, gradients {a.grads_rel_err:.2e} ({a.worst_grad}; "
            f"{'same forward bit for bit' if a.same_forward else 'forward differs'}, tolerance {limit:.3g}): "
            f"{'same' if a.ok else 'MISMATCH'}"
        )


def parse_processes(spec: str | None, batch_size: int) -> list[int]:
    """``--processes``: the process counts, each at least 2 and dividing the batch."""
    if spec is None:
        return []
    try:
        counts = [int(item) for item in spec.split(",")]
    except ValueError:
        raise ConfigError(f"--processes takes process counts such as 2 or 2,4, got '{spec}'") from None
    for count in counts:
        if count < 2:
            raise ConfigError(f"--processes {spec}: a count must be at least 2, got {count}")
        try:
            local_batch(batch_size, count)  # the one rule for a batch over replicas (torch-free)
        except ConfigError as error:
            raise ConfigError(f"--batch-size {batch_size} over {count} processes: {error}") from None
    return list(dict.fromkeys(counts))


def _process_rows(args: argparse.Namespace, counts: list[int], precision: str):
    """Every process check on each of ``counts`` processes, one launch per count."""
    from ..checks.verify_launch import launch_checks, process_checks

    records, failures = [], []
    for count in counts:
        checks = [(placement, model, args.batch_size) for placement, model in process_checks(count)]
        got, failure = launch_checks(
            count, checks, timeout_s=args.process_timeout, width=args.width, seed=args.seed, precision=precision
        )
        records += got
        failures += [failure] if failure else []
    return records, failures


def run(args: argparse.Namespace) -> int:
    check_output_file(args.json, "--json")
    counts = parse_processes(args.processes, args.batch_size)
    if args.process_timeout <= 0:
        raise ConfigError(f"--process-timeout must be positive, got {args.process_timeout:g}")

    from ..checks.verify import check_all, tolerances
    from ..report import write_json
    from ..report.summary import render_checks

    numerics = numerics_from_args(args)
    checks, agreements = check_all(
        width=args.width, image_size=args.image_size, batch_size=args.batch_size, seed=args.seed, numerics=numerics
    )
    processes, failures = _process_rows(args, counts, numerics.precision)
    limits = tolerances(numerics.precision)
    if args.json != "-":
        render_checks(checks, processes, failures)
        if numerics.mixed:
            _print_agreements(agreements, limits)
    if args.json:
        write_json(
            args.json,
            {
                "tolerance": limits.forward,
                "tolerances": {"forward": limits.forward, "grads": limits.grads, "agree": limits.agree},
                "numerics": numerics.record(),
                "checks": [c.to_json() for c in checks],
                "agreements": [a.to_json() for a in agreements],
                "processes": counts,
                "process_checks": [c.to_json() for c in processes],
                "process_failures": [f.to_json() for f in failures],
            },
        )
    bad = (
        [c.placement for c in checks if not c.ok]
        + [f"{a.placement} against {a.against}" for a in agreements if not a.ok]
        + [f"{c.placement}/{c.model} on {c.processes} processes" for c in processes if not c.ok]
        + [f.line() for f in failures]
    )
    if bad:
        print(f"alexnet2gpu verify: MISMATCH in {', '.join(bad)}")
    return 1 if bad else 0
