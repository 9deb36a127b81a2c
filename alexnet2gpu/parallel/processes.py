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
last lines of its traceback. A rank whose collective failed because its peer died
(:func:`~alexnet2gpu.parallel.distributed.is_collective_error`) waits ``_PEER_GRACE_S``
before failing itself, as :class:`PeerStopped`, so that the agent sees the peer's own
exception first: the root cause, not its echo.

**Nothing waits forever.** ``timeout_s`` bounds each worker: an alarm in the worker raises
``TimeoutError`` there (recorded as its root cause) once the time is up, and the collective
timeout of the process group is the same, so a rank that waits for a dead or hung peer fails
too; the rendezvous gives up after ``rdzv_timeout_s``. What elastic_launch cannot bound is
a worker stuck inside one C++ call that never returns to Python (the alarm runs between
Python bytecodes): for that the collective timeout is the guard.

**The caller's main module.** Spawn starts fresh interpreters that import the caller's
``__main__`` again (as ``__mp_main__``): a script must keep its work under ``if __name__ ==
"__main__":`` (``python -m alexnet2gpu`` is safe: spawn skips a package's ``__main__``).
elastic_launch must be called from the main thread (its agent installs signal handlers).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from torch.distributed.elastic.multiprocessing.errors import record

from ..errors import Alexnet2gpuError

__all__ = ["WorkersFailed", "launch", "rank_entrypoint"]

_TRACEBACK_LINES = 12  # of the root cause's traceback, in the error
_PEER_GRACE_S = 3.0  # a rank whose collective failed waits this long before it fails too


class PeerStopped(RuntimeError):
    """Raised in a worker whose collective failed because a peer stopped: not a root cause."""


class WorkersFailed(Alexnet2gpuError):
    """A launched worker failed: ``rank`` and ``exception`` name the root cause."""

    def __init__(self, message: str, *, rank: int | None, exception: str) -> None:
        super().__init__(message)
        self.rank, self.exception = rank, exception


def _on_alarm(timeout_s: float):
    def handler(_signum, _frame):
        raise TimeoutError(f"rank {os.environ.get('RANK', '?')} ran past its {timeout_s:g} s limit")

    return handler


def _run_rank(function: Callable, args: tuple, kwargs: dict, threads: int, timeout_s: float, device: str):
    """What each worker runs (see :func:`rank_entrypoint`)."""
    import torch

    from .distributed import close_distributed, init_distributed, is_collective_error

    torch.set_num_threads(threads)
    signal.signal(signal.SIGALRM, _on_alarm(timeout_s))
    signal.alarm(max(1, int(timeout_s)))
    try:
        devices = None if device == "cuda" else [device]
        init_distributed(devices, timeout_s, placement="replicas", two_tower=False)
        try:
            result = function(*args, **kwargs)
        except BaseException as error:
            close_distributed()
            if is_collective_error(error):
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
def rank_entrypoint(function: Callable, args: tuple, kwargs: dict, threads: int, timeout_s: float, device: str):
    """A worker of :func:`launch`: ``threads`` CPU threads, the process group joined on
    ``device`` (``cpu``, or ``cuda`` for ``cuda:LOCAL_RANK``), ``function(*args, **kwargs)``
    run within ``timeout_s`` and its result returned; any exception is recorded (``@record``)
    for the agent."""
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
    that caused a failure."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
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
    )
    try:
        results = elastic_launch(config, rank_entrypoint)(function, args, kwargs, threads, timeout_s, device)
    except ChildFailedError as error:
        raise root_cause(error) from None
    return results[0]
