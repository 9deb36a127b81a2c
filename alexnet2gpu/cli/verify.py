"""Checks that every placement this machine can run (towers, grouped, and split on two
GPUs where present, else on cpu,cpu) computes the same logits, loss and gradients as the
float64 reference, on a tiny net. Exits 1 on a mismatch. Run it on a new machine, e.g. a
two-GPU box before training."""

from __future__ import annotations

import argparse

from .arguments import check_output_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--width", type=float, default=1 / 16, help="width multiplier of the test net (default: 1/16)")
    parser.add_argument(
        "--image-size", type=int, default=None, help="input side (default: the smallest that works, 64)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="batch size (default: %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for weights, batch and dropout (default: %(default)s)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-' for stdout)")


def run(args: argparse.Namespace) -> int:
    from ..checks.verify import TOLERANCE, available_placements, check_placement
    from ..report import write_json
    from ..report.summary import render_checks

    check_output_file(args.json, "--json")
    checks = [
        check_placement(
            placement, devices, width=args.width, image_size=args.image_size, batch_size=args.batch_size, seed=args.seed
        )
        for placement, devices in available_placements()
    ]
    if args.json != "-":
        render_checks(checks)
    if args.json:
        write_json(args.json, {"tolerance": TOLERANCE, "checks": [c.to_json() for c in checks]})
    ok = all(c.ok for c in checks)
    if not ok:
        bad = ", ".join(c.placement for c in checks if not c.ok)
        print(f"alexnet2gpu verify: MISMATCH in {bad}")
    return 0 if ok else 1
