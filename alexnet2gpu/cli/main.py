"""The `alexnet2gpu` command: one sub-command per module in :mod:`alexnet2gpu.cli`.

Each command module has ``add_arguments(parser)`` and ``run(args) -> int``. Errors meant
for the user (:class:`~alexnet2gpu.errors.Alexnet2gpuError`) print as one line, without a
traceback, and exit with their code: 2 for bad usage, as argparse does, 1 for failures.

Parsing imports no torch (the command modules import it in ``run``): ``--help``,
``--version`` and a refused flag answer at once. A refused flag or value names the
sub-command's help and the closest flag or value that would work.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys

from .. import __version__
from ..errors import EXIT_USAGE, Alexnet2gpuError
from . import bench, compare, evaluate, fit, launch, memory, summary, train, verify

__all__ = ["build_parser", "main"]

# sub-command -> (its module, one-line help)
COMMANDS = {
    "summary": (summary, "every layer's device, output shape and parameters, planned without hardware"),
    "verify": (verify, "check that every placement here computes the same function"),
    "bench": (bench, "throughput in images/s, training and inference, over batch sizes"),
    "memory": (memory, "memory per device for one training step, and bytes exchanged"),
    "fit": (fit, "the largest training batch that fits each card, per model, placement and precision"),
    "compare": (compare, "the main job: every net and placement side by side, tables, JSON, Markdown, plots"),
    "train": (train, "train on Fashion-MNIST, an image folder or synthetic data, in any placement, with checkpoints"),
    "evaluate": (evaluate, "top-1/top-5, per-class accuracy and a confusion matrix of a checkpoint, in any placement"),
    "launch": (launch, "run COMMAND under torchrun; a failed rank's own error is the one last line"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (the value, what would work, where the help
    is) and exit 2. ``commands``: the sub-command parsers, by name (the top-level's)."""

    commands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        # argparse refuses unknown flags at the top level (`see alexnet2gpu --help`): the
        # sub-command given refuses them instead, with its help and its closest flags
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self.commands.get(getattr(namespace, "command", None), self)
            parser.error(f"unrecognized arguments: {' '.join(extras)}{_did_you_mean(extras, parser)}")
        return namespace

    def _check_value(self, action, value):
        # an invalid choice (a sub-command, --model, --placement...) also names the closest
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as error:
            close = difflib.get_close_matches(str(value), [str(choice) for choice in action.choices], n=1)
            if not close:
                raise
            raise argparse.ArgumentError(action, f"{error.message} (did you mean {close[0]!r}?)") from None


def _did_you_mean(extras: list[str], parser: argparse.ArgumentParser) -> str:
    """`` (did you mean --steps?)``: the closest of ``parser``'s flags to each unknown one."""
    flags = list(parser._option_string_actions)
    close = [
        match
        for arg in extras
        if arg.startswith("-")
        for match in difflib.get_close_matches(arg.split("=", 1)[0], flags, n=1)
    ]
    return f" (did you mean {', '.join(close)}?)" if close else ""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="alexnet2gpu",
        description="The original two-GPU AlexNet (2012) beside the simplified single-stream net.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("--version", action="version", version=f"alexnet2gpu {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.commands = sub.choices
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
        if not launch.record_root_cause(args.command, error, error.exit_code):  # under `alexnet2gpu launch`
            print(f"alexnet2gpu {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"alexnet2gpu {args.command}: interrupted", file=sys.stderr)
        return 130
