"""Runs COMMAND under torchrun, started from this process, and ends with one line: the
first rank's own error (a refusal, a failed collective), or which rank died and of what
signal, instead of torchrun's ChildFailedError report. The exit status is that rank's
(128 + N for signal N). Every torchrun option before COMMAND is passed on as it is
(see torchrun --help); the workers run `python -m alexnet2gpu COMMAND ARGS`. Examples:

  alexnet2gpu launch --nproc-per-node 2 train --placement ranks --data synthetic --steps 10
  alexnet2gpu launch --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \\
      --rdzv-endpoint HOST:29500 --rdzv-id myjob train --placement ranks

Under plain torchrun the same one line is what torchrun's own report names as the root
cause (its error_file and traceback fields), below the rest of that report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass

from ..errors import EXIT_FAILURE, Alexnet2gpuError, ConfigError

__all__ = ["LAUNCHED_ENV", "LaunchError", "add_arguments", "record_root_cause", "root_cause", "run", "split_argv"]

# Set in the workers' environment by `alexnet2gpu launch`: the launcher prints the root
# cause, so a worker that recorded its error in the error file does not print it too.
LAUNCHED_ENV = "ALEXNET2GPU_LAUNCHED"
_KEY = "alexnet2gpu"  # this project's part of torchelastic's error file
_LAUNCHER_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # how torchrun, or Ctrl-C, stops the others
# What a death by these signals usually means here. NCCL reports asynchronously: its watchdog
# thread, not the collective's call, notices a collective that outlived the process-group
# timeout and aborts the process (ProcessGroupNCCL.cpp: "To avoid data inconsistency, we are
# taking the entire process down"), so under NCCL a hung peer ends the job this way.
_SIGNAL_CAUSES = {
    signal.SIGABRT: (
        ": on GPUs, usually NCCL's watchdog ending a collective that outlived the process-group timeout "
        "(--timeout) because a peer hung or died; that rank's log above has the watchdog's line"
    ),
}
_TORCHRUN_OWN = ("-m", "--module", "--no-python", "--no_python", "--run-path", "--run_path")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.usage = "%(prog)s [TORCHRUN OPTIONS] COMMAND [ARGS ...]"
    parser.epilog = "TORCHRUN OPTIONS: any of torchrun's, except -m, --no-python and --run-path (torchrun --help)"
    parser.set_defaults(launch_help=parser.format_help)
    defaults = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        # Everything after `launch` is torchrun's or COMMAND's: argparse would refuse the
        # torchrun options it does not know, so they are kept raw and split in run().
        argv = list(sys.argv[1:] if args is None else args)
        if argv[:1] in (["-h"], ["--help"]):
            return defaults(["--help"], namespace)
        namespace, _ = defaults([], namespace)
        namespace.launch_argv = argv
        return namespace, []

    parser.parse_known_args = parse_known_args


def run(args: argparse.Namespace) -> int:
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import run as torchrun

    torchrun_args = _torchrun_args(args)
    if torchrun_args is None:
        print(args.launch_help(), end="")
        return 0
    verbose = getattr(args, "verbose", False)  # -v: torchrun's log and every rank's own line too
    quiet = None if verbose else _QuietTorchrun()
    handlers = _install(quiet)
    if not verbose:
        os.environ[LAUNCHED_ENV] = "1"
    try:
        torchrun(torchrun_args)
    except ChildFailedError as failed:
        line, exit_code = root_cause(failed.failures)
        sys.stdout.flush()
        print(line, file=sys.stderr)
        return exit_code
    except SignalException as stop:
        # Ctrl-C or SIGTERM to the launcher: the workers got it too and said what they did
        return 128 + int(stop.sigval)
    except (AssertionError, ValueError) as error:  # torchrun's checks of its options
        raise ConfigError(f"torchrun: {error}") from None
    except RendezvousError as error:
        raise LaunchError(f"torchrun's rendezvous failed: {type(error).__name__}: {error}") from None
    finally:
        os.environ.pop(LAUNCHED_ENV, None)
        for handler in handlers:
            handler.removeFilter(quiet)
    return 0


class LaunchError(Alexnet2gpuError):
    """torchrun could not start the workers (rendezvous)."""


def _torchrun_args(args: argparse.Namespace) -> argparse.Namespace | None:
    """torchrun's parsed options for ``python -m alexnet2gpu COMMAND ARGS``; None for --help."""
    from torch.distributed.run import get_args_parser

    from .main import COMMANDS

    commands = ", ".join(name for name in COMMANDS if name != "launch")
    parser = get_args_parser()
    options, rest = split_argv(args.launch_argv, parser._option_string_actions)
    if options is None:
        return None
    if not rest:
        raise ConfigError(f"no COMMAND after the torchrun options: give one of {commands}")
    if rest[0] not in COMMANDS or rest[0] == "launch":
        raise ConfigError(f"{rest[0]!r} is neither a torchrun option nor a command to launch: give one of {commands}")

    def refuse(message: str):
        raise ConfigError(f"torchrun: {message}")

    parser.error = refuse
    return parser.parse_args([*options, "-m", "alexnet2gpu", *rest])


def split_argv(argv: list[str], actions: dict) -> tuple[list[str] | None, list[str]]:
    """(torchrun's options, COMMAND and its arguments); (None, []) when help is asked for.
    ``actions`` maps torchrun's option strings to their argparse actions."""
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            return argv[:i], argv[i + 1 :]
        if not token.startswith("-"):
            return argv[:i], argv[i:]
        if token in ("-h", "--help"):
            return None, []
        name = token.split("=", 1)[0]
        matches = [option for option in actions if option == name] or [o for o in actions if o.startswith(name)]
        if len({actions[o].dest for o in matches}) != 1:
            raise ConfigError(f"{token} is not a torchrun option (see torchrun --help)")
        if matches[0] in _TORCHRUN_OWN:
            raise ConfigError(f"{token}: launch always runs `python -m alexnet2gpu COMMAND`; leave {name} out")
        i += 1 if "=" in token or actions[matches[0]].nargs == 0 else 2
    return argv, []


@dataclass(frozen=True)
class _Failure:
    rank: int
    line: str
    exit_code: int
    order: tuple  # lower first: (class, time)


def root_cause(failures: dict) -> tuple[str, int]:
    """The line to print and the exit status, from torchrun's failures (global rank ->
    ProcessFailure). First: a rank's own error (from its error file) or a death by a signal
    that the launcher did not send, the earliest; then a rank that exited non-zero without
    a message; last, the ranks the launcher stopped after the first failure."""
    described = [_describe(rank, failure) for rank, failure in failures.items()]
    first = min(described, key=lambda failure: (*failure.order, failure.rank))
    return first.line, first.exit_code


def _describe(rank: int, failure) -> _Failure:
    who = f"rank {rank} (local rank {failure.local_rank})"
    data = failure.error_file_data if isinstance(failure.error_file_data, dict) else {}
    ours = data.get(_KEY)
    if isinstance(ours, dict) and "line" in ours:
        order = (2 if ours.get("stopped") else 0, float(ours.get("time", failure.timestamp)))
        return _Failure(rank, ours["line"], int(ours.get("exit_code", failure.exitcode)), order)
    if failure.exitcode < 0:
        number = -failure.exitcode
        # torchrun stamps a death by a signal in whole seconds when it sees it; the death
        # came before that second, so it sorts before the errors other ranks wrote in it
        order = (2 if number in _LAUNCHER_SIGNALS else 0, failure.timestamp - 1)
        why = _SIGNAL_CAUSES.get(number, "")
        return _Failure(rank, f"alexnet2gpu launch: {who} ended by {_signal_name(number)}{why}", 128 + number, order)
    if failure.error_file != "<N/A>":  # an error file in torchelastic's layout (@record)
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
        text = str(message).strip().splitlines()[0] if str(message).strip() else "no message"
        return _Failure(rank, f"alexnet2gpu launch: {who} failed: {text}", failure.exitcode, (0, failure.timestamp))
    line = f"alexnet2gpu launch: {who} exited with status {failure.exitcode}, no message (see its output above)"
    return _Failure(rank, line, failure.exitcode or EXIT_FAILURE, (1, failure.timestamp))


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def record_root_cause(command: str, error: BaseException, exit_code: int) -> bool:
    """Under torchrun, writes ``alexnet2gpu COMMAND: error: ERROR`` to this worker's error
    file (``TORCHELASTIC_ERROR_FILE``), where torchrun and ``alexnet2gpu launch`` read a
    failed worker's root cause. Returns True when ``alexnet2gpu launch`` will print that
    line, so the caller need not; False (print it) otherwise, or when nothing was written."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    line = f"alexnet2gpu {command}: error: {error}"
    now = time.time()
    data = {
        # torchelastic's own layout (ErrorHandler.record_exception): torchrun's report shows
        # py_callstack as the traceback, here the one line
        "message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(now))}},
        _KEY: {
            "line": line,
            "exit_code": exit_code,
            "time": now,
            # SIGTERM from torchrun after another rank failed: not the root cause
            "stopped": type(error).__name__ == "Terminated",
        },
    }
    try:
        with open(path, "w") as file:
            json.dump(data, file)
    except OSError:
        return False
    return os.environ.get(LAUNCHED_ENV) == "1"


class _QuietTorchrun(logging.Filter):
    """torchrun's own log records, warnings and the "failed (exitcode ...)" line, which
    the one final line replaces; other errors still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("torch.distributed"):
            return True
        return record.levelno >= logging.ERROR and not record.getMessage().startswith("failed (exitcode")


def _install(quiet: logging.Filter | None) -> list[logging.Handler]:
    """Adds the filter to every handler that torchrun's log records reach: torch's own on
    the ``torch`` loggers (which stop them there), else the root logger's."""
    if quiet is None:
        return []
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    handlers: list[logging.Handler] = []
    for name in ("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run"):
        logger: logging.Logger | None = logging.getLogger(name)
        while logger is not None:
            handlers += [handler for handler in logger.handlers if handler not in handlers]
            logger = logger.parent if logger.propagate else None
    for handler in handlers:
        handler.addFilter(quiet)
    return handlers
