"""A training run's curves against epoch, as a PNG rewritten atomically after each
evaluation so that a person can watch a long run: the training loss on its own panel (y
from 0), the train, validation and test accuracies on another (y from 0 to 1, or from 0.5
to 1 when every accuracy is above 0.5, which the axis label then says), the latest value
written at each line's end, and a title naming the net, image size, recipe, schedule and
stage (:class:`RunLabel`). The x axis is padded so that a run of one to three evaluations
is drawn whole, a single evaluation as a marker. matplotlib is imported here only."""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING

from ..io.atomic import write_atomic

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["RunLabel", "build_curves_figure", "write_curves"]

LOSS_LABEL = "training loss (cross-entropy)"
ZOOM_FLOOR = 0.5  # every accuracy at or above it: the accuracy axis starts here, and says so
# key, legend label, colour, line style, marker; the train values are the running means
# over the epoch's steps (dropout on), as d2l's animator draws them
TRAIN = ("train_accuracy", "train (epoch's running mean)", "tab:blue", "-", "o")
ACCURACIES = (
    TRAIN,
    ("val_accuracy", "validation", "tab:orange", "--", "s"),
    ("test_accuracy", "test", "tab:green", "-.", "^"),
)
LOSS = ("train_loss", "train (epoch's running mean)", "tab:blue", "-", "o")
LEFT_PAD, RIGHT_PAD = 0.08, 0.15  # of the x axis's width; the right one holds the end values
LABEL_GAP = 0.075  # of the y axis's height: end values closer than this are pushed apart


@dataclass(frozen=True)
class RunLabel:
    """What a run is, for the figure's title: ``dual, fashion-mnist, 72 px, d2l recipe,
    cosine schedule, stage 2 (from step-00002814.pt)``. ``stage`` is 1 for a run from
    initialised weights and 2 or more for one started from a checkpoint's weights
    (``--weights``, named by ``weights``); None leaves it out."""

    model: str
    image_size: int | None = None
    recipe: str | None = None
    schedule: str | None = None
    stage: int | None = None
    weights: str | os.PathLike | None = None
    data: str | None = None

    def title(self) -> str:
        parts = [self.model]
        if self.data:
            parts.append(self.data)
        if self.image_size:
            parts.append(f"{self.image_size} px")
        if self.recipe:
            parts.append(f"{self.recipe} recipe")
        if self.schedule:
            parts.append(f"{self.schedule} schedule")
        source = f"from {PurePath(self.weights).name}" if self.weights else None
        if self.stage is not None:
            source = source or ("from scratch" if self.stage == 1 else None)
            parts.append(f"stage {self.stage}" + (f" ({source})" if source else ""))
        elif source:
            parts.append(f"weights {source}")
        return ", ".join(parts)


def _series(curve: list[dict], key: str) -> tuple[list[float], list[float]]:
    """The points of ``curve`` that carry a finite ``key`` (absent or None in older runs)."""
    xs, ys = [], []
    for point in curve:
        value = point.get(key)
        if value is not None and math.isfinite(value) and math.isfinite(point["epoch"]):
            xs.append(float(point["epoch"]))
            ys.append(float(value))
    return xs, ys


def x_limits(epochs: list[float]) -> tuple[float, float]:
    """Limits strictly wider than ``epochs`` on both sides, with room on the right for the
    end values; a single epoch gets a unit-wide axis around it. Never below 0 unless an
    epoch is."""
    if not epochs:
        return 0.0, 1.0
    low, high = min(epochs), max(epochs)
    if high > low:
        width = (high - low) / (1.0 - LEFT_PAD - RIGHT_PAD)
        left, right = low - LEFT_PAD * width, high + RIGHT_PAD * width
    else:
        left, right = low - 0.4, high + 0.6
    if low > 0:
        left = max(left, 0.0)
    return left, right


def accuracy_limits(curve: list[dict]) -> tuple[float, float]:
    """0 to 1, or :data:`ZOOM_FLOOR` to 1 when every accuracy drawn is at or above it."""
    values = [v for key, *_ in ACCURACIES for v in _series(curve, key)[1]]
    return (ZOOM_FLOOR if values and min(values) >= ZOOM_FLOOR else 0.0), 1.0


def _spread(values: list[float], gap: float, low: float, high: float) -> list[float]:
    """Positions for labels at ``values``, in their order, at least ``gap`` apart and
    within ``low`` to ``high`` (as far as they fit)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    placed = [0.0] * len(values)
    floor = low + gap / 2
    for i in order:
        placed[i] = max(values[i], floor)
        floor = placed[i] + gap
    overflow = max([placed[i] - (high - gap / 2) for i in order] + [0.0])
    return [p - overflow for p in placed]


def _draw(axes: Axes, curve: list[dict], series: tuple) -> list[tuple[float, float, str]]:
    """Draws each of ``series`` that ``curve`` carries; returns each line's last point and colour."""
    ends = []
    for key, label, colour, style, marker in series:
        xs, ys = _series(curve, key)
        if not xs:
            continue
        axes.plot(xs, ys, linestyle=style, marker=marker, ms=5, lw=1.6, color=colour, label=label, clip_on=False)
        ends.append((xs[-1], ys[-1], colour))
    return ends


def _annotate_ends(axes: Axes, ends: list[tuple[float, float, str]], digits: int) -> None:
    """The last value of each line written to the right of its last point, pushed apart
    where they would overlap and joined to their point by a thin line."""
    if not ends:
        return
    (left, right), (bottom, top) = axes.get_xlim(), axes.get_ylim()
    heights = _spread([y for _, y, _ in ends], LABEL_GAP * (top - bottom), bottom, top)
    for (x, y, colour), at in zip(ends, heights):
        axes.annotate(
            f"{y:.{digits}f}",
            xy=(x, y),
            xytext=(x + 0.03 * (right - left), at),
            color=colour,
            fontsize=8,
            va="center",
            ha="left",
            arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.6, "shrinkA": 0, "shrinkB": 3},
        )


def _loss_panel(axes: Axes, curve: list[dict], xlim: tuple[float, float]) -> None:
    ends = _draw(axes, curve, (LOSS,))
    finite = _series(curve, LOSS[0])[1]
    top = max(finite) * 1.15 if finite and max(finite) > 0 else 1.0
    axes.set_xlim(*xlim)
    axes.set_ylim(0.0, top)
    axes.set_ylabel(LOSS_LABEL)
    axes.set_title("loss", fontsize=9)
    _annotate_ends(axes, ends, digits=3)


def _accuracy_panel(axes: Axes, curve: list[dict], xlim: tuple[float, float]) -> None:
    ends = _draw(axes, curve, ACCURACIES)
    low, high = accuracy_limits(curve)
    axes.set_xlim(*xlim)
    axes.set_ylim(low, high)
    axes.set_ylabel("accuracy" if low == 0.0 else f"accuracy (axis from {low:g}, not 0)")
    axes.set_title("accuracy", fontsize=9)
    _annotate_ends(axes, ends, digits=3)
    if ends:
        axes.legend(loc="best", fontsize=8)


def build_curves_figure(curve: list[dict], title: str | RunLabel = "") -> Figure:
    """The figure of ``curve``: points ``{"epoch", "train_loss", "train_accuracy",
    "test_accuracy"}`` and optionally ``"val_accuracy"`` (a missing or None value is not
    drawn). Epochs are drawn as given (a later stage's already offset, or from 0)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9.0, 3.8), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    xlim = x_limits([float(p["epoch"]) for p in curve if math.isfinite(p["epoch"])])
    _loss_panel(loss_axes, curve, xlim)
    _accuracy_panel(accuracy_axes, curve, xlim)
    for axes in (loss_axes, accuracy_axes):
        axes.set_xlabel("epoch")
        axes.grid(True, alpha=0.3)
    if not curve:
        accuracy_axes.text(0.5, 0.5, "no evaluation yet", transform=accuracy_axes.transAxes, ha="center")
    text = title.title() if isinstance(title, RunLabel) else title
    if text:
        figure.suptitle(text, fontsize=10)
    return figure


def write_curves(path: str | os.PathLike, curve: list[dict], title: str | RunLabel = "") -> Figure:
    """Draws ``curve`` (:func:`build_curves_figure`) and replaces ``path`` with it
    atomically; returns the figure."""
    figure = build_curves_figure(curve, title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    write_atomic(path, lambda f: f.write(buffer.getvalue()))
    return figure
