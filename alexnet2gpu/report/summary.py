"""Terminal tables for `summary` and `verify`."""

from __future__ import annotations

from rich.table import Table

from ..checks.summary import SummaryRecord
from ..checks.verify import PlacementCheck
from ..checks.verify_processes import ProcessCheck
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


def _result(ok: bool, tolerance: float, grads_tolerance: float | None) -> str:
    if ok:
        return "[green]same[/]"
    limit = f"{tolerance:g}" if grads_tolerance is None else f"{tolerance:g}, gradients {grads_tolerance:.3g}"
    return f"[red]MISMATCH[/] (>= {limit})"


def _process_result(c: ProcessCheck) -> str:
    """A process row's result: the step's errors and the bytes it counted at its collectives."""
    if c.bytes_ok:
        return _result(c.ok, c.tolerance, c.grads_tolerance)
    sent = ", ".join(fmt_int(int(b)) for b in c.sent_bytes)
    return f"[red]MISMATCH[/] (bytes sent {sent}, closed form {fmt_int(int(c.closed_form_bytes))})"


def render_checks(checks: list[PlacementCheck], process_checks: list[ProcessCheck] = (), failures=()) -> None:
    """`verify`'s table: one row per placement (and net and process count) against the
    float64 reference; a process row has no logits column (its check is the loss and the
    gradients, and the bytes sent at the collectives equal to the closed form). ``failures``:
    a line each for a process job that returned no records."""
    dropout = "dropout on" if not process_checks else "dropout 0.5 on dual, 0 on the single-stream nets and hybrid"
    table = Table(
        title=f"largest relative error against the float64 reference (one training step, {dropout})",
        title_justify="left",
    )
    table.add_column("placement")
    if process_checks:
        table.add_column("net")
        table.add_column("processes", justify="right")
    table.add_column("devices")
    for col in ("logits", "loss", "gradients"):
        table.add_column(col, justify="right")
    table.add_column("worst gradient", overflow="fold")
    table.add_column("result")
    extra = ["dual", "1"] if process_checks else []
    for c in checks:
        table.add_row(
            c.placement,
            *extra,
            ",".join(c.devices),
            f"{c.logits_rel_err:.2e}",
            f"{c.loss_rel_err:.2e}",
            f"{c.grads_rel_err:.2e}",
            c.worst_grad,
            _result(c.ok, c.tolerance, c.grads_tolerance),
        )
    if process_checks:
        table.add_section()
    for c in process_checks:
        worst = c.worst_grad + (f" (rank {c.worst_rank})" if c.worst_rank else "")
        table.add_row(
            c.placement,
            c.model,
            str(c.processes),
            "cpu (gloo)",
            "",
            f"{c.loss_rel_err:.2e}",
            f"{c.grads_rel_err:.2e}",
            worst,
            _process_result(c),
        )
    out = console()
    out.print(table)
    for failure in failures:
        out.print(f"FAILED {failure.line()}", style="red", markup=False, highlight=False, soft_wrap=True)
