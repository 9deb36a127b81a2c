"""Flags shared by the sub-commands: the model and its sizes, the placement and devices."""

from __future__ import annotations

import argparse

from ..models import MODEL_NAMES
from ..parallel import PLACEMENTS

__all__ = ["add_model_arguments", "add_placement_arguments", "model_kwargs"]


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str = "dual") -> None:
    """--model and the size flags shared by every command that builds a net."""

    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model, choices=MODEL_NAMES, help="the net (default: %(default)s)")
    group.add_argument(
        "--in-channels", type=int, default=None, help="input channels (default: the model's, 3; 1 for simplified)"
    )
    group.add_argument(
        "--num-classes", type=int, default=None, help="classes (default: the model's, 1000; 10 for simplified)"
    )
    group.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input side in pixels (default: the model's, 227; 224 for simplified)",
    )
    group.add_argument(
        "--width",
        type=float,
        default=1.0,
        help="multiplier on every layer width, e.g. 0.0625 for a tiny net (default: %(default)s)",
    )
    group.add_argument("--dropout", type=float, default=0.5, help="dropout probability (default: %(default)s)")


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:

    group = parser.add_argument_group("placement")
    group.add_argument(
        "--placement", default="auto", choices=PLACEMENTS, help="where the towers run (default: %(default)s)"
    )
    group.add_argument(
        "--devices",
        default=None,
        help="comma-separated devices, e.g. cuda:0,cuda:1 or cpu,cpu (default: chosen by the placement)",
    )


def model_kwargs(args: argparse.Namespace) -> dict:
    """The build_model keywords from the model flags."""
    return {
        "in_channels": args.in_channels,
        "num_classes": args.num_classes,
        "image_size": args.image_size,
        "width": args.width,
        "dropout": args.dropout,
    }
