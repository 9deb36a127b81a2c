"""Trains a net on Fashion-MNIST, an ImageNet-style folder or synthetic data, in any
placement: one device, two devices in one process (split), or one tower per process under
torchrun (ranks, with data-parallel replicas when WORLD_SIZE = 2k). The paper's recipe is
the default (SGD, momentum 0.9, weight decay 5e-4, lr 0.01 divided by 10 on a plateau of
the validation error); --recipe d2l re-runs the seed's set-up. Only rank 0 prints and
writes. Examples:

  alexnet2gpu train --data synthetic --steps 20 --width 0.0625 --image-size 64
  alexnet2gpu train --model simplified --recipe d2l --image-size 112 --epochs 2
  torchrun --nproc-per-node 2 -m alexnet2gpu train --placement ranks --data synthetic --steps 10
"""

from __future__ import annotations

import argparse
import os
import signal

from ..errors import Alexnet2gpuError
from .arguments import add_model_arguments, add_placement_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_arguments(parser)
    add_placement_arguments(parser)
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        default="fashion-mnist",
        help="fashion-mnist, synthetic, or a folder with train/ and val/ (default: %(default)s)",
    )
    data.add_argument(
        "--data-dir",
        default=None,
        help="folder of the Fashion-MNIST IDX files (default: /usr/share/datasets/fashion-mnist, "
        "else a torchvision download)",
    )
    data.add_argument(
        "--train-subset",
        type=int,
        default=None,
        metavar="N",
        help="train on the first N training images only (quick runs)",
    )
    data.add_argument(
        "--ten-crop",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="evaluate image folders on 10 crops, softmax averaged (paper 4.1)",
    )
    data.add_argument("--workers", type=int, default=None, help="loader worker processes (default: automatic)")
    run = parser.add_argument_group("training")
    run.add_argument(
        "--recipe",
        default="paper",
        choices=("paper", "d2l"),
        help="paper: SGD momentum 0.9, wd 5e-4, lr 0.01, /10 on plateau, N(0, 0.01) init; "
        "d2l: the seed's plain SGD lr 0.01, Xavier init, 10 epochs (default: %(default)s)",
    )
    run.add_argument("--steps", type=int, default=None, help="total optimizer steps (default: the epochs')")
    run.add_argument("--epochs", type=int, default=None, help="epochs (default: the recipe's, paper 90, d2l 10)")
    run.add_argument(
        "--batch-size", type=int, default=None, help="global batch, split over data-parallel replicas (default: 128)"
    )
    run.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's, 0.01)")
    run.add_argument("--momentum", type=float, default=None, help="SGD momentum (default: the recipe's)")
    run.add_argument("--weight-decay", type=float, default=None, help="weight decay (default: the recipe's)")
    run.add_argument(
        "--seed", type=int, default=0, help="run seed: weights, data order, dropout (default: %(default)s)"
    )
    run.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: torch's)")
    run.add_argument(
        "--on-nonfinite",
        default="stop",
        choices=("stop", "skip"),
        help="a NaN/inf loss or gradient: stop the run, or skip that step (default: %(default)s)",
    )
    run.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        help="seconds a collective waits for a dead or hung rank before the job fails (ranks; default: %(default)s)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--metrics",
        default=None,
        metavar="PATH",
        help="append one JSON object per step and per evaluation to PATH (rank 0)",
    )
    out.add_argument("--checkpoint-dir", default=None, metavar="DIR", help="write checkpoints to DIR (rank 0)")
    out.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="also checkpoint every N steps (default: only at the end)",
    )
    out.add_argument("--keep", type=int, default=3, help="checkpoints kept in DIR (default: %(default)s)")
    out.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="PATH",
        help="continue from PATH, or without PATH from the newest valid checkpoint in "
        "--checkpoint-dir (a fresh start if there is none yet)",
    )
    out.add_argument("--quiet", action="store_true", help="no live display, only the summary")


def config_from_args(args: argparse.Namespace):
    from ..train import TrainConfig

    return TrainConfig(
        model=args.model,
        placement=args.placement,
        devices=args.devices,
        data=args.data,
        data_dir=args.data_dir,
        train_subset=args.train_subset,
        in_channels=args.in_channels,
        num_classes=args.num_classes,
        image_size=args.image_size,
        width=args.width,
        dropout=args.dropout,
        recipe=args.recipe,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        steps=args.steps,
        epochs=args.epochs,
        seed=args.seed,
        threads=args.threads,
        workers=args.workers,
        ten_crop=args.ten_crop,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        keep=args.keep,
        resume=args.resume,
        metrics=args.metrics,
        on_nonfinite=args.on_nonfinite,
        timeout=args.timeout,
    )


def run(args: argparse.Namespace) -> int:
    from ..parallel import TorchrunEnv
    from ..report.training import TrainingDisplay, render_run_summary
    from ..train import train

    env = TorchrunEnv.from_environ()
    if env.launched:
        # torchrun stops the other workers with SIGTERM when one fails: end through the
        # normal exit path (destroy_process_group, the display closed) instead of dying.
        signal.signal(signal.SIGTERM, _terminated)
    try:
        config = config_from_args(args)
        factory = None if args.quiet else TrainingDisplay
        result = train(config, display_factory=factory)
    except Alexnet2gpuError as error:
        if env.is_rank0 or getattr(error, "rank_specific", False):
            raise
        return error.exit_code  # the same error on every rank: rank 0 alone prints it
    if env.is_rank0:
        render_run_summary(result)
    return 0


def _terminated(signum, frame) -> None:
    raise Terminated(
        f"rank {os.environ.get('RANK', '?')}: stopped by the launcher (SIGTERM), usually because another rank failed"
    )


class Terminated(Alexnet2gpuError):
    """SIGTERM from torchrun."""
