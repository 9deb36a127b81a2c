"""The numbers a run keeps: the metrics JSONL (rank 0) and the running means of the
training loss and accuracy that the end summary reports.

The JSONL holds one object per line: ``{"event": "step", ...}`` per optimizer step,
``{"event": "eval", "step", "epoch", "test_accuracy", "test_images"}`` per evaluation,
``checkpoint``, ``resume``, ``nonfinite`` and a closing ``summary``. It is appended to,
not rewritten (see :mod:`alexnet2gpu.io.atomic` for why), and flushed after every line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["MetricsLog", "RunningMeans"]


class MetricsLog:
    """The metrics JSONL on rank 0: one object per line, flushed at once (a crash loses
    nothing written before it); the step records are also kept for the caller."""

    def __init__(self, path: str | None) -> None:
        self.records: list[dict] = []
        self.file = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a")

    def write(self, record: dict) -> None:
        if record.get("event") == "step":
            self.records.append(record)
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None


class RunningMeans:
    """Training loss and accuracy over the current epoch, and the last complete one: the
    summary reports the last complete epoch (as d2l does), or the run if shorter."""

    def __init__(self) -> None:
        self.now = [0.0, 0.0, 0.0]
        self.last: list[float] | None = None

    def add(self, mean_loss: float, correct: float, seen: float) -> None:
        self.now[0] += mean_loss * seen
        self.now[1] += correct
        self.now[2] += seen

    def end_epoch(self) -> None:
        if self.now[2]:
            self.last, self.now = self.now, [0.0, 0.0, 0.0]

    def summary(self) -> tuple[float, float]:
        loss, correct, seen = self.now if self.now[2] else (self.last or [math.nan, math.nan, 1.0])
        return loss / seen, correct / seen
