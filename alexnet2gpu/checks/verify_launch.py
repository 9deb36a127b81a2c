"""``verify``'s process rows: it launches the processes itself. For each process count, one
job of that many CPU processes (gloo, one thread each) runs every check of
:func:`~.verify_processes.check_processes` in a row, and rank 0's records come back as data,
through the project's one launcher (:mod:`alexnet2gpu.parallel.processes`: PyTorch's
``elastic_launch``, an ``@record`` entrypoint, timeouts, one error naming the rank that
caused a failure).

Which checks (:func:`process_checks`): ``ranks`` for ``dual``, ``replicas`` for every net,
``hybrid`` for the single-stream nets, on 2 processes, and on 4 (``ranks`` as 2 replicas x
2 towers) where asked.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.names import MODEL_NAMES
from ..parallel.names import PROCESS_PLACEMENTS
from .verify_processes import ProcessCheck, run_checks

__all__ = ["ProcessFailure", "checks_job", "launch_checks", "process_checks"]

DEFAULT_TIMEOUT_S = 300.0  # per job: the 4-process checks take about a minute on 2 loaded CPU cores


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


def checks_job(checks: list, options: dict, threads: int) -> list[dict]:
    """What each launched process runs: :func:`~.verify_processes.run_checks` on ``checks``
    with ``options``; the records as dicts."""
    return run_checks(checks, (), threads=threads, **options)["checks"]


def launch_checks(
    processes: int,
    checks: list[tuple[str, str, int]],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    threads: int = 1,
    **options,
) -> tuple[list[ProcessCheck], ProcessFailure | None]:
    """Runs ``checks`` ((placement, net, global batch) each) in one job of ``processes``
    CPU processes through the one launcher (:func:`alexnet2gpu.parallel.processes.launch`);
    ``options`` go to :func:`~.verify_processes.check_processes` (``width``, ``seed``,
    ``precision``, ``perturb_rank``). Returns rank 0's records, or no records and the failure."""
    from ..parallel.processes import WorkersFailed, launch

    job = ([list(c) for c in checks], options, threads)
    try:
        found = launch(checks_job, *job, processes=processes, threads=threads, timeout_s=timeout_s)
    except WorkersFailed as error:
        text = (error.exception or str(error)).strip().splitlines() or ["(no message)"]
        return [], ProcessFailure(processes, error.rank, text[0])
    except Exception as error:  # the rendezvous or the agent itself
        return [], ProcessFailure(processes, None, f"{type(error).__name__}: {error}".splitlines()[0])
    return [ProcessCheck.from_json(r) for r in found], None
