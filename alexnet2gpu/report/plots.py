"""PNG plots for `compare`: memory per device stacked by category, and throughput against
batch size. Each plot says only what it draws: its title says measured or estimated, on
which device, with which torch; estimated bars are hatched, every bar carries its numbers
(MiB, as in the table), a process's measured peak RSS (``dual/ranks`` on the CPU) is a
marker of its own beside the estimate, and the note on the error bars gives the number of
repeats behind them. Written to a temporary name and moved into place by the caller
(atomic)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ..measure.matrix import CompareReport  # noqa: E402
from . import fmt_mib  # noqa: E402

__all__ = [
    "ESTIMATED_HATCH",
    "ESTIMATED_LABEL",
    "MEASURED_LABEL",
    "RSS_LABEL",
    "error_bar_note",
    "plot_memory",
    "plot_throughput",
]

_CATEGORIES = (
    ("params_bytes", "parameters"),
    ("grads_bytes", "gradients"),
    ("optimizer_bytes", "optimizer (momentum)"),
    ("activations_bytes", "activations"),
    ("input_bytes", "input batch"),
)
ESTIMATED_HATCH = "//"
ESTIMATED_LABEL = "estimated (no CUDA allocator: accounted from the tensors of a real step)"
MEASURED_LABEL = "measured (CUDA allocator)"
PEAK_LABEL = "peak of the step (number on top, the table's peak)"
RSS_LABEL = "process peak RSS, measured (the whole process: Python, torch, buffers)"
_SEGMENT_MIN = 0.045  # segments shorter than this share of the axis carry no number (too thin)
_MiB = 2**20
_OFF_SCALE = 4.0  # an RSS over this many times the highest bar is drawn at the top edge
_LABEL_BOX = {"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.75}


@dataclass
class _Bar:
    """One (variant, device) bar of the memory plot, in bytes."""

    label: str
    source: str
    segments: list[int]  # one per category, in _CATEGORIES order
    peak: int
    rss: int | None


def _bars(report: CompareReport) -> tuple[list[_Bar], int | None]:
    bars, batch = [], None
    for v in report.variants:
        if v.memory is None:
            continue
        batch = v.memory.batch_size
        for d in v.memory.devices:
            segments = [getattr(d, key, 0) or 0 for key, _ in _CATEGORIES]
            rss = getattr(d, "rss_peak_bytes", None)
            bars.append(_Bar(f"{v.name}\n{d.device}", d.source, segments, d.peak_bytes, rss))
    return bars, batch


def _draw_stacks(ax, bars: list[_Bar], top: float) -> list[int]:
    """The stacked segments, estimated ones hatched, each tall enough one labelled with its
    MiB; returns the indices of the categories drawn (any bar nonzero)."""
    x = range(len(bars))
    bottom = [0.0] * len(bars)
    drawn = []
    for i, (_key, _name) in enumerate(_CATEGORIES):
        heights = [b.segments[i] / _MiB for b in bars]
        if not any(heights):
            continue
        drawn.append(i)
        container = ax.bar(x, heights, bottom=bottom, color=f"C{i}", label="_nolegend_")
        for patch, bar in zip(container.patches, bars):
            if bar.source == "estimated":
                patch.set_hatch(ESTIMATED_HATCH)
                patch.set_hatchcolor((1.0, 1.0, 1.0, 0.55))
        labels = [fmt_mib(b.segments[i]) if h >= _SEGMENT_MIN * top else "" for b, h in zip(bars, heights)]
        ax.bar_label(container, labels=labels, label_type="center", fontsize=6, bbox=_LABEL_BOX)
        bottom = [b + h for b, h in zip(bottom, heights)]
    return drawn


def _draw_markers(ax, bars: list[_Bar], limit: float) -> bool:
    """The peak of each bar (its number on top) and, where measured, the process's peak
    RSS (its number beside; above ``limit`` MiB, at the top edge and said to be off
    scale); True when an RSS marker was drawn."""
    for i, bar in enumerate(bars):
        stack = sum(bar.segments) / _MiB
        ax.scatter([i], [bar.peak / _MiB], marker="_", s=600, color="black", zorder=3)
        ax.annotate(
            fmt_mib(bar.peak),
            (i, max(stack, bar.peak / _MiB)),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=7,
            fontweight="bold",
            gid="peak",
        )
    rss = [(i, b.rss / _MiB) for i, b in enumerate(bars) if b.rss]
    for i, value in rss:
        off_scale = value > limit  # far above the bars: drawn at the top edge, its number given
        ax.scatter([i], [min(value, 0.93 * limit)], marker="D", s=40, color="crimson", zorder=4)
        ax.annotate(
            f"RSS {value:,.1f}" + ("\n(off scale)" if off_scale else ""),
            (i, min(value, 0.93 * limit)),
            xytext=(0, 5),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=7,
            color="crimson",
            gid="rss",
        )
    return bool(rss)


def _memory_legend(ax, drawn: list[int], sources: set[str], rss: bool) -> None:
    """Legend entries for what is on the axes only."""
    handles = [Patch(color=f"C{i}", label=_CATEGORIES[i][1]) for i in drawn]
    if "measured" in sources:
        handles.append(Patch(facecolor="lightgray", edgecolor="dimgray", label=MEASURED_LABEL))
    if "estimated" in sources:
        handles.append(Patch(facecolor="lightgray", edgecolor="dimgray", hatch=ESTIMATED_HATCH, label=ESTIMATED_LABEL))
    handles.append(Line2D([], [], color="black", marker="_", markersize=14, linestyle="", label=PEAK_LABEL))
    if rss:
        handles.append(Line2D([], [], color="crimson", marker="D", linestyle="", label=RSS_LABEL))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def plot_memory(report: CompareReport, path: str | os.PathLike) -> None:
    """One stacked bar per (variant, device), estimated bars hatched, numbers on the
    segments and the peak on top; a diamond at the measured peak RSS where there is one."""
    bars, batch = _bars(report)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * len(bars) + 5), 5.5), layout="constrained")
    if not bars:
        ax.text(0.5, 0.5, "no memory figures in this report", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        tops = max(max(sum(b.segments), b.peak) for b in bars) / _MiB
        rss_top = max(b.rss or 0 for b in bars) / _MiB
        # a process's RSS many times the bars (tiny nets) would flatten them: it goes off scale
        limit = 1.3 * tops if rss_top > _OFF_SCALE * tops else 1.08 * max(tops, rss_top)
        ax.set_ylim(0, limit)
        drawn = _draw_stacks(ax, bars, limit)
        rss = _draw_markers(ax, bars, limit)
        ax.set_xticks(range(len(bars)), [b.label for b in bars])
        ax.set_ylabel("MiB")
        ax.tick_params(axis="x", labelsize=7)
        _memory_legend(ax, drawn, {b.source for b in bars}, rss)
    sources = " and ".join(sorted({b.source for b in bars})) or "nothing"
    ax.set_title(f"Memory per device, one training step, batch {batch} ({sources}; torch {report.torch})", fontsize=9)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def _unmeasured(report: CompareReport) -> list[str]:
    """A line per variant whose throughput could not be measured here, and why."""
    lines = [f"{v.name}: {v.note}" for v in report.variants if not v.results and v.note]
    lines += [f"{name}: {why}" for name, why in report.skipped.items()]
    return lines


def _repeats(result, report: CompareReport) -> int:
    """The timed repeats behind one figure: its own list of rates, else the run's setting."""
    rates = getattr(result, "repeats_images_per_s", None)
    return len(rates) if rates else int(report.config.get("repeats") or 0)


def _count(counts: set[int]) -> str:
    return str(min(counts)) if len(counts) == 1 else f"{min(counts)} to {max(counts)}"


def error_bar_note(with_bars: set[int], without_bars: set[int]) -> str:
    """What the error bars drawn are, with the repeats behind them: ``with_bars`` the
    repeat counts of the lines drawn with bars, ``without_bars`` of those drawn without
    (a single repeat has no spread). Empty when no line was drawn."""
    if not with_bars:
        if not without_bars:
            return ""
        return f"error bars: half the range of the timed repeats; none drawn, {_count(without_bars)} repeat each"
    note = f"error bars: half the range of the {_count(with_bars)} timed repeats, median ± (max - min) / 2"
    if min(with_bars) < 3:
        note += f"; only {min(with_bars)} repeats{' for some' if len(with_bars) > 1 else ''}: a rough spread"
    if without_bars:
        note += "; no bars on the lines with 1 repeat"
    return note


def _draw_mode(ax, report: CompareReport, mode: str, sizes: list[int]) -> dict:
    """One panel: a line per variant measured in ``mode``; returns what was drawn."""
    drawn = {"devices": set(), "with_bars": set(), "without_bars": set(), "dashed": False, "low": False}
    for v in report.variants:
        rows = sorted((r for r in v.results if r.mode == mode), key=lambda r: r.batch_size)
        if not rows:
            continue
        drawn["devices"].add(rows[0].device)
        counts = [_repeats(r, report) for r in rows]
        bars = min(counts) >= 2
        drawn["with_bars" if bars else "without_bars"].add(min(counts))
        drawn["dashed"] |= bool(v.compiled)
        low = getattr(v, "precision", "fp32") != "fp32"
        drawn["low"] |= low
        ax.errorbar(
            [r.batch_size for r in rows],
            [r.images_per_s for r in rows],
            yerr=[r.spread for r in rows] if bars else None,
            marker="s" if low else "o",
            capsize=3,
            linestyle="--" if v.compiled else "-",
            label=f"{v.name} ({rows[0].device})",
        )
    ax.set_xscale("log", base=2)
    if sizes:
        ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s (median of the timed repeats)")
    ax.set_title("training step" if mode == "train" else "inference")
    if drawn["devices"]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "nothing measured", ha="center", va="center", transform=ax.transAxes)
    return drawn


def plot_throughput(report: CompareReport, path: str | os.PathLike) -> None:
    """images/s against batch size, training and inference side by side, from 0; error bars
    at half the range of the repeats (with how many), none from a single repeat; compiled
    variants dashed, and said so only when one is drawn; a note under the axes for each
    variant not measured here."""
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 5.0), layout="constrained")
    sizes = sorted({r.batch_size for v in report.variants for r in v.results})
    panels = [_draw_mode(ax, report, mode, sizes) for ax, mode in zip(axes, ("train", "infer"))]
    devices = set().union(*(p["devices"] for p in panels))
    with_bars = set().union(*(p["with_bars"] for p in panels))
    without_bars = set().union(*(p["without_bars"] for p in panels))
    notes = [error_bar_note(with_bars, without_bars)]
    if any(p["dashed"] for p in panels):
        notes.append("dashed: torch.compile")
    if any(p["low"] for p in panels):
        notes.append("squares: autocast to bf16/fp16 (VARIANT+bf16), circles: fp32")
    threads = report.config.get("threads")
    fig.suptitle(
        f"Throughput, measured on {', '.join(sorted(devices)) or 'nothing'}"
        f"{f', {threads} CPU thread(s) per process' if threads else ''}; torch {report.torch}\n"
        + "; ".join(n for n in notes if n),
        fontsize=9,
    )
    unmeasured = _unmeasured(report)
    if unmeasured:
        fig.text(0.01, 0.0, "not measured here:\n" + "\n".join(unmeasured), fontsize=7, va="bottom", wrap=True)
        share = 0.04 * (len(unmeasured) + 1)
        fig.get_layout_engine().set(rect=(0, share, 1, 1 - share))
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
