"""Runs a command under `torchrun --standalone` from a test: one thread per process, a
hard timeout, and the whole process group killed if it is exceeded (no orphans)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def torchrun_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    return env


def run_torchrun(
    nproc: int, args: list[str], *, timeout: float = 120, torchrun_args=(), env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node N *args``."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *torchrun_args,
        *args,
    ]
    return run_killing_group(cmd, timeout=timeout, env=env or torchrun_env())


def run_killing_group(
    cmd: list[str], *, timeout: float, env: dict[str, str], merge_stderr: bool = False, cwd=ROOT
) -> subprocess.CompletedProcess:
    """Runs ``cmd`` in a session of its own; kills the whole group past ``timeout``.
    ``merge_stderr``: stderr goes into stdout, in order (``result.stderr`` is then None)."""
    stderr = subprocess.STDOUT if merge_stderr else subprocess.PIPE
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-3000:]}\n{(err or '')[-3000:]}"
        ) from None
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    result.orphans = _group_alive(proc.pid)  # processes of this run still alive after it ended
    if result.orphans:
        os.killpg(proc.pid, signal.SIGKILL)  # nothing of this run may outlive the test
    return result


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies that are only waiting to be reaped by init count as gone.
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
