"""Trains a net on Fashion-MNIST, an ImageNet-style folder or synthetic data, in any
placement: one device, two devices in one process (split), or under torchrun one tower per
process (ranks, with data-parallel replicas when WORLD_SIZE = 2k), the whole net per
process (replicas: data parallel, any net; auto for a single-stream net) or the 2014 hybrid
(hybrid: conv trunk data parallel, fc6-fc8 split over the processes). The paper's recipe is
the default (SGD, momentum 0.9, weight decay 5e-4, lr 0.01 divided by 10 on a plateau of
the validation error at most three times, biases at twice the lr without decay, 0-255
inputs minus the training mean image; on 10 classes it starts at lr 0.003, and says so);
--recipe d2l re-runs the seed's set-up. 5,000 training images are held out as the
validation split that the schedule follows; the test set only reports. Ctrl-C or SIGTERM
writes a checkpoint at the current step (in --checkpoint-dir, else in runs/) and prints the
command that resumes it. Only rank 0 prints and writes. Examples:

  alexnet2gpu train --data synthetic --steps 20 --width 0.0625 --image-size 64
  alexnet2gpu train --model simplified --recipe d2l --image-size 112 --epochs 2 --plot curves.png
  torchrun --nproc-per-node 2 -m alexnet2gpu train --placement ranks --data synthetic --steps 10
  torchrun --nproc-per-node 2 -m alexnet2gpu train --model simplified --placement hybrid --epochs 1
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from dataclasses import Field, fields
from pathlib import Path

from ..errors import Alexnet2gpuError, ConfigError
from ..train.config import SettingError, TrainConfig
from .arguments import add_model_arguments, add_placement_arguments, check_output_dir, check_output_file
from .launch import LAUNCHED_ENV, record_root_cause


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_arguments(parser)
    add_placement_arguments(parser)
    groups = add_config_arguments(parser)
    out = groups["output"]
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
    out.add_argument("--quiet", action="store_true", help="no live display, only the summary (default: off)")


def flag_of(setting: Field) -> str:
    """A :class:`TrainConfig` field's flag: its metadata's ``flag``, else ``--`` and its name
    with ``-`` for ``_`` (``batch_size``: ``--batch-size``)."""
    return setting.metadata.get("flag") or "--" + setting.name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """One flag per :class:`TrainConfig` field, from the field's metadata (its default, help,
    group, choices...), in the groups the fields name; returns the groups by name. The
    model and placement fields' flags are cli.arguments', shared with the other commands."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for setting in fields(TrainConfig):
        meta = setting.metadata
        if not setting.init or "cli" in meta:  # shared, or no flag (interrupt_dir)
            continue
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(meta["group"])
        kwargs = {key: meta[key] for key in ("choices", "metavar", "type", "nargs", "const") if key in meta}
        kind = setting.type.split(" | ")[0]  # the annotation, a string: "int | None" -> "int"
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind in ("int", "float"):
            kwargs.setdefault("type", {"int": int, "float": float}[kind])
        text = meta["help"] if "default:" in meta["help"] else f"{meta['help']} (default: %(default)s)"
        groups[meta["group"]].add_argument(
            flag_of(setting), dest=setting.name, default=setting.default, help=text, **kwargs
        )
    return groups


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of the parsed flags; a refused setting is named by its flag."""
    given = {setting.name: getattr(args, setting.name) for setting in fields(TrainConfig) if _has_flag(setting)}
    try:
        return TrainConfig(**given, interrupt_dir=None if args.checkpoint_dir else interrupt_folder(args))
    except SettingError as error:
        raise ConfigError(error.naming(flag_of)) from None


def _has_flag(setting: Field) -> bool:
    return setting.init and setting.metadata.get("cli") != "none"


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
