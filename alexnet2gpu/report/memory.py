"""Terminal table for `memory`: bytes per device and category, measured or estimated."""

from __future__ import annotations

from rich.table import Table

from ..measure.accounting import MemoryReport
from . import console, fmt_mib

__all__ = ["render_memory"]


def render_memory(report: MemoryReport) -> None:
    sources = sorted({d.source for d in report.devices})
    table = Table(
        title=f"memory per device, MiB, one training step: {report.model}/{report.placement}, batch "
        f"{report.batch_size}, {report.image_size}px, width {report.width:g} "
        f"({' and '.join(sources)}, torch {report.torch})",
        title_justify="left",
    )
    table.add_column("device")
    table.add_column("holds")
    for col in ("params", "grads", "optimizer", "activations", "peak"):
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
            fmt_mib(d.peak_bytes),
            d.source,
        ]
        if show_rss:
            row.append(fmt_mib(d.rss_peak_bytes))
        table.add_row(*row)
    out = console()
    out.print(table)
    per_image = report.comm_bytes_per_step / report.batch_size if report.batch_size else 0
    out.print(
        f"exchanged between devices in one step (forward + backward, all directions): "
        f"{report.comm_bytes_per_step:,} bytes ({per_image:,.0f} per image)"
    )
    if report.note:
        out.print(report.note)
