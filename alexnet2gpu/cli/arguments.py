"""Flags shared by the sub-commands: the model and its sizes, the placement and devices.
Torch-free, as every module's top in this package: the flags parse, and a bad one is
refused, before torch loads."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import ConfigError
from ..models.names import MODEL_NAMES
from ..parallel.names import PLACEMENTS, PRECISIONS

__all__ = [
    "add_model_arguments",
    "add_placement_arguments",
    "add_precision_arguments",
    "check_output_dir",
    "check_output_file",
    "model_kwargs",
    "numerics_from_args",
    "precision_list",
]


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


def add_precision_arguments(
    parser: argparse.ArgumentParser, *, channels_last: bool = False, cudnn_benchmark: bool = False
) -> None:
    """``--precision fp32|bf16|fp16``; with ``channels_last`` also ``--channels-last``, with
    ``cudnn_benchmark`` also ``--cudnn-benchmark/--no-cudnn-benchmark`` (default: on where
    CUDA runs the step). :func:`numerics_from_args` turns them into a ``Numerics``."""
    group = parser.add_argument_group("numerics")
    group.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="fp32 (the paper's), or torch.autocast to bf16 or fp16 with float32 weights "
        "(fp16 also scales the loss) (default: %(default)s)",
    )
    if channels_last:
        group.add_argument(
            "--channels-last",
            action=argparse.BooleanOptionalAction,
            default=False,
            help="the net and its input in channels-last memory format (default: off)",
        )
    if cudnn_benchmark:
        group.add_argument(
            "--cudnn-benchmark",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="torch.backends.cudnn.benchmark: let cuDNN time its algorithms for each shape "
            "(default: on where the step runs on CUDA, as torch leaves it elsewhere)",
        )


def precision_list(text: str) -> list[str]:
    """``"fp32,bf16"`` -> ``["fp32", "bf16"]`` (an argparse ``type``: a bad name is refused
    with one line that lists the choices)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in names if name not in PRECISIONS] or ([] if names else [""])
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown precision '{bad[0]}' in '{text}': choose from {', '.join(PRECISIONS)}"
        )
    return list(dict.fromkeys(names))


def numerics_from_args(args: argparse.Namespace, *, cuda: bool = False):
    """The ``Numerics`` the flags of :func:`add_precision_arguments` ask for (imports torch).
    ``cuda``: the step runs on CUDA, so an unset ``--cudnn-benchmark`` means on."""
    from ..parallel.precision import Numerics

    benchmark = getattr(args, "cudnn_benchmark", None)
    if benchmark is None and cuda and hasattr(args, "cudnn_benchmark"):
        benchmark = True
    return Numerics(
        precision=getattr(args, "precision", "fp32"),
        channels_last=bool(getattr(args, "channels_last", False)),
        cudnn_benchmark=benchmark,
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


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_file(path: str | None, flag: str, example: str = "out.json") -> None:
    """Refuses, before any work starts, an output file that cannot be written: a folder, a
    file in a folder that cannot be created, or an unwritable place. ``-`` (stdout) and
    None pass. ``example`` is the file name the message suggests inside a folder."""
    if path is None or path == "-":
        return
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{flag} {path} is a folder: give a file path, e.g. {target / example}")
    parent = _nearest_existing(target.parent)
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a file, so the folder cannot be created")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ConfigError(f"{flag} {path}: not writable")


def check_output_dir(path: str | None, flag: str) -> None:
    """Refuses, before any work starts, an output folder that is a file or cannot be
    created or written."""
    if path is None:
        return
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{flag} {path} is a file: give a folder")
    parent = _nearest_existing(target)
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a file, so the folder cannot be created")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{flag} {path}: not writable")
