"""``verify``'s process rows: it launches the processes itself. For each process count, one
job of that many CPU processes (gloo, one thread each) runs every check of
:func:`~.verify_processes.check_processes` in a row, and rank 0's records come back as data.

The job is PyTorch's programmatic launcher, ``torch.distributed.launcher.api.elastic_launch``
(what ``torchrun`` runs inside): ``start_method="spawn"``, rendezvous ``c10d`` on
``localhost:0`` (the agent's store takes a free port, as ``torchrun --standalone`` does), no
restarts. Each process runs :func:`verify_entrypoint`, a module-level function (spawn
pickles it by name) under ``torch.distributed.elastic``'s ``@record``, which writes the
exception of a failing process to the file the agent reads: a failure comes back as one
:class:`ProcessFailure`, the rank and its error, not a traceback.

**Nothing waits forever.** ``timeout_s`` bounds each process (an alarm raises
``TimeoutError`` there) and is the process group's collective timeout, so a rank that waits
for a dead or hung peer fails too; the rendezvous gives up after ``timeout_s`` as well. A
rank whose collective failed because its peer stopped waits ``_PEER_GRACE_S`` before it fails,
so that the peer's own error, the root cause, is the one reported.

Which checks (:func:`process_checks`): ``ranks`` for ``dual``, ``replicas`` for every net,
``hybrid`` for the single-stream nets, on 2 processes, and on 4 (``ranks`` as 2 replicas x
2 towers) where asked.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import time
from dataclasses import dataclass

from torch.distributed.elastic.multiprocessing.errors import record

from ..models.names import MODEL_NAMES
from ..parallel.names import PROCESS_PLACEMENTS
from .verify_processes import ProcessCheck, run_checks

__all__ = ["ProcessFailure", "launch_checks", "process_checks", "verify_entrypoint"]

DEFAULT_TIMEOUT_S = 300.0  # per job: the 4-process checks take about a minute on 2 loaded CPU cores
_PEER_GRACE_S = 2.0


@dataclass
class ProcessFailure:
    """A job that did not return its records: ``rank`` (None: no rank recorded an error,
    e.g. the rendezvous failed) and its error in one line."""

    processes: int
    rank: int | None
    error: str

    def line(self) -> str:
        who = f"rank {self.rank}" if self.rank is not None else "the launch"
        return f"{self.processes} processes: {who} failed: {self.error}"

    def to_json(self) -> dict:
        return {"processes": self.processes, "rank": self.rank, "error": self.error, "line": self.line()}


def process_checks(processes: int, models=MODEL_NAMES) -> list[tuple[str, str]]:
    """(placement, net) for every process placement that runs ``models`` on ``processes``
    processes: ``ranks`` for ``dual`` (an even count), ``replicas`` for every net, ``hybrid``
    for the single-stream nets."""
    rows = []
    for placement in PROCESS_PLACEMENTS:
        for model in models:
            two_tower = model == "dual"
            if placement == "ranks" and (not two_tower or processes % 2):
                continue
            if placement == "hybrid" and two_tower:
                continue
            rows.append((placement, model))
    return rows


def _on_alarm(timeout_s: float):
    def handler(_signum, _frame):
        raise TimeoutError(f"ran past the {timeout_s:g} s limit")

    return handler


@record
def verify_entrypoint(checks: list, options: dict, threads: int, timeout_s: float) -> list[dict]:
    """One process of :func:`launch_checks`: ``threads`` CPU threads, the gloo group joined
    with ``timeout_s`` as its collective timeout, :func:`~.verify_processes.run_checks` on
    ``checks`` with ``options``, all within ``timeout_s``; returns the records as dicts."""
    import torch
    import torch.distributed as dist

    from ..parallel.distributed import close_distributed, is_collective_error

    torch.set_num_threads(threads)
    signal.signal(signal.SIGALRM, _on_alarm(timeout_s))
    signal.alarm(max(1, int(timeout_s)))
    try:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
        try:
            return run_checks(checks, (), threads=threads, **options)["checks"]  # leaves the group
        except BaseException as error:
            close_distributed()
            if is_collective_error(error):
                time.sleep(_PEER_GRACE_S)  # the agent reports the first failure: let the peer's own be it
                raise RuntimeError(f"a collective failed (a peer stopped?): {error}") from error
            raise
    finally:
        signal.alarm(0)


def _error_line(failure) -> tuple[str, bool]:
    """(the error in one line, whether the process recorded it itself) from a ``ProcessFailure``."""
    message = failure.message
    if isinstance(message, dict):
        text = str(message.get("message", "")).strip()
        return (text.splitlines() or ["(no message)"])[0], True
    if failure.exitcode < 0:
        return f"killed by signal {failure.signal_name()} (exit code {failure.exitcode})", False
    return f"exit code {failure.exitcode}: {str(message).strip() or 'no error recorded'}", False


def _failure(processes: int, error) -> ProcessFailure:
    """The root cause of a ``ChildFailedError``: a rank's own recorded error first (not a
    collective that failed because of it), else the first failure observed."""
    failures = sorted(error.failures.items(), key=lambda item: item[1].timestamp)
    lines = [(rank, *_error_line(f)) for rank, f in failures]
    lines.sort(key=lambda item: (not item[2], "a collective failed" in item[1]))
    rank, text, _ = lines[0]
    return ProcessFailure(processes, rank, text)


@contextlib.contextmanager
def _quiet_agent():
    """The agent logs each failed process's traceback and every SIGTERM it sends: the
    failure comes back as one line instead."""
    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def launch_checks(
    processes: int,
    checks: list[tuple[str, str, int]],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    threads: int = 1,
    **options,
) -> tuple[list[ProcessCheck], ProcessFailure | None]:
    """Runs ``checks`` ((placement, net, global batch) each) in one job of ``processes``
    CPU processes; ``options`` go to :func:`~.verify_processes.check_processes` (``width``,
    ``seed``, ``precision``, ``perturb_rank``). Returns rank 0's records, or no records and
    the failure."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=f"alexnet2gpu-verify-{os.getpid()}-{processes}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        rdzv_configs={"join_timeout": int(timeout_s)},
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        with _quiet_agent():
            results = elastic_launch(config, verify_entrypoint)([list(c) for c in checks], options, threads, timeout_s)
    except ChildFailedError as error:
        return [], _failure(processes, error)
    except Exception as error:  # the rendezvous or the agent itself
        return [], ProcessFailure(processes, None, f"{type(error).__name__}: {error}".splitlines()[0])
    return [ProcessCheck.from_json(r) for r in results[0]], None
