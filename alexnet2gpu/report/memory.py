"""Terminal table for `memory`: bytes per device and category, measured or estimated, in
the step's precision, with the saved activations by dtype."""

from __future__ import annotations

from rich.table import Table

from ..measure.accounting import MemoryReport
from . import console, fmt_mib

__all__ = ["dtype_breakdown", "render_memory"]


def dtype_breakdown(by_dtype: dict[str, int]) -> str:
    """``bfloat16 190.3 + int64 59.8 MiB``: saved activations by dtype, largest first."""
    items = sorted(by_dtype.items(), key=lambda kv: -kv[1])
    return " + ".join(f"{dtype} {fmt_mib(n)}" for dtype, n in items) + " MiB" if items else ""


def render_memory(report: MemoryReport) -> None:
    sources = sorted({d.source for d in report.devices})
    table = Table(
        title=f"memory per device, MiB, one training step: {report.model}/{report.placement}, batch "
        f"{report.batch_size}, {report.image_size}px, width {report.width:g}, {report.precision} "
        f"({' and '.join(sources)}, torch {report.torch})",
        title_justify="left",
    )
    table.add_column("device")
    table.add_column("holds")
    show_casts = any(d.weight_casts_bytes for d in report.devices)
    columns = ["params", "grads", "optimizer", "activations", *(["weight casts"] if show_casts else []), "peak"]
    for col in columns:
        table.add_column(col, justify="right")
    table.add_column("source")
    show_rss = any(d.rss_peak_bytes is not None for d in report.devices)
    if show_rss:
        table.add_column("process peak RSS (measured)", justify="right")
    for d in report.devices:
        row = [
            d.device,
            "+".join(d.parts),
            fmt_mib(d.params_bytes),
            fmt_mib(d.grads_bytes),
            fmt_mib(d.optimizer_bytes),
            fmt_mib(d.activations_bytes),
            *([fmt_mib(d.weight_casts_bytes)] if show_casts else []),
            fmt_mib(d.peak_bytes),
            d.source,
        ]
        if show_rss:
            row.append(fmt_mib(d.rss_peak_bytes))
        table.add_row(*row)
    out = console()
    out.print(table)
    for d in report.devices:
        if d.activations_by_dtype:
            out.print(f"{d.device}: saved activations by dtype: {dtype_breakdown(d.activations_by_dtype)}")
    if show_casts:
        out.print(
            "weight casts: copies of the float32 weights made in the step and saved for the backward "
            "(autocast's low-precision casts; grouped's joined conv weights); the weights, gradients "
            "and momentum themselves stay float32"
        )
    per_image = report.comm_bytes_per_step / report.batch_size if report.batch_size else 0
    out.print(
        f"exchanged between devices in one step (forward + backward, all directions): "
        f"{report.comm_bytes_per_step:,} bytes ({per_image:,.0f} per image)"
    )
    if report.note:
        out.print(report.note)
