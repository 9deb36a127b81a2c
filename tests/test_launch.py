"""The dual/ranks torchrun job never outlives ``compare``: real processes, with a small
stand-in for torchrun that, like torchrun, starts its worker in a session of its own and
stops it on SIGTERM (torch.distributed.elastic's ``SignalException``). Whether ``compare``
gets SIGTERM, SIGKILL or runs out of time, the worker must be gone seconds later."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alexnet2gpu import Alexnet2gpuError
from alexnet2gpu.measure import launch

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and PR_SET_PDEATHSIG")

ROOT = Path(__file__).resolve().parents[1]

# torchrun's part: a worker in its own session (SIGTERM to it on SIGTERM), its pid written
# to argv[1]; then, with argv[2] == "term-parent", SIGTERM to whoever launched it. With
# "escaped", the worker is out of reach instead: a daemon, no longer below torchrun.
TORCHRUN = r"""
import os, signal, subprocess, sys, time
if sys.argv[2] == "escaped":
    subprocess.run(["sh", "-c", 'setsid sleep 60 & echo $! > "$0"', sys.argv[1]], check=True)
    time.sleep(60)
worker = subprocess.Popen(["sleep", "60"], start_new_session=True)
def stop(signum, frame):
    os.killpg(worker.pid, signal.SIGTERM)
    worker.wait()
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, signal.SIG_IGN if sys.argv[2] == "stubborn" else stop)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(worker.pid))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
if sys.argv[2] == "term-parent":
    os.kill(os.getppid(), signal.SIGTERM)
time.sleep(60)
"""

# compare's part, without importing torch (the package's __init__ does): launch.py on
# stub packages, launching TORCHRUN of the given kind.
COMPARE = r"""
import os, sys, types
root, torchrun, pidfile, kind = sys.argv[1:5]
for name in ("alexnet2gpu", "alexnet2gpu.measure"):
    package = types.ModuleType(name)
    package.__path__ = [os.path.join(root, *name.split("."))]
    sys.modules[name] = package
from alexnet2gpu.measure import launch
launch._GRACE_S = 0.5
print(launch._launch([sys.executable, "-c", torchrun, pidfile, kind], dict(os.environ), 60.0))
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


def _wait_for(path: Path, seconds: float = 20.0) -> int:
    end = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < end, f"the stand-in for torchrun never wrote {path}"
        time.sleep(0.05)
    return int(path.read_text())


@pytest.fixture
def leftovers():
    """Pids to SIGKILL after the test, should it fail with them still running."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _start_compare(tmp_path: Path, leftovers: list[int], kind: str) -> tuple[subprocess.Popen, int]:
    pidfile = tmp_path / "worker.pid"
    compare = subprocess.Popen([sys.executable, "-c", COMPARE, str(ROOT), TORCHRUN, str(pidfile), kind])
    leftovers.append(compare.pid)
    worker = _wait_for(pidfile)
    leftovers.append(worker)
    return compare, worker


def test_sigterm_to_compare_ends_the_job_then_compare_as_sigterm_would(tmp_path, leftovers):
    """compare's own handler ends the job: here torchrun ignores SIGTERM, so neither it nor
    its parent-death signal would stop the worker."""
    compare, worker = _start_compare(tmp_path, leftovers, "stubborn")
    compare.send_signal(signal.SIGTERM)
    assert compare.wait(timeout=15) == -signal.SIGTERM
    assert _gone_within(worker, 5), "the worker outlived a compare ended by SIGTERM"


def test_sigkill_of_compare_still_ends_the_job(tmp_path, leftovers):
    """torchrun's parent-death signal, SIGTERM, makes it stop its worker."""
    compare, worker = _start_compare(tmp_path, leftovers, "plain")
    compare.kill()
    compare.wait(timeout=15)
    assert _gone_within(worker, 5), "the worker outlived a compare ended by SIGKILL (no parent-death signal?)"


def test_a_timeout_ends_a_worker_in_its_own_session_even_if_torchrun_ignores_sigterm(tmp_path, leftovers, monkeypatch):
    monkeypatch.setattr(launch, "_GRACE_S", 0.5)
    before = signal.getsignal(signal.SIGTERM)
    pidfile = tmp_path / "worker.pid"
    argv = [sys.executable, "-c", TORCHRUN, str(pidfile), "stubborn"]
    started = time.monotonic()
    returncode, why = launch._launch(argv, dict(os.environ), timeout_s=3.0)
    assert time.monotonic() - started < 20, "the job's end waited for its worker"
    worker = _wait_for(pidfile, 0)
    leftovers.append(worker)
    assert returncode is None and "did not finish in 3 s" in why
    assert _gone_within(worker, 5), "the worker outlived its torchrun, killed on a timeout"
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid(1)")
def test_a_process_out_of_reach_holding_the_output_open_does_not_hang_compare(tmp_path, leftovers, monkeypatch):
    monkeypatch.setattr(launch, "_GRACE_S", 0.5)
    pidfile = tmp_path / "escaped.pid"
    started = time.monotonic()
    argv = [sys.executable, "-c", TORCHRUN, str(pidfile), "escaped"]
    returncode, _why = launch._launch(argv, dict(os.environ), timeout_s=3.0)
    leftovers.append(_wait_for(pidfile, 0))
    assert returncode is None and time.monotonic() - started < 20


class _Previous(Exception):
    pass


def test_a_stop_signal_ends_the_job_then_goes_to_the_previous_handler(tmp_path, leftovers):
    def previous(signum, frame):
        raise _Previous(signum)

    original = signal.signal(signal.SIGTERM, previous)
    try:
        pidfile = tmp_path / "worker.pid"
        argv = [sys.executable, "-c", TORCHRUN, str(pidfile), "term-parent"]
        started = time.monotonic()
        with pytest.raises(_Previous):
            launch._launch(argv, dict(os.environ), timeout_s=30.0)
        assert time.monotonic() - started < 20, "the job's end waited for its worker"
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, original)
    worker = _wait_for(pidfile, 0)
    leftovers.append(worker)
    assert _gone_within(worker, 5), "the worker outlived a compare stopped by SIGTERM"


def test_a_stop_signal_whose_handler_returns_is_one_clear_error(tmp_path, leftovers):
    seen = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        pidfile = tmp_path / "worker.pid"
        argv = [sys.executable, "-c", TORCHRUN, str(pidfile), "term-parent"]
        with pytest.raises(Alexnet2gpuError, match="torchrun job was stopped by SIGTERM"):
            launch._launch(argv, dict(os.environ), timeout_s=30.0)
    finally:
        signal.signal(signal.SIGTERM, original)
    leftovers.append(_wait_for(pidfile, 0))
    assert seen == [signal.SIGTERM]
