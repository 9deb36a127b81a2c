"""Tiny functions for tests/test_launch.py to run through
:func:`alexnet2gpu.parallel.processes.launch` (module level: spawn pickles them by name)."""

from __future__ import annotations

import os
import signal
import time

import torch.distributed as dist


def write_pid_and_sleep(folder: str, seconds: float = 60.0) -> int:
    """Writes this worker's pid to ``FOLDER/RANK.pid`` and sleeps, sitting out SIGINT as a
    worker inside one C++ call would: only SIGTERM (or SIGKILL) ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    path = os.path.join(folder, f"{dist.get_rank()}.pid")
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(seconds)
    return os.getpid()


def hang_on_rank_1(seconds: float = 60.0) -> str:
    """Rank 1 sleeps past any short limit; rank 0 waits for it at a barrier."""
    if dist.get_rank() == 1:
        time.sleep(seconds)
    dist.barrier()
    return "done"


def sleep_deaf_to_alarms(seconds: float = 60.0) -> None:
    """Sleeps with SIGALRM ignored, as a worker stuck inside one C++ call would: its own
    time limit never fires."""
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    time.sleep(seconds)


def pid_of_rank() -> int:
    """Each worker's pid (rank 0's comes back)."""
    return os.getpid()
