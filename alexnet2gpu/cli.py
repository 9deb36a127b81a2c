"""The `alexnet2gpu` command: one sub-command per module in :mod:`alexnet2gpu.commands`.

Each command module has ``add_arguments(parser)`` and ``run(args) -> int``. Errors meant
for the user (:class:`~alexnet2gpu.errors.Alexnet2gpuError`) print as one line, without a
traceback, and exit with their code: 2 for bad usage, as argparse does, 1 for failures.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import EXIT_USAGE, Alexnet2gpuError

__all__ = ["main", "build_parser", "add_model_arguments", "add_placement_arguments"]

# sub-command -> (module under alexnet2gpu.commands, one-line help)
COMMANDS = {
    "summary": ("summary", "every layer's device, output shape and parameters, planned without hardware"),
    "verify": ("verify", "check that every placement here computes the same function"),
    "bench": ("bench", "throughput in images/s, training and inference, over batch sizes"),
    "memory": ("memory", "memory per device for one training step, and bytes exchanged"),
    "compare": ("compare", "the main job: every net and placement side by side, tables, JSON, Markdown, plots"),
    "train": ("train", "train on Fashion-MNIST, an image folder or synthetic data, in any placement, with checkpoints"),
}


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str = "dual") -> None:
    """--model and the size flags shared by every command that builds a net."""
    from .models import MODEL_NAMES

    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model, choices=MODEL_NAMES,
                       help="the net (default: %(default)s)")
    group.add_argument("--in-channels", type=int, default=None,
                       help="input channels (default: the model's, 3; 1 for simplified)")
    group.add_argument("--num-classes", type=int, default=None,
                       help="classes (default: the model's, 1000; 10 for simplified)")
    group.add_argument("--image-size", type=int, default=None,
                       help="input side in pixels (default: the model's, 227; 224 for simplified)")
    group.add_argument("--width", type=float, default=1.0,
                       help="multiplier on every layer width, e.g. 0.0625 for a tiny net (default: %(default)s)")
    group.add_argument("--dropout", type=float, default=0.5, help="dropout probability (default: %(default)s)")


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    from .placement import PLACEMENTS

    group = parser.add_argument_group("placement")
    group.add_argument("--placement", default="auto", choices=PLACEMENTS,
                       help="where the towers run (default: %(default)s)")
    group.add_argument("--devices", default=None,
                       help="comma-separated devices, e.g. cuda:0,cuda:1 or cpu,cpu (default: chosen by the placement)")


def model_kwargs(args: argparse.Namespace) -> dict:
    """The build_model keywords from the model flags."""
    return {
        "in_channels": args.in_channels,
        "num_classes": args.num_classes,
        "image_size": args.image_size,
        "width": args.width,
        "dropout": args.dropout,
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
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"alexnet2gpu.commands.{module_name}")
        command = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except Alexnet2gpuError as error:
        print(f"alexnet2gpu {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"alexnet2gpu {args.command}: interrupted", file=sys.stderr)
        return 130
