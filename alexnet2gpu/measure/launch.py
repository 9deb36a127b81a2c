"""The torchrun job that ``compare`` starts for ``dual/ranks`` when it is not itself a
torchrun worker: ``python -m torch.distributed.run --standalone --nproc-per-node 2 -m
alexnet2gpu COMMAND ... --json OUT``, in a session of its own (so that a timeout or
Ctrl-C ends torchrun *and* its workers), with rank 0's JSON read back."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys

from ..errors import Alexnet2gpuError

__all__ = ["run_torchrun_job"]


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
    """(exit code or None on timeout, stderr). A session of its own, so that a timeout or
    Ctrl-C ends torchrun *and* its workers."""
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return None, f"did not finish in {timeout_s:.0f} s"
    except BaseException:
        _kill_group(proc)
        raise
    return proc.returncode, stderr or ""


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


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()
