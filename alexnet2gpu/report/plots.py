"""PNG plots for `compare`: memory per device stacked by category, and throughput against
batch size. Each plot's title says measured or estimated, on which device, with which
torch. Written to a temporary name and moved into place by the caller (atomic)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from ..measure.matrix import CompareReport  # noqa: E402

__all__ = ["plot_memory", "plot_throughput"]

_CATEGORIES = (
    ("params_bytes", "parameters"),
    ("grads_bytes", "gradients"),
    ("optimizer_bytes", "optimizer (momentum)"),
    ("activations_bytes", "activations"),
    ("input_bytes", "input batch"),
)


def plot_memory(report: CompareReport, path: str | os.PathLike) -> None:
    """One stacked bar per (variant, device); a marker at each device's peak."""
    labels, stacks, peaks, sources = [], {key: [] for key, _ in _CATEGORIES}, [], set()
    batch = None
    for v in report.variants:
        if v.memory is None:
            continue
        batch = v.memory.batch_size
        for d in v.memory.devices:
            labels.append(f"{v.name}\n{d.device}")
            for key, _ in _CATEGORIES:
                stacks[key].append(getattr(d, key) / 2**20)
            peaks.append(d.peak_bytes / 2**20)
            sources.add(d.source)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 5.0), layout="constrained")
    bottom = [0.0] * len(labels)
    for key, name in _CATEGORIES:
        ax.bar(labels, stacks[key], bottom=bottom, label=name)
        bottom = [b + h for b, h in zip(bottom, stacks[key])]
    ax.scatter(labels, peaks, marker="_", s=600, color="black", zorder=3, label="peak")
    ax.set_ylabel("MiB")
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(
        f"Memory per device, one training step, batch {batch} ({' and '.join(sorted(sources))}; torch {report.torch})",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def _unmeasured(report: CompareReport) -> list[str]:
    """A line per variant whose throughput could not be measured here, and why."""
    lines = [f"{v.name}: {v.note}" for v in report.variants if not v.results and v.note]
    lines += [f"{name}: {why}" for name, why in report.skipped.items()]
    return lines


def plot_throughput(report: CompareReport, path: str | os.PathLike) -> None:
    """images/s against batch size, training and inference side by side, from 0; error bars
    at half the range of the repeats; compiled variants dashed; a note under the axes for
    each variant not measured here."""
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 5.0), layout="constrained")
    devices = set()
    sizes = sorted({r.batch_size for v in report.variants for r in v.results})
    for ax, mode in zip(axes, ("train", "infer")):
        for v in report.variants:
            rows = sorted((r for r in v.results if r.mode == mode), key=lambda r: r.batch_size)
            if not rows:
                continue
            devices.add(rows[0].device)
            ax.errorbar(
                [r.batch_size for r in rows],
                [r.images_per_s for r in rows],
                yerr=[r.spread for r in rows],
                marker="o",
                capsize=3,
                linestyle="--" if v.compiled else "-",
                label=f"{v.name} ({rows[0].device})",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_xlabel("batch size")
        ax.set_ylabel("images/s (median of repeats)")
        ax.set_title("training step" if mode == "train" else "inference")
        ax.legend(fontsize=7)
    threads = report.config.get("threads")
    repeats = report.config.get("repeats")
    fig.suptitle(
        f"Throughput, measured on {', '.join(sorted(devices)) or 'nothing'}"
        f"{f', {threads} CPU thread(s) per process' if threads else ''}; torch {report.torch}\n"
        f"error bars: half the range (max - min) / 2 of {repeats} timed repeats; dashed: torch.compile",
        fontsize=9,
    )
    notes = _unmeasured(report)
    if notes:
        fig.text(0.01, 0.0, "not measured here:\n" + "\n".join(notes), fontsize=7, va="bottom", wrap=True)
        fig.get_layout_engine().set(rect=(0, 0.04 * (len(notes) + 1), 1, 1 - 0.04 * (len(notes) + 1)))
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
