"""Bytes each process sends per training step against the global batch, for the ways to use
two processes: the closed forms (:class:`~alexnet2gpu.measure.workers.TrafficLine`, exact
lines over the batch), the counted points of a run (:class:`~alexnet2gpu.measure.workers.WorkerRecord`)
on them, and the crossing points, where one way starts sending less than another, solved
from the closed forms (:func:`~alexnet2gpu.measure.workers.crossing`), not read off the plot.

Records in, a PNG out: nothing here measures."""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from ..measure.workers import TrafficLine, WorkerRecord, crossing  # noqa: E402

__all__ = ["BATCHES", "Crossing", "crossings", "plot_bytes"]

BATCHES = [2**k for k in range(13)]  # 1 .. 4096
_COLOURS = {"towers": "C0", "data parallel": "C1", "hybrid": "C2"}
_NET_COLOURS = {("dual", "data parallel"): "C4"}  # else it hides under torchvision's (0.2 % apart)
_STYLES = {"dual": "-.", "torchvision": "-", "simplified": "--"}  # the net by line style


@dataclass(frozen=True)
class Crossing:
    """Two ways of one net send the same at global batch ``batch`` (exact); below it
    ``less_below`` sends less, above it the other."""

    model: str
    ways: tuple[str, str]
    batch: Fraction
    bytes: float  # what each sends there, per process
    less_below: str

    def describe(self) -> str:
        other = self.ways[1] if self.less_below == self.ways[0] else self.ways[0]
        return (
            f"{self.model}: {self.less_below} sends less than {other} below a global batch of "
            f"{float(self.batch):,.1f} ({self.bytes / 2**20:,.1f} MiB per process there), more above"
        )


def crossings(lines: list[TrafficLine]) -> list[Crossing]:
    """Every crossing at a positive batch between two ways of the same net."""
    found = []
    for i, a in enumerate(lines):
        for b in lines[i + 1 :]:
            if a.model != b.model or a.processes != b.processes:
                continue
            batch = crossing(a, b)
            if batch is None:
                continue
            less_below = a.way if a.per_image > b.per_image else b.way  # the one that grows faster
            found.append(Crossing(a.model, (a.way, b.way), batch, a.bytes_at(batch), less_below))
    return found


def _colour(model: str, way: str) -> str:
    return _NET_COLOURS.get((model, way), _COLOURS.get(way, "C7"))


def _counted_points(records: list[WorkerRecord]) -> list[tuple[WorkerRecord, float]]:
    return [(r, max(r.sent_bytes)) for r in records if r.closed_form_bytes is not None and r.sent_bytes]


def plot_bytes(
    lines: list[TrafficLine], records: list[WorkerRecord], path: str | os.PathLike, *, batches=BATCHES, title: str = ""
) -> None:
    """The closed forms over ``batches`` (log-log), the counted points of ``records`` (open
    circles: counted at the collectives; a cross inside when they equal the closed form),
    and each crossing marked and labelled with its batch."""
    fig, ax = plt.subplots(figsize=(9.5, 6.0))
    for line in lines:
        ys = [line.bytes_at(b) / 2**20 for b in batches]
        ax.plot(
            batches,
            ys,
            _STYLES.get(line.model, "-"),
            color=_colour(line.model, line.way),
            lw=2.2 if line.model != "simplified" else 1.3,
            zorder=3 if line.model == "dual" else 2,
            label=f"{line.model}: {line.way} (closed form)",
        )
    for record, sent in _counted_points(records):
        colour = _colour(record.model, record.way)
        ax.plot(record.batch_size, sent / 2**20, "o", ms=11, mfc="none", mec=colour, mew=2)
        if record.bytes_match:
            ax.plot(record.batch_size, sent / 2**20, "x", ms=7, color=colour)
    if _counted_points(records):
        ax.plot([], [], "o", ms=9, mfc="none", mec="black", label="counted at the collectives (x: = closed form)")
    for k, cross in enumerate(crossings(lines)):
        x, y = float(cross.batch), cross.bytes / 2**20
        ax.plot(x, y, "D", ms=9, color="black", zorder=5)
        ax.axvline(x, color="grey", lw=0.8, ls=":")
        ax.annotate(
            f"{cross.model}: {cross.ways[0]} = {cross.ways[1]} at batch {x:,.1f};\n"
            f"{cross.less_below} sends less below it",
            (x, y),
            xytext=(0.02, 0.70 - 0.09 * k),
            textcoords="axes fraction",
            va="top",
            fontsize=8.5,
            arrowprops={"arrowstyle": "->", "color": "black", "lw": 0.8},
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "grey", "alpha": 0.9},
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(batches, [f"{b:,}" for b in batches])
    ax.set_xlabel("global batch (images per step, all processes)")
    ax.set_ylabel("MiB each process sends per training step")
    processes = lines[0].processes if lines else 2
    ax.set_title(title or f"Bytes sent per step, {processes} processes, float32 (ring accounting)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
