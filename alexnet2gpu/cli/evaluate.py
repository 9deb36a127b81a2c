"""Evaluates a training checkpoint: top-1 and top-5 accuracy, per-class accuracy and a
confusion-matrix PNG, with JSON on request. The net and its input pipeline (image size,
channels, width, the recipe's pixels and mean image) are rebuilt from the checkpoint, and
the data default to the ones it trained on, so a run's final checkpoint gives that run's
final test accuracy. Any placement's checkpoint evaluates in any placement, on any device.
Examples:

  alexnet2gpu evaluate runs/a/step-00000936.pt
  alexnet2gpu evaluate runs/a/step-00000936.pt --device cuda:0 --json runs/a/eval.json
  alexnet2gpu evaluate runs/imagenet/step-00500000.pt --ten-crop --placement split --devices cuda:0,cuda:1
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from ..parallel.names import PLACEMENTS
from .arguments import check_output_file

SPLITS = ("test", "val")  # checks.evaluate.SPLITS, without torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file written by train (step-*.pt)")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--split",
        default="test",
        choices=SPLITS,
        help="test, or val: the images the run held out of its training set (default: %(default)s)",
    )
    data.add_argument(
        "--data", default=None, help="fashion-mnist, synthetic or an image folder (default: the checkpoint's)"
    )
    data.add_argument(
        "--data-dir", default=None, help="folder of the Fashion-MNIST IDX files (default: the checkpoint's)"
    )
    data.add_argument(
        "--ten-crop",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="image folders: 10 crops, softmax averaged (paper 4.1), and the centre crop alone "
        "(default: as the run evaluated)",
    )
    data.add_argument(
        "--image-size", type=int, default=None, help="only for a checkpoint that does not record its input size"
    )
    data.add_argument("--workers", type=int, default=None, help="loader worker processes (default: automatic)")
    where = parser.add_argument_group("where it runs")
    where.add_argument(
        "--placement", default="auto", choices=PLACEMENTS, help="where the towers run (default: %(default)s)"
    )
    where.add_argument(
        "--device",
        "--devices",
        dest="devices",
        metavar="DEVICE",
        default=None,
        help="cpu, cuda:0, or two for split: cuda:0,cuda:1 (default: the first GPU, else the CPU)",
    )
    where.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the run's)")
    where.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-' for stdout only)")
    out.add_argument(
        "--confusion",
        metavar="PATH",
        default=None,
        help="the confusion-matrix PNG (default: NAME-confusion.png beside --json PATH, else confusion.png "
        "beside the checkpoint; confusion-val.png for --split val)",
    )


def confusion_path(args: argparse.Namespace) -> str:
    """``--confusion``, else beside the JSON, else in the checkpoint's folder."""
    if args.confusion:
        return args.confusion
    if args.json and args.json != "-":
        json_path = Path(args.json)
        return str(json_path.with_name(f"{json_path.stem}-confusion.png"))
    name = "confusion.png" if args.split == "test" else f"confusion-{args.split}.png"
    return str(Path(args.checkpoint).parent / name)


def _check(args: argparse.Namespace) -> str:
    """Every path and number, before torch loads; returns the PNG's path."""
    if not Path(args.checkpoint).is_file():
        raise ConfigError(f"checkpoint {args.checkpoint} does not exist")
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--threads", args.threads),
        ("--image-size", args.image_size),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    check_output_file(args.json, "--json", "evaluate.json")
    png = confusion_path(args)
    check_output_file(png, "--confusion", "confusion.png")
    return png


def run(args: argparse.Namespace) -> int:
    png = _check(args)

    from ..checks.evaluate import evaluate_checkpoint
    from ..parallel import set_cpu_threads
    from ..report import write_json
    from ..report.evaluate import render_evaluation, write_confusion_png

    set_cpu_threads(args.threads or None)
    record = evaluate_checkpoint(
        args.checkpoint,
        split=args.split,
        data=args.data,
        data_dir=args.data_dir,
        ten_crop=args.ten_crop,
        batch_size=args.batch_size,
        placement=args.placement,
        devices=args.devices,
        image_size=args.image_size,
        workers=args.workers,
    )
    write_confusion_png(png, record)
    if args.json != "-":
        render_evaluation(record)
        print(f"confusion matrix: {png}")
    if args.json:
        write_json(args.json, {**record.to_json(), "confusion_png": png})
        if args.json != "-":
            print(f"JSON: {args.json}")
    return 0
