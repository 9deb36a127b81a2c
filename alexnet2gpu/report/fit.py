"""Output of `fit`: the largest batch per configuration and card (terminal table and
Markdown), the breakdown per device at that batch, the reserve it assumed, and a PNG of
the largest batches grouped by card."""

from __future__ import annotations

import os

from rich.table import Table

from ..measure.cards import format_size
from ..measure.fit import FIT_CATEGORIES, FitPlan, FitRow
from . import console, fmt_mib

__all__ = ["fit_markdown", "plot_fit", "render_fit"]

_NAMES = {"weight_casts": "weight casts", "optimizer": "optimizer (momentum)"}
# in the plot a placement is a colour and a precision a hatch
_PLACEMENT_COLOUR = {"towers": 0, "grouped": 1, "split": 2, "ranks": 3, "single": 0}
_PRECISION_HATCH = {"fp32": "", "bf16": "///", "fp16": "..."}


def _config(row: FitRow) -> str:
    return f"{row.model}/{row.placement} {row.precision}"


def _cards(plan: FitPlan) -> list[dict]:
    return plan.cards


def _cell(row: FitRow) -> str:
    if row.largest_batch < 1:
        return "does not fit"
    two = len(row.devices) > 1
    return f"{row.largest_batch:,}" + (f" ({row.binding_device})" if two else "")


def _summary(plan: FitPlan) -> tuple[str, list[str], list[list[str]]]:
    cards = _cards(plan)
    by_key = {(_config(r), r.card): r for r in plan.rows}
    configs = list(dict.fromkeys(_config(r) for r in plan.rows))
    header = ["model/placement precision", *[c["label"] for c in cards]]
    rows = [[cfg, *[_cell(by_key[(cfg, c["name"])]) for c in cards]] for cfg in configs]
    title = (
        "largest training batch whose step fits on every device (the device that binds in brackets), "
        f"reserve {format_size(plan.reserve.bytes)} per device"
    )
    return title, header, rows


def _breakdown(plan: FitPlan, card: dict) -> tuple[str, list[str], list[list[str]]]:
    temporaries = any("temporaries" in d["breakdown"] for r in plan.rows for d in r.devices)
    categories = [*FIT_CATEGORIES, *(["temporaries"] if temporaries else [])]
    header = [
        "model/placement precision",
        "device",
        "batch",
        *[_NAMES.get(c, c) for c in categories],
        "reserve",
        "total",
        "per image",
    ]
    rows = []
    for row in plan.rows:
        if row.card != card["name"]:
            continue
        for d in row.devices:
            mark = " (binds)" if d["device"] == row.binding_device and len(row.devices) > 1 else ""
            b = d["breakdown"]
            rows.append(
                [
                    _config(row),
                    d["device"] + mark,
                    f"{row.largest_batch:,}" if row.largest_batch else "1 (does not fit)",
                    *[fmt_mib(b[c]) if c in b else "" for c in categories],
                    fmt_mib(b["reserve"]),
                    fmt_mib(d["total_bytes"]),
                    f"{d['per_image_bytes'] / 2**20:,.2f}",
                ]
            )
    title = f"{card['label']} ({format_size(card['capacity_bytes'])}): MiB per device at the largest batch"
    return title, header, rows


def _notes(plan: FitPlan) -> list[str]:
    m = plan.machine
    return [
        f"reserve: {plan.reserve.source}",
        plan.note,
        "weight casts: copies of the float32 weights saved for the backward (autocast's low-precision "
        "casts; grouped's joined conv weights); weights, gradients and momentum stay float32",
        f"planned in {plan.elapsed_s:.1f} s on {m.get('cpu', '?')} ({m.get('cpu_cores', '?')} cores), "
        f"torch {plan.torch}" + (f", {plan.model_kwargs}" if plan.model_kwargs else ""),
    ]


def _sections(plan: FitPlan, breakdown: bool) -> list[tuple[str, list[str], list[list[str]]]]:
    sections = [_summary(plan)]
    if breakdown:
        sections += [_breakdown(plan, card) for card in _cards(plan)]
    return sections


def _checks(plan: FitPlan) -> list[str]:
    lines = []
    for row in plan.rows:
        if not row.check:
            continue
        c = row.check
        if "skipped" in c:
            lines.append(f"check {_config(row)} on {row.card}: skipped ({c['skipped']})")
            continue
        head = f"check {_config(row)} on {row.card} ({c['source']}): batch {row.largest_batch} "
        head += "fits" if c["fits_at_batch"] else "DOES NOT FIT"
        head += f", batch {row.largest_batch + 1} " + ("does not" if c["exceeds_above"] else "also fits")
        if c.get("totals_bytes"):  # estimated directly: the largest device total at each batch
            head += "; totals with the reserve, MiB: " + ", ".join(
                f"batch {b}: {fmt_mib(max(t))}" for b, t in c["totals_bytes"].items()
            )
            head += f" (capacity {fmt_mib(row.capacity_bytes)})"
        if c.get("tracked_totals_bytes"):
            head += "; MemTracker's peak with temporaries + reserve, MiB: " + ", ".join(
                f"batch {b}: {fmt_mib(t)}" for b, t in c["tracked_totals_bytes"].items()
            )
        if c.get("tracked_peak_bytes"):
            head += f"; MemTracker's peak with temporaries {fmt_mib(c['tracked_peak_bytes'])} MiB + context " + (
                "fits" if c["tracked_fits_with_context"] else "DOES NOT FIT"
            )
        if c.get("measured_peak_bytes"):
            head += "; peak MiB measured " + ", ".join(fmt_mib(p) for p in c["measured_peak_bytes"])
            head += ", estimated " + ", ".join(fmt_mib(p) for p in c["predicted_peak_bytes"])
        lines.append(head)
    return lines


def render_fit(plan: FitPlan, *, breakdown: bool = True) -> None:
    out = console()
    for title, header, rows in _sections(plan, breakdown):
        table = Table(title=title, title_justify="left")
        for i, col in enumerate(header):
            table.add_column(col, justify="left" if i < 2 else "right")
        for row in rows:
            table.add_row(*row)
        out.print(table)
    for line in _checks(plan) + _notes(plan):
        out.print(line)


def fit_markdown(plan: FitPlan) -> str:
    parts = ["# Largest training batch per card (`alexnet2gpu fit`)", ""]
    for title, header, rows in _sections(plan, breakdown=True):
        parts += [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        parts += ["| " + " | ".join(row) + " |" for row in rows]
        parts.append("")
    parts += [f"- {line}" for line in _checks(plan) + _notes(plan)]
    return "\n".join(parts) + "\n"


def plot_fit(plan: FitPlan, path: str | os.PathLike) -> None:
    """One panel per model: bars of the largest batch (log scale) per placement and
    precision, grouped by card, each bar with its number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in plan.rows))
    cards = _cards(plan)
    fig, axes = plt.subplots(len(models), 1, figsize=(max(10, 2.2 * len(cards)), 3.6 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        configs = list(dict.fromkeys(f"{r.placement} {r.precision}" for r in plan.rows if r.model == model))
        by_key = {(f"{r.placement} {r.precision}", r.card): r for r in plan.rows if r.model == model}
        width = 0.8 / len(configs)
        for i, cfg in enumerate(configs):
            xs = [j + (i - (len(configs) - 1) / 2) * width for j in range(len(cards))]
            ys = [by_key[(cfg, c["name"])].largest_batch for c in cards]
            placement, precision = cfg.split()
            bars = ax.bar(
                xs,
                [max(y, 0.8) for y in ys],
                width,
                label=cfg,
                color=f"C{_PLACEMENT_COLOUR.get(placement, 0)}",
                hatch=_PRECISION_HATCH.get(precision, ""),
                edgecolor="white",
            )
            for bar, y in zip(bars, ys):
                ax.annotate(f"{y:,}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=6, rotation=90)  # fmt: skip
        ax.set_yscale("log")
        ax.set_xticks(range(len(cards)), [c["label"] for c in cards])
        ax.set_ylabel("largest batch (log)")
        ax.set_title(
            f"{model}: largest training batch per card (reserve {format_size(plan.reserve.bytes)})", loc="left"
        )
        ax.legend(fontsize=7, ncol=min(len(configs), 6), loc="upper left")
        ax.set_ylim(top=ax.get_ylim()[1] * 8)
    sizes = f", {plan.model_kwargs}" if plan.model_kwargs else ""
    fig.suptitle(f"alexnet2gpu fit: planned (estimated), torch {plan.torch}{sizes}", x=0.01, ha="left")
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
