"""The `alexnet2gpu` command: one sub-command per module in :mod:`alexnet2gpu.cli`.

Each command module has ``add_arguments(parser)`` and ``run(args) -> int``. Errors meant
for the user (:class:`~alexnet2gpu.errors.Alexnet2gpuError`) print as one line, without a
traceback, and exit with their code: 2 for bad usage, as argparse does, 1 for failures.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import EXIT_USAGE, Alexnet2gpuError
from . import bench, compare, memory, summary, train, verify

__all__ = ["build_parser", "main"]

# sub-command -> (its module, one-line help)
COMMANDS = {
    "summary": (summary, "every layer's device, output shape and parameters, planned without hardware"),
    "verify": (verify, "check that every placement here computes the same function"),
    "bench": (bench, "throughput in images/s, training and inference, over batch sizes"),
    "memory": (memory, "memory per device for one training step, and bytes exchanged"),
    "compare": (compare, "the main job: every net and placement side by side, tables, JSON, Markdown, plots"),
    "train": (train, "train on Fashion-MNIST, an image folder or synthetic data, in any placement, with checkpoints"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (the value, what would work) and exit 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="alexnet2gpu",
        description="The original two-GPU AlexNet (2012) beside the simplified single-stream net.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except Alexnet2gpuError as error:
        print(f"alexnet2gpu {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"alexnet2gpu {args.command}: interrupted", file=sys.stderr)
        return 130
