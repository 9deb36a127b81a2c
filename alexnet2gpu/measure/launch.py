"""The torchrun job that ``compare`` starts for ``dual/ranks`` when it is not itself a
torchrun worker: ``python -m torch.distributed.run --standalone --nproc-per-node 2 -m
alexnet2gpu COMMAND ... --json OUT``, with rank 0's JSON read back.

The job must not outlive ``compare``, however ``compare`` ends; a job left behind keeps
the GPUs busy for whatever runs next (the GPU script runs each step under ``timeout
--kill-after=10 LIMIT``: SIGTERM, then SIGKILL ten seconds later). Two facts decide how:

* torchrun starts every worker in a session of its own (torch.distributed.elastic's
  ``SubprocessHandler``: ``start_new_session=True``), so no signal sent to a process group
  that holds torchrun ever reaches the workers; torchrun stops them itself when it gets
  SIGTERM, SIGINT, SIGHUP or SIGQUIT (``SignalException``: SIGTERM to each worker's
  session, SIGKILL after 30 s). Killing torchrun with SIGKILL orphans them.
* So torchrun runs in a session of its own too (a terminal's Ctrl-C reaches ``compare``
  alone, which then stops the job in order), and ``compare`` stops it in every case:

  - a timeout, an exception, Ctrl-C (KeyboardInterrupt), and SIGTERM or SIGHUP (a handler
    installed while the job runs, main thread only, the previous one restored after):
    :func:`_end_job` notes every process below torchrun (Linux: ``/proc``), sends SIGTERM
    to torchrun's group (torchrun stops its workers), waits ``_GRACE_S``, then SIGKILLs
    torchrun's group and every noted process still there, each with its own group. After
    a signal ``compare`` then ends as that signal would have ended it (143 for SIGTERM).
    A process that left torchrun's tree and group (a daemon) is out of reach: ``compare``
    stops waiting for the output it holds open after another ``_GRACE_S``;
  - SIGKILL of ``compare``, which nothing can catch: torchrun is started through a small
    shim that sets its parent-death signal to SIGTERM (Linux ``prctl(PR_SET_PDEATHSIG)``,
    kept across ``exec``; set in a fresh interpreter rather than in ``preexec_fn``,
    which is unsafe once torch has started threads), so the kernel sends torchrun SIGTERM
    when ``compare`` dies and torchrun stops its workers. The signal follows the *thread*
    that started the job, which waits for it to the end. Without ``prctl`` (macOS) there
    is no parent-death signal: a SIGKILLed ``compare`` leaves the job to finish alone.

Keeping torchrun in ``compare``'s process group instead (no session of its own) would let
``timeout``'s group-wide signals reach torchrun directly, yet still not its workers, and a
terminal's Ctrl-C would then reach torchrun behind ``compare``'s back; ``compare`` could
not signal torchrun's group without signalling itself either. The handler and the
parent-death signal reach torchrun in every case that would."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading

from ..errors import Alexnet2gpuError

__all__ = ["run_torchrun_job"]

_GRACE_S = 4.0  # torchrun's time to stop its workers after SIGTERM (well inside timeout's --kill-after=10)
_STOP_SIGNALS = ("SIGTERM", "SIGHUP")
# Runs as `python -c _SHIM PARENT_PID ARGV...`: the parent-death signal, then exec ARGV.
_SHIM = """\
import ctypes, os, signal, sys
parent = int(sys.argv[1])
if sys.platform.startswith("linux"):
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
if os.getppid() != parent:  # the parent died before the signal was armed
    sys.exit(128 + signal.SIGTERM)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def run_torchrun_job(
    command: list[str], out: str, notes: list[str], *, threads: int | None, timeout_s: float, nproc: int = 2
) -> dict:
    """Runs ``alexnet2gpu COMMAND ... --json OUT`` as an ``nproc``-process torchrun job and
    returns the JSON it wrote.

    Rank 0 writes the JSON atomically once its measurement is complete, so a JSON that
    exists is whole even if a worker then fails on its way out (as gloo's threads once made
    it do at interpreter exit: "terminate called without an active exception"); that is
    said in ``notes``. A job that wrote nothing is tried once more, then reported as one
    error."""
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "alexnet2gpu",
        *command,
        "--json",
        out,
    ]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    failures = []
    for _attempt in range(2):
        returncode, stderr = _launch(argv, env, timeout_s)
        if os.path.exists(out):
            if returncode != 0:
                notes.append(
                    f"`{command[0]}`: a worker exited abnormally ({_why(returncode, stderr)}) after "
                    "rank 0 had written its complete results"
                )
            with open(out) as f:
                return json.load(f)
        failures.append(_why(returncode, stderr))
        if returncode == 0 or "error:" in stderr and "alexnet2gpu" in stderr:
            break  # a usage error or a clean exit without results: trying again cannot help
    raise Alexnet2gpuError(
        f"the dual/ranks torchrun job failed: {'; then: '.join(failures)}; command: {shlex.join(argv)}"
    )


def _launch(argv: list[str], env: dict, timeout_s: float) -> tuple[int | None, str]:
    """(exit code or None on timeout, stderr) of ``argv``, started so that it cannot
    outlive this process: in a session of its own, with a parent-death signal, and ended
    by :func:`_end_job` on a timeout, an exception or a stop signal (module docstring)."""
    with _stop_signals_raise():
        proc = subprocess.Popen(
            [sys.executable, "-c", _SHIM, str(os.getpid()), *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            _stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _end_job(proc)
            return None, f"did not finish in {timeout_s:.0f} s"
        except BaseException:
            _end_job(proc)
            raise
    return proc.returncode, stderr or ""


class _Stopped(BaseException):
    """A stop signal (SIGTERM, SIGHUP) arrived while the job ran."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stop_signals_raise():
    """While the job runs, SIGTERM and SIGHUP raise :class:`_Stopped`, so that the job is
    ended like any interrupted one; then the previous handlers come back and get the signal
    again (the default one ends this process by it). Signals already ignored (``nohup``),
    or handled outside Python, are left alone; so is everything off the main thread."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for name in _STOP_SIGNALS:
            signum = getattr(signal, name, None)
            handler = signal.getsignal(signum) if signum is not None else None
            if handler is not None and handler != signal.SIG_IGN:
                previous[signum] = handler

    def stop(signum, _frame):
        for other in previous:  # once: a second signal must not cut the ending short
            signal.signal(other, signal.SIG_IGN)
        raise _Stopped(signum)

    try:
        for signum in previous:
            signal.signal(signum, stop)
        yield
    except _Stopped as stopped:
        _restore(previous)
        signal.raise_signal(stopped.signum)  # the previous handler's turn (default: end by it)
        name = signal.Signals(stopped.signum).name
        raise Alexnet2gpuError(f"the dual/ranks torchrun job was stopped by {name}") from None
    finally:
        _restore(previous)


def _restore(previous: dict) -> None:
    """The previous handlers back, with the signals blocked meanwhile: one that arrives as
    the job ends goes to the previous handler, not to a ``_Stopped`` nobody catches."""
    if not previous:
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, previous)
    try:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _end_job(proc: subprocess.Popen) -> None:
    """Ends the job: SIGTERM to torchrun's group (torchrun stops its workers, each in a
    session of its own), then, after at most ``_GRACE_S``, SIGKILL to that group and to
    every process that was below torchrun (each with its group: a worker's own children)."""
    below = _descendants(proc.pid)
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.communicate(timeout=_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc.pid, signal.SIGKILL)
    for pid, started, leads_group in below:
        if _stat(pid)[:1] == (started,):  # the same process, not a later one given its pid
            (_signal_group if leads_group else _signal)(pid, signal.SIGKILL)
    try:
        proc.communicate(timeout=_GRACE_S)
    except subprocess.TimeoutExpired:  # a process out of reach still holds torchrun's output open
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=_GRACE_S)
        for pipe in (proc.stdout, proc.stderr):
            pipe.close()


def _stat(pid: int | str) -> tuple[int, int, int] | tuple[()]:
    """(start time, parent, process group) from Linux's ``/proc/PID/stat``; () elsewhere or
    once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return ()
    return int(fields[19]), int(fields[1]), int(fields[2])  # starttime, ppid, pgrp


def _descendants(root: int) -> list[tuple[int, int, bool]]:
    """Every process below ``root`` as (pid, start time, leads its own group); [] without
    ``/proc``."""
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []
    children: dict[int, list[tuple[int, int, bool]]] = {}
    for pid in pids:
        stat = _stat(pid)
        if stat:
            started, parent, group = stat
            children.setdefault(parent, []).append((pid, started, group == pid))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _why(returncode: int | None, stderr: str) -> str:
    """The most telling line of a failed torchrun job: our own error line, else an
    exception, else the signal that ended a worker."""
    if returncode is None:
        return stderr
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for pick in (
        lambda s: s.startswith("alexnet2gpu ") and ": error:" in s,
        lambda s: "Error:" in s and "ChildFailedError" not in s,
        lambda s: s.startswith("traceback : Signal") or s.startswith("terminate called"),
    ):
        found = [line for line in lines if pick(line)]
        if found:
            return f"exit {returncode}: {found[-1]}"
    return f"exit {returncode}: {lines[-1] if lines else 'no output'}"
