"""Every layer of a placed net: name, device, output shape and parameters, with totals per
device. Planned without the hardware (meta and fake tensors): `--placement split` works on
a machine with no GPU and allocates nothing. The torchrun placements (ranks, replicas,
hybrid) plan without torchrun as one process of --processes, with every rank's parameters."""

from __future__ import annotations

import argparse

from .arguments import add_model_arguments, add_placement_arguments, check_output_file, model_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_placement_arguments(parser)
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help="processes to plan ranks, replicas and hybrid for (default: %(default)s)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the summary as JSON to PATH ('-' for stdout)")


def run(args: argparse.Namespace) -> int:
    from ..checks.summary import plan_summary
    from ..report import write_json
    from ..report.summary import render_layer_table

    check_output_file(args.json, "--json")
    record = plan_summary(args.model, args.placement, args.devices, processes=args.processes, **model_kwargs(args))
    if args.json != "-":
        render_layer_table(record)
    if args.json:
        write_json(args.json, record.to_json())
    return 0
