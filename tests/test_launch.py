"""The one launcher's workers never outlive the process that launched them
(:mod:`alexnet2gpu.parallel.processes`): real processes running tiny functions from
tests/launch_targets.py. The launching process is a separate Python process here, so that
it can be sent SIGTERM, Ctrl-C's SIGINT or SIGKILL; seconds later its workers must be gone.
The workers sit out SIGINT, as one stuck inside a C++ call would: only the agent's SIGKILL
or the parent-death signal (SIGTERM) can end them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alexnet2gpu.parallel import processes
from alexnet2gpu.parallel.processes import WorkersFailed, launch

from .launch_targets import hang_on_rank_1, sleep_deaf_to_alarms

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and PR_SET_PDEATHSIG"),
]

ROOT = Path(__file__).resolve().parents[1]

# The launching process: two workers that write their pids to argv[1] and sleep.
LAUNCHER = r"""
import sys
from alexnet2gpu.parallel.processes import launch
from tests.launch_targets import write_pid_and_sleep
try:
    launch(write_pid_and_sleep, sys.argv[1], processes=2, timeout_s=120)
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
    sys.exit(130)
"""


def _alive(pid: int) -> bool:
    """Running (a zombie, waiting for a parent that may never reap it, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _gone_within(pid: int, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def leftovers():
    """Pids to SIGKILL after the test, should it fail with them still running."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _start_launcher(tmp_path: Path, leftovers: list[int]) -> tuple[subprocess.Popen, list[int]]:
    """The launching process, once both its workers run: (it, the workers' pids)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    leftovers.append(launcher.pid)
    paths, end = [tmp_path / f"{rank}.pid" for rank in range(2)], time.monotonic() + 90
    while not all(p.exists() for p in paths):
        assert launcher.poll() is None, f"the launcher ended early ({launcher.returncode})"
        assert time.monotonic() < end, "the workers never started"
        time.sleep(0.1)
    workers = [int(p.read_text()) for p in paths]
    leftovers.extend(workers)
    assert all(_alive(pid) for pid in workers)
    return launcher, workers


def test_sigterm_to_the_launcher_ends_its_workers_then_the_launcher_as_sigterm_would(tmp_path, leftovers):
    """The agent's handler stops the workers (SIGTERM); then the default handler ends the launcher."""
    launcher, workers = _start_launcher(tmp_path, leftovers)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=20) == -signal.SIGTERM
    assert all(_gone_within(pid, 5) for pid in workers), "a worker outlived a launcher ended by SIGTERM"


def test_ctrl_c_to_the_launcher_ends_its_workers_then_raises_keyboard_interrupt(tmp_path, leftovers):
    """The agent sends SIGINT, which these workers sit out, then SIGKILL after its grace."""
    launcher, workers = _start_launcher(tmp_path, leftovers)
    launcher.send_signal(signal.SIGINT)
    assert launcher.wait(timeout=30) == 130 and "KeyboardInterrupt" in launcher.stdout.read()
    assert all(_gone_within(pid, 5) for pid in workers), "a worker outlived a launcher stopped by Ctrl-C"


def test_sigkill_of_the_launcher_still_ends_its_workers(tmp_path, leftovers):
    """Nothing in the launcher runs: each worker's parent-death signal (SIGTERM) ends it."""
    launcher, workers = _start_launcher(tmp_path, leftovers)
    launcher.kill()
    launcher.wait(timeout=20)
    assert all(_gone_within(pid, 5) for pid in workers), "a worker outlived a SIGKILLed launcher (no PDEATHSIG?)"


def test_a_worker_past_its_time_limit_is_one_error_naming_it_and_the_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM)}
    started = time.monotonic()
    with pytest.raises(WorkersFailed) as caught:
        launch(hang_on_rank_1, processes=2, timeout_s=4)
    assert time.monotonic() - started < 60
    assert caught.value.rank == 1, str(caught.value)
    assert "TimeoutError: rank 1 ran past its 4 s limit" in caught.value.exception
    assert str(caught.value).startswith("worker rank 1 failed: TimeoutError")
    assert {s: signal.getsignal(s) for s in before} == before, "the agent's signal handlers were left installed"


def test_the_launchers_own_limit_ends_a_worker_its_alarm_cannot_reach(monkeypatch):
    """Workers whose alarms never fire (stuck in C++; here: SIGALRM ignored) are stopped
    from outside once ``timeout_s + rdzv_timeout_s + _GRACE_S`` have passed."""
    monkeypatch.setattr(processes, "_GRACE_S", 1)
    started = time.monotonic()
    with pytest.raises(WorkersFailed, match="ran past the launcher's 8 s limit: they were stopped") as caught:
        launch(sleep_deaf_to_alarms, processes=2, timeout_s=2, rdzv_timeout_s=5)
    assert caught.value.rank is None and time.monotonic() - started < 30
