"""Trains a net on Fashion-MNIST, an ImageNet-style folder or synthetic data, in any
placement: one device, two devices in one process (split), or one tower per process under
torchrun (ranks, with data-parallel replicas when WORLD_SIZE = 2k). The paper's recipe is
the default (SGD, momentum 0.9, weight decay 5e-4, lr 0.01 divided by 10 on a plateau of
the validation error at most three times, biases at twice the lr without decay, 0-255
inputs minus the training mean image; on 10 classes it starts at lr 0.003, and says so);
--recipe d2l re-runs the seed's set-up. With --checkpoint-dir, Ctrl-C or SIGTERM writes a
checkpoint at the current step and prints the command that resumes it. Only rank 0 prints
and writes. Examples:

  alexnet2gpu train --data synthetic --steps 20 --width 0.0625 --image-size 64
  alexnet2gpu train --model simplified --recipe d2l --image-size 112 --epochs 2 --plot curves.png
  torchrun --nproc-per-node 2 -m alexnet2gpu train --placement ranks --data synthetic --steps 10
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from ..errors import Alexnet2gpuError, ConfigError
from ..models.names import INIT_NAMES
from ..parallel.names import DEFAULT_TIMEOUT_S
from ..train.names import NONFINITE_POLICIES, RECIPE_NAMES, SCHEDULES, SYNC_EVERY_STEPS
from .arguments import add_model_arguments, add_placement_arguments, check_output_dir, check_output_file
from .launch import LAUNCHED_ENV, record_root_cause


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_arguments(parser)
    add_placement_arguments(parser)
    _add_data_arguments(parser)
    _add_training_arguments(parser)
    _add_output_arguments(parser)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
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
        "--val-size",
        type=int,
        default=None,
        metavar="N",
        help="hold N training images out as the validation split, which the plateau schedule follows; the test "
        "set only reports (default: 5,000 of Fashion-MNIST's 60,000, 1 in 12 of a folder's train/; 0: none)",
    )
    data.add_argument(
        "--ten-crop",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="evaluate image folders on 10 crops, softmax averaged (paper 4.1)",
    )
    data.add_argument("--workers", type=int, default=None, help="loader worker processes (default: automatic)")


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("training")
    run.add_argument(
        "--recipe",
        default="paper",
        choices=RECIPE_NAMES,
        help="paper: SGD momentum 0.9, wd 5e-4, lr 0.01, /10 on plateau, N(0, 0.01) init; "
        "d2l: the seed's plain SGD lr 0.01, Xavier init, 10 epochs (default: %(default)s)",
    )
    run.add_argument(
        "--init",
        default=None,
        choices=INIT_NAMES,
        help="initialisation (default: the recipe's; paper: N(0, 0.01); cfg: the released "
        "layers-145.cfg, std 0.03 in conv3-5; xavier: d2l's)",
    )
    run.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the placed net; the compile time is reported on its own line (default: off)",
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
        "--schedule",
        default=None,
        choices=SCHEDULES,
        help="how the lr moves: plateau (/10 when validation accuracy stops improving), constant, or cosine "
        "(to 0 over the run) (default: the recipe's; paper: plateau, d2l: constant)",
    )
    run.add_argument(
        "--seed", type=int, default=0, help="run seed: weights, data order, dropout (default: %(default)s)"
    )
    run.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: torch's)")
    run.add_argument(
        "--on-nonfinite",
        default="stop",
        choices=NONFINITE_POLICIES,
        help="a NaN/inf loss or gradient: stop the run, or skip that step (default: %(default)s)",
    )
    run.add_argument(
        "--sync-every",
        type=int,
        default=SYNC_EVERY_STEPS,
        metavar="N",
        help="read the loss and non-finite flags from the device every N steps: each read waits for the GPU's "
        "queue (default: %(default)s)",
    )
    run.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds a collective waits for a dead or hung rank before the job fails (ranks; default: %(default)s)",
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
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
    out.add_argument(
        "--weights",
        default=None,
        metavar="PATH",
        help="start from the weights of this checkpoint (same model, any placement) with a fresh optimizer, "
        "schedule and data order: a second stage of training, e.g. a warm restart",
    )
    out.add_argument(
        "--plot",
        default=None,
        metavar="PATH",
        help="a PNG of train loss and train, validation and test accuracy against epoch, redrawn after each "
        "evaluation (default: curves.png in --checkpoint-dir, if given)",
    )
    out.add_argument(
        "--log-every",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="when stdout is not a terminal, a progress line every SECONDS (default: %(default)s)",
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
        init=args.init,
        compile=args.compile,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
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
        weights=args.weights,
        metrics=args.metrics,
        on_nonfinite=args.on_nonfinite,
        timeout=args.timeout,
        sync_every=args.sync_every,
        val_size=args.val_size,
        interrupt_dir=None if args.checkpoint_dir else interrupt_folder(args),
    )


def interrupt_folder(args: argparse.Namespace) -> str:
    """Where a run without --checkpoint-dir keeps its checkpoint and curves when Ctrl-C or
    SIGTERM stops it: ``runs/train-MODEL-DATE-TIME`` under the working directory (``/runs/``
    is in .gitignore), created only then."""
    data = "synthetic" if args.data == "synthetic" else "fashion-mnist" if args.data == "fashion-mnist" else "folder"
    return str(Path("runs") / f"train-{args.model}-{data}-{time.strftime('%Y%m%d-%H%M%S')}")


def check_outputs(args: argparse.Namespace) -> str | None:
    """Every output path and the numbers the config does not check, before any work;
    returns the plot path (``curves.png`` beside the checkpoints by default)."""
    check_output_file(args.metrics, "--metrics", "metrics.jsonl")
    check_output_dir(args.checkpoint_dir, "--checkpoint-dir")
    plot = args.plot or (str(Path(args.checkpoint_dir) / "curves.png") if args.checkpoint_dir else None)
    check_output_file(plot, "--plot", "curves.png")
    if not args.log_every > 0:
        raise ConfigError(f"--log-every {args.log_every:g} is out of range: give a positive number of seconds")
    return plot


def _display_factory(args: argparse.Namespace):
    from ..report.training import LogProgress, TrainingDisplay

    if args.quiet:
        return None
    if sys.stdout.isatty():
        return TrainingDisplay
    return lambda total, header: LogProgress(total, header, every_s=args.log_every)


def _curves_writer(plot: str | None, config):
    if plot is None:
        return None
    label = curves_label(config)
    return lambda curve: _write_curves(plot, curve, label)


def curves_label(config):
    """What the curves' title says: net, data, image size, recipe, schedule, stage."""
    from ..report.curves import RunLabel
    from ..train.build import input_shape

    return RunLabel(
        model=config.model,
        image_size=input_shape(config)[1],
        recipe=config.recipe,
        schedule=config.hyper.schedule,
        stage=2 if config.weights else 1,
        weights=config.weights,
        data=config.data,
    )


def _write_curves(path: str, curve: list[dict], label) -> None:
    from ..report.curves import write_curves

    write_curves(path, curve, label)


def run(args: argparse.Namespace) -> int:
    from ..parallel import TorchrunEnv
    from ..report.training import render_run_summary
    from ..train import train
    from ..train.interrupt import Interrupted

    env = TorchrunEnv.from_environ()
    if env.launched:
        # torchrun stops the other workers with SIGTERM when one fails: end through the
        # normal exit path (destroy_process_group, the display closed) instead of dying.
        signal.signal(signal.SIGTERM, _terminated)
    try:
        plot = check_outputs(args)
        config = config_from_args(args)
        result = train(config, display_factory=_display_factory(args), on_evaluated=_curves_writer(plot, config))
    except Interrupted as stop:
        if env.is_rank0:
            _report_interrupted(stop, plot, config, env)
        return stop.exit_code
    except Alexnet2gpuError as error:
        if env.is_rank0 or getattr(error, "rank_specific", False):
            raise
        record_root_cause("train", error, error.exit_code)  # for torchrun's report, not printed
        return error.exit_code  # the same error on every rank: rank 0 alone prints it
    if env.is_rank0:
        render_run_summary(result)
        if plot:
            print(f"curves: {plot}")
    return 0


def _report_interrupted(stop, plot: str | None, config, env) -> None:
    """Where the interrupted run is kept (its checkpoint, and its curves when the run had no
    plot of its own), and the command that resumes it."""
    print(f"alexnet2gpu train: {stop}", file=sys.stderr)
    if plot is None and stop.checkpoint and stop.curve:
        curves = str(Path(stop.checkpoint).parent / "curves.png")
        _write_curves(curves, stop.curve, curves_label(config))
        print(f"curves: {curves}", file=sys.stderr)
    print(f"resume with: {resume_command(stop.checkpoint, env)}", file=sys.stderr)


def resume_command(checkpoint: str, env) -> str:
    """This command line with ``--resume CHECKPOINT`` in place of any ``--resume``."""
    argv = sys.argv[1:]
    argv = argv[argv.index("train") + 1 :] if "train" in argv else argv
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--resume":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            continue
        if not arg.startswith("--resume="):
            kept.append(arg)
    launcher = ["alexnet2gpu"]
    if env.launched:
        per_node = os.environ.get("LOCAL_WORLD_SIZE", str(env.world_size))
        launched_by_us = os.environ.get(LAUNCHED_ENV) == "1"
        launcher = (
            ["alexnet2gpu", "launch", "--nproc-per-node", per_node]
            if launched_by_us
            else ["torchrun", "--nproc-per-node", per_node, "-m", "alexnet2gpu"]
        )
    return shlex.join([*launcher, "train", *kept, "--resume", checkpoint])


def _terminated(signum, frame) -> None:
    raise Terminated(
        f"rank {os.environ.get('RANK', '?')}: stopped by the launcher (SIGTERM), usually because another rank failed"
    )


class Terminated(Alexnet2gpuError):
    """SIGTERM from torchrun."""
