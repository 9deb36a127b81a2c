"""The "two workers" table (issue 17): for each net, one device, the 2012 towers, data
parallel and the 2014 hybrid, with memory per process, bytes each process sends per step
(counted, beside the closed form) and throughput; as a rich terminal table and as Markdown,
with the crossing points of the closed forms and the plot (:mod:`.traffic`).

Records in (:class:`~alexnet2gpu.measure.workers.WorkerRecord`), text and pictures out."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.table import Table

from ..measure.workers import TrafficLine, WorkerRecord
from . import console, fmt_mib, write_text_atomic
from .traffic import crossings, plot_bytes

__all__ = ["COLUMNS", "render_run", "render_workers", "workers_markdown", "workers_rows"]

COLUMNS = (
    "net",
    "way",
    "processes",
    "params MiB",
    "grads MiB",
    "optimizer MiB",
    "activations MiB",
    "peak MiB",
    "memory",
    "sent MiB/step (counted)",
    "closed form",
    "= ?",
    "images/s",
)
_RIGHT = {"processes", "params MiB", "grads MiB", "optimizer MiB", "activations MiB", "peak MiB", "images/s"}
_RIGHT |= {"sent MiB/step (counted)", "closed form"}


def _per_process(values: list[int]) -> str:
    """One figure when every process holds the same, else each process's, ``a / b``."""
    if not values:
        return ""
    if len(set(values)) == 1:
        return fmt_mib(values[0])
    return " / ".join(fmt_mib(v) for v in values)


def _sent(record: WorkerRecord) -> tuple[str, str, str]:
    if record.closed_form_bytes is None:
        return "0", "0", "yes" if record.bytes_match else "NO"
    counted = _per_process([int(b) for b in record.sent_bytes])
    return counted, fmt_mib(int(record.closed_form_bytes)), "yes" if record.bytes_match else "NO"


def workers_rows(records: list[WorkerRecord]) -> list[list[str]]:
    """One row per (net, way), in :data:`COLUMNS` order. Memory columns: per process (one
    figure when all hold the same, ``rank 0 / rank 1`` otherwise)."""
    rows = []
    for r in records:
        memory = r.memory
        rate = f"{r.images_per_s:,.1f} ± {r.spread_images_per_s:,.1f}" if r.rates else ""
        rows.append(
            [
                r.model,
                r.way,
                str(r.processes),
                _per_process([m.params_bytes for m in memory]),
                _per_process([m.grads_bytes for m in memory]),
                _per_process([m.optimizer_bytes for m in memory]),
                _per_process([m.activations_bytes for m in memory]),
                _per_process([m.peak_bytes for m in memory]),
                ", ".join(sorted({m.source for m in memory})),
                *_sent(r),
                rate,
            ]
        )
    return rows


def _title(records: list[WorkerRecord]) -> str:
    if not records:
        return "two workers: no records"
    r = records[0]
    return (
        f"two workers: global batch {r.batch_size}, {max(x.processes for x in records)} processes x {r.threads} "
        f"thread(s) on {r.device}, width {r.width:g}, torch {r.torch}; memory per process, one training step"
    )


def render_workers(records: list[WorkerRecord], lines: list[TrafficLine] = ()) -> None:
    """The table in the terminal, then the crossing points."""
    table = Table(title=_title(records), title_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in _RIGHT else "left")
    for row in workers_rows(records):
        table.add_row(*row)
    out = console()
    out.print(table)
    for cross in crossings(list(lines)):
        out.print(f"crossing: {cross.describe()}")


def _md_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def workers_markdown(records: list[WorkerRecord], lines: list[TrafficLine] = (), meta: dict | None = None) -> str:
    """The table, the crossing points and the notes (``meta``: command, load, machine)."""
    meta = meta or {}
    out = [f"# {_title(records)}", ""]
    out += [_md_row(COLUMNS), _md_row("---:" if c in _RIGHT else "---" for c in COLUMNS)]
    out += [_md_row(row) for row in workers_rows(records)]
    out.append("")
    found = crossings(list(lines))
    if found:
        out += ["Crossing points of the closed forms (solved exactly, per process):", ""]
        out += [f"- {cross.describe()}" for cross in found]
        out.append("")
    out += [
        "- memory: per process (`a / b`: rank 0 / rank 1); *estimated* on the CPU (parameters, gradients and "
        "momentum are the tensors the process holds; activations the tensors autograd saved; peak their sum with "
        "the input batch, without DDP's gradient buckets and temporaries), *measured* on CUDA "
        "(`max_memory_allocated`).",
        "- sent: bytes each process sends per training step, counted at the collectives in the ring accounting "
        "(an all-reduce of n bytes over p processes sends 2(p-1)/p x n), beside the closed form; `= ?` says "
        "whether every process's count equals it.",
        "- images/s: the global batch per second, median ± half the range of interleaved rounds; `one device` "
        "runs on every process at once, each its own copy, so the machine is loaded alike.",
    ]
    notes = sorted({r.note for r in records if r.note})
    out += [f"- {note}" for note in notes]
    for key in ("command", "loadavg_before", "loadavg_after", "seconds"):
        if key in meta:
            out.append(f"- {key.replace('_', ' ')}: `{meta[key]}`")
    machine = meta.get("machine")
    if machine:
        cpu, cores, version = machine.get("cpu", ""), machine.get("cpu_cores", ""), machine.get("torch", "")
        out.append(f"- machine: {cpu}, {cores} cores, torch {version}")
    return "\n".join(out) + "\n"


def render_run(json_path: str | os.PathLike, png_path: str | os.PathLike | None = None) -> list[Path]:
    """From a run's JSON (``scripts/two_workers.py``): the table in the terminal, the
    Markdown beside the JSON, and the bytes-per-step plot at ``png_path``."""
    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    records = [WorkerRecord.from_json(r) for r in data["records"]]
    lines = [TrafficLine.from_json(line) for line in data.get("lines", [])]
    render_workers(records, lines)
    md = json_path.with_suffix(".md")
    write_text_atomic(md, workers_markdown(records, lines, data))
    written = [md]
    if png_path is not None and lines:
        png_path = Path(png_path)
        tmp = png_path.with_name(f".{png_path.name}.tmp.png")
        plot_bytes(lines, records, tmp)
        os.replace(tmp, png_path)
        written.append(png_path)
    return written
