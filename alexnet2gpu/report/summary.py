"""Terminal tables for `summary` and `verify`."""

from __future__ import annotations

from rich.table import Table

from ..checks.summary import SummaryRecord
from ..checks.verify import PlacementCheck
from . import console, fmt_int

__all__ = ["render_checks", "render_layer_table"]


def render_layer_table(record: SummaryRecord) -> None:
    """`summary`'s table: every layer's device, output shape and parameters, then the
    parameters per device."""
    table = Table(title=f"{record.model} / {record.placement}", title_justify="left")
    table.add_column("layer")
    table.add_column("type")
    table.add_column("device")
    table.add_column("output shape", justify="right")
    table.add_column("params", justify="right")
    for layer in record.layers:
        table.add_row(
            layer.name, layer.kind, layer.device, str(layer.output_shape), fmt_int(layer.params) if layer.params else ""
        )
    table.add_section()
    for entry in record.params_per_device:
        table.add_row("parameters on", "", entry["device"], "", fmt_int(entry["params"]))
    table.add_row("[bold]parameters in all", "", "", "", f"[bold]{fmt_int(record.params_total)}")
    out = console()
    out.print(table)
    if record.note:
        out.print(record.note)


def render_checks(checks: list[PlacementCheck]) -> None:
    table = Table(
        title="largest relative error against the float64 reference (one training step, dropout on)",
        title_justify="left",
    )
    table.add_column("placement")
    table.add_column("devices")
    for col in ("logits", "loss", "gradients"):
        table.add_column(col, justify="right")
    table.add_column("worst gradient", overflow="fold")
    table.add_column("result")
    for c in checks:
        table.add_row(
            c.placement,
            ",".join(c.devices),
            f"{c.logits_rel_err:.2e}",
            f"{c.loss_rel_err:.2e}",
            f"{c.grads_rel_err:.2e}",
            c.worst_grad,
            "[green]same[/]" if c.ok else f"[red]MISMATCH[/] (>= {c.tolerance:g})",
        )
    console().print(table)
