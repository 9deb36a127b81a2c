"""Ctrl-C and SIGTERM during a run: finish the step, agree on it across ranks, write a
checkpoint at it (in the run's checkpoint folder, or for a run without one in its
interrupt folder), then stop with 130 (SIGINT) or 143 (SIGTERM).

A handler only records the signal; the loop reads it at the end of each step, and under
torchrun the flags are summed over the ranks every step (on the CPU, a host-only
collective), so every rank stops after the same step and the checkpoint holds one
consistent state. A second signal while the first is
being handled stops at once (``KeyboardInterrupt``).
"""

from __future__ import annotations

import signal
import threading

from ..errors import Alexnet2gpuError

__all__ = ["Interrupted", "StopSignals"]

EXIT_SIGINT = 128 + signal.SIGINT  # 130, as shells report a process ended by SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143


class Interrupted(Alexnet2gpuError):
    """A run stopped by a signal after writing a checkpoint at ``step``."""

    def __init__(self, signum: int, step: int, checkpoint: str | None, curve: list[dict] | None = None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.curve = list(curve or [])  # the evaluations so far, for the curves the caller draws
        self.exit_code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; checkpoint {checkpoint}")


class StopSignals:
    """Within ``with StopSignals() as stop:``, SIGINT and SIGTERM set ``stop.signum``
    instead of ending the process (main thread only; elsewhere it records nothing)."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _record(self, signum, frame) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
