"""One launcher for the measurements that need several processes: PyTorch's programmatic
``torch.distributed.launcher.api.elastic_launch`` (what ``torchrun`` runs inside), with
rank 0's return value handed back as data.

:func:`launch` starts ``processes`` workers on this machine (``start_method="spawn"``,
rendezvous ``c10d`` on ``localhost:0``: the agent's store takes a free port, as ``torchrun
--standalone`` does), no restarts. Each worker runs :func:`rank_entrypoint`, a module-level
function (spawn pickles it by name) decorated with
``torch.distributed.elastic.multiprocessing.errors.record``, which writes the exception
and its traceback to the file the agent reads. It joins the process group (gloo on the CPU,
gloo + NCCL on CUDA: :func:`~alexnet2gpu.parallel.init_distributed`), runs the function it
was given, leaves the group, and returns the function's result, which the agent collects
per rank.

**Failures come back as one error.** When a worker fails, the agent stops the others and
raises ``ChildFailedError`` with the *first* failure it observed (one rank, with the
exception ``@record`` wrote); :class:`WorkersFailed` carries that rank, its exception and the
last lines of its traceback. A rank whose collective failed because its peer died or hung
(:func:`~alexnet2gpu.parallel.distributed.is_collective_error`, also under its own time-out)
waits ``_PEER_GRACE_S`` before failing itself, as :class:`PeerStopped`, so that the agent
sees the peer's own exception first: the root cause, not its echo.

**Nothing waits forever.** ``timeout_s`` bounds each worker: an alarm in the worker raises
``TimeoutError`` there (recorded as its root cause) once the time is up, and the collective
timeout of the process group is the same, so a rank that waits for a dead or hung peer fails
too; the rendezvous gives up after ``rdzv_timeout_s``. A worker stuck inside one C++ call
that never returns to Python (the alarm runs between Python bytecodes) is stopped from
outside: the launching process has an alarm of its own, ``timeout_s + rdzv_timeout_s +
_GRACE_S``, after which the agent stops the workers as on SIGTERM and :func:`launch` raises
:class:`WorkersFailed`.

**The workers never outlive the launching process** (a worker left behind keeps the GPUs
busy for whatever runs next; the GPU script runs each step under ``timeout --kill-after=10
LIMIT``: SIGTERM, then SIGKILL ten seconds later). The agent runs in the launching process,
so:

* SIGTERM, SIGINT (Ctrl-C), SIGHUP, SIGQUIT: while the job runs, the agent's handlers
  (``torch.distributed.elastic.multiprocessing.api``, installed from the main thread) raise
  ``SignalException``; the agent sends that signal to every worker, SIGKILL after
  ``_GRACE_S`` (``shutdown_timeout``, well inside ``timeout``'s ten seconds; 30 s on a torch
  whose ``LaunchConfig`` lacks it). :func:`launch` then puts the previous handlers back
  (elastic does not) and sends the signal again, to them: the default ones end the process
  as that signal would (143 for SIGTERM), Python's SIGINT handler raises
  ``KeyboardInterrupt``; a handler that returns gets :class:`WorkersFailed`. A signal that
  was ignored (``nohup``) stays ignored where ``LaunchConfig`` takes ``signals_to_handle``
  (torch 2.14 does). A second signal during the agent's shutdown can cut it short; the
  parent-death signal below then still ends the workers once the launching process ends.
* A timeout: the alarm above.
* SIGKILL of the launching process, which nothing can catch: each worker sets its
  parent-death signal to SIGTERM as it starts (Linux ``prctl(PR_SET_PDEATHSIG)``; torch's
  spawn sets SIGINT, which Python code can catch or sit out in a C++ call), then exits at
  once if its parent is already not the launching process (it died before the signal was
  armed). The signal follows the *thread* that started the workers: the main thread, which
  waits in the agent to the end. Without ``prctl`` (macOS) there is no parent-death signal:
  a SIGKILLed launching process leaves its workers to finish alone (their collectives and
  alarms still bound them).

Spawned workers stay in the launching process's process group and session (torchrun
starts a script's workers each in a session of its own; these are not), so a terminal's
Ctrl-C and ``timeout``'s group-wide signals reach them directly as well.

**The caller's main module.** Spawn starts fresh interpreters that import the caller's
``__main__`` again (as ``__mp_main__``): a script must keep its work under ``if __name__ ==
"__main__":`` (``python -m alexnet2gpu`` is safe: spawn skips a package's ``__main__``).
:func:`launch` must be called from the main thread: elsewhere no signal handler can be
installed, and the workers would outlive a signalled launcher.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import record

from ..errors import Alexnet2gpuError

__all__ = ["WorkersFailed", "launch", "rank_entrypoint"]

_TRACEBACK_LINES = 12  # of the root cause's traceback, in the error
_PEER_GRACE_S = 3.0  # a rank whose collective failed waits this long before it fails too
_GRACE_S = 5  # the agent's wait between its stop signal and SIGKILL (inside `timeout --kill-after=10`)
_STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")  # those elastic's agent handles
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class PeerStopped(RuntimeError):
    """Raised in a worker whose collective failed because a peer stopped: not a root cause."""


class WorkersFailed(Alexnet2gpuError):
    """A launched worker failed: ``rank`` and ``exception`` name the root cause (``rank``
    None: the job as a whole was stopped, by a signal or the launcher's own time limit)."""

    def __init__(self, message: str, *, rank: int | None, exception: str) -> None:
        super().__init__(message)
        self.rank, self.exception = rank, exception


class _JobTimedOut(SignalException):
    """The launching process's own alarm: the agent stops the workers as on SIGTERM."""


def _die_with(parent: int) -> None:
    """SIGTERM to this worker when the launching process dies, even by SIGKILL (Linux
    ``prctl(PR_SET_PDEATHSIG)``); exits at once if it has died already."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(128 + signal.SIGTERM)


def _on_alarm(timeout_s: float):
    def handler(_signum, _frame):
        raise TimeoutError(f"rank {os.environ.get('RANK', '?')} ran past its {timeout_s:g} s limit")

    return handler


def _from_collective(error: BaseException | None) -> bool:
    """``error``, or what it interrupted (an alarm that went off while a collective waited),
    is a failed collective."""
    from .distributed import is_collective_error

    while error is not None:
        if is_collective_error(error):
            return True
        error = error.__context__
    return False


def _run_rank(function: Callable, args: tuple, kwargs: dict, threads: int, timeout_s: float, device: str):
    """What each worker runs (see :func:`rank_entrypoint`)."""

    from .devices import set_cpu_threads
    from .distributed import close_distributed, init_distributed

    set_cpu_threads(threads)
    signal.signal(signal.SIGALRM, _on_alarm(timeout_s))
    signal.alarm(max(1, int(timeout_s)))
    try:
        devices = None if device == "cuda" else [device]
        init_distributed(devices, timeout_s, placement="replicas", two_tower=False)
        try:
            result = function(*args, **kwargs)
        except BaseException as error:
            signal.alarm(0)  # the grace below must not end in this rank's own alarm
            close_distributed()
            if _from_collective(error):
                # The agent reports the first failure it sees: give the peer's own one time to be it.
                time.sleep(_PEER_GRACE_S)
                rank = os.environ.get("RANK", "?")
                raise PeerStopped(f"rank {rank}: a collective failed (a peer stopped?): {error}") from error
            raise
        close_distributed(barrier=True)
        return result
    finally:
        signal.alarm(0)


@record
def rank_entrypoint(
    function: Callable, args: tuple, kwargs: dict, threads: int, timeout_s: float, device: str, parent: int
):
    """A worker of :func:`launch`: first its parent-death signal (it ends with ``parent``,
    the launching process), then ``threads`` CPU threads, the process group joined on
    ``device`` (``cpu``, or ``cuda`` for ``cuda:LOCAL_RANK``), ``function(*args, **kwargs)``
    run within ``timeout_s`` and its result returned; any exception is recorded (``@record``)
    for the agent."""
    _die_with(parent)
    return _run_rank(function, args, kwargs, threads, timeout_s, device)


def _message(failure) -> tuple[str, str]:
    """(exception, traceback tail) from a ``ProcessFailure``."""
    message = failure.message
    if isinstance(message, dict):
        text = str(message.get("message", ""))
        stack = str(message.get("extraInfo", {}).get("py_callstack", ""))
        tail = "\n".join(stack.strip().splitlines()[-_TRACEBACK_LINES:])
        return text, tail
    return str(message), ""


def root_cause(error) -> WorkersFailed:
    """The one error for a ``ChildFailedError``: the failure that recorded an exception of
    its own (not :class:`PeerStopped`; earliest first), else the first observed."""
    failures = sorted(error.failures.items(), key=lambda item: item[1].timestamp)
    recorded = [(rank, f) for rank, f in failures if isinstance(f.message, dict)]
    recorded.sort(key=lambda item: _message(item[1])[0].startswith(PeerStopped.__name__))  # own errors first
    rank, failure = (recorded or failures)[0]
    exception, tail = _message(failure)
    if failure.exitcode < 0 and not recorded:
        exception = f"killed by signal {failure.signal_name()} (exit code {failure.exitcode})"
    others = ", ".join(str(r) for r in sorted(error.failures) if r != rank)
    stopped = f"; rank(s) {others} stopped with it" if others else ""
    message = f"worker rank {rank} failed: {exception}{stopped}"
    if tail:
        message += f"\n{tail}"
    return WorkersFailed(message, rank=rank, exception=exception)


def _launch_config(processes: int, rdzv_timeout_s: int, handled: list[str]):
    """elastic_launch's settings (module docstring); ``shutdown_timeout`` and
    ``signals_to_handle`` where this torch's ``LaunchConfig`` has them."""
    from torch.distributed.launcher.api import LaunchConfig

    optional = {"shutdown_timeout": _GRACE_S, "signals_to_handle": ",".join(handled)}
    fields = {f.name for f in dataclasses.fields(LaunchConfig)}
    return LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=f"alexnet2gpu-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        rdzv_configs={"join_timeout": rdzv_timeout_s},
        rdzv_timeout=rdzv_timeout_s,
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
        **{key: value for key, value in optional.items() if key in fields},
    )


@contextlib.contextmanager
def _signals_kept(limit_s: float):
    """Yields the stop signals the agent may handle (not those ignored, or handled outside
    Python); meanwhile an alarm raises :class:`_JobTimedOut` after ``limit_s``. Then the
    handlers from before come back (the agent leaves its own installed), with the signals
    blocked meanwhile, and an alarm of the caller's is re-armed. Off the main thread,
    nothing is touched."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    stops = [getattr(signal, name) for name in _STOP_SIGNALS if hasattr(signal, name)]
    previous = {signum: signal.getsignal(signum) for signum in [*stops, signal.SIGALRM]}

    def deadline(_signum, _frame):
        raise _JobTimedOut(f"the workers ran past the launcher's {limit_s:g} s limit", sigval=signal.SIGTERM)

    signal.signal(signal.SIGALRM, deadline)
    started = time.monotonic()
    caller_alarm, _interval = signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        yield [s.name for s in stops if previous[s] not in (signal.SIG_IGN, None)]
    finally:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, previous)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
            for signum, handler in previous.items():
                if handler is not None:
                    signal.signal(signum, handler)
            if caller_alarm:
                signal.setitimer(signal.ITIMER_REAL, max(caller_alarm - (time.monotonic() - started), 1e-3))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _stopped(stop: SignalException) -> WorkersFailed:
    """After the agent stopped the workers on ``stop``: the launcher's own time limit is an
    error; a signal goes again to the handler from before (the default one ends this
    process by it; SIGINT's raises ``KeyboardInterrupt``), and if that returns, an error."""
    if isinstance(stop, _JobTimedOut):
        return WorkersFailed(f"{stop}: they were stopped", rank=None, exception=f"TimeoutError: {stop}")
    signal.raise_signal(stop.sigval)
    name = signal.Signals(stop.sigval).name
    return WorkersFailed(f"the workers were stopped by {name}", rank=None, exception=f"stopped by {name}")


@contextlib.contextmanager
def _quiet_agent():
    """The agent logs each failed worker's traceback and every SIGTERM it sends: the
    failure comes back as one :class:`WorkersFailed` instead (``alexnet2gpu -v`` shows them)."""
    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [logger.level for logger in loggers]
    if not logging.getLogger("alexnet2gpu").isEnabledFor(logging.DEBUG):
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def launch(
    function: Callable,
    *args,
    processes: int = 2,
    threads: int = 1,
    timeout_s: float = 1800.0,
    rdzv_timeout_s: int = 120,
    device: str = "cpu",
    **kwargs,
):
    """Runs ``function(*args, **kwargs)`` in each of ``processes`` workers under one process
    group and returns rank 0's result. ``function`` must be importable by name (module
    level: spawn pickles it so). Raises :class:`WorkersFailed` naming the rank and exception
    that caused a failure; the workers end with this process (module docstring)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    entry_args = (function, args, kwargs, threads, timeout_s, device, os.getpid())
    try:
        with _quiet_agent(), _signals_kept(timeout_s + rdzv_timeout_s + _GRACE_S) as handled:
            results = elastic_launch(_launch_config(processes, rdzv_timeout_s, handled), rank_entrypoint)(*entry_args)
    except ChildFailedError as error:
        raise root_cause(error) from None
    except SignalException as stop:
        raise _stopped(stop) from None
    return results[0]
