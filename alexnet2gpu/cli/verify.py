"""Checks that every placement this machine can run (towers, grouped, and split on two
GPUs where present, else on cpu,cpu) computes the same logits, loss and gradients as the
float64 reference, on a tiny net. Exits 1 on a mismatch. Run it on a new machine, e.g. a
two-GPU box before training. With --precision bf16 or fp16 the step runs under autocast,
each placement is held to tolerances derived from the dtype's unit roundoff, and the
placements to each other."""

from __future__ import annotations

import argparse

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


def run(args: argparse.Namespace) -> int:
    from ..checks.verify import check_all, tolerances
    from ..report import write_json
    from ..report.summary import render_checks

    check_output_file(args.json, "--json")
    numerics = numerics_from_args(args)
    checks, agreements = check_all(
        width=args.width, image_size=args.image_size, batch_size=args.batch_size, seed=args.seed, numerics=numerics
    )
    limits = tolerances(numerics.precision)
    if args.json != "-":
        render_checks(checks)
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
            },
        )
    bad = [c.placement for c in checks if not c.ok] + [
        f"{a.placement} against {a.against}" for a in agreements if not a.ok
    ]
    if bad:
        print(f"alexnet2gpu verify: MISMATCH in {', '.join(bad)}")
    return 1 if bad else 0
