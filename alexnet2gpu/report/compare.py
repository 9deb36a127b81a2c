"""Rendering for `compare`: rich tables in the terminal, ``compare.json``, ``compare.md``
and the PNG plots, written so that an interrupted run leaves the previous report intact:
every file is first written to a temporary name in the output folder, and only when all of
them exist are they moved into place with ``os.replace``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from ..io.atomic import write_all_atomic
from ..measure.matrix import BASELINES, CompareReport, compiled_gains, eager_name, precision_gains, speedups
from . import console, fmt_int, fmt_mib

__all__ = ["FILES", "compare_markdown", "render_compare", "write_compare"]

FILES = ("compare.json", "compare.md", "memory.png", "throughput.png")


def _batch_sizes(report: CompareReport) -> list[int]:
    return sorted({r.batch_size for v in report.variants for r in v.results})


def _rate(v, mode: str, batch: int) -> str:
    r = next((r for r in v.results if r.mode == mode and r.batch_size == batch), None)
    return "" if r is None else f"{r.images_per_s:,.1f} ± {r.spread:,.1f}"


def _cpu(v, batch: int) -> str:
    r = next((r for r in v.results if r.mode == "train" and r.batch_size == batch), None)
    return "" if r is None or not r.cpu_s_per_step else f"{r.cpu_s_per_step:,.3f}"


def _where(report: CompareReport) -> str:
    m = report.machine
    gpus = ", ".join(m.get("gpus") or []) or "no GPU"
    threads = report.config.get("threads")
    return (
        f"{m.get('cpu_cores')}-core CPU ({m.get('cpu')}), {gpus}; torch {report.torch}; "
        f"{f'{threads} CPU thread(s) per process; ' if threads else ''}"
        f"load average before {m.get('load_average_before')}, after {m.get('load_average')}"
    )


def _memory_rows(report: CompareReport):
    for v in report.variants:
        if v.memory is None:
            continue
        for d in v.memory.devices:
            yield v, d


def _speedup_rows(report: CompareReport):
    table = {}
    for row in speedups(report.variants):
        table.setdefault((row["name"], row["mode"], row["batch_size"]), {})[row["vs"]] = row["speedup"]
    order = [v.name for v in report.variants]
    modes = ("train", "infer")
    for (name, mode, batch), vs in sorted(
        table.items(), key=lambda kv: (modes.index(kv[0][1]), order.index(kv[0][0]), kv[0][2])
    ):
        yield name, mode, batch, [f"{vs[b]:.2f}x" if b in vs else "" for b in BASELINES]


@dataclass
class _Section:
    """One table, rendered both as a rich table and as Markdown."""

    heading: str  # the Markdown heading and the terminal table's title
    header: list[str]
    rows: list[list[str]]
    right_from: int = 1  # columns from this one on are right-aligned (numbers)
    intro: str = ""  # a paragraph under the Markdown heading
    terminal: bool = True  # also printed in the terminal


def _memory_section(report: CompareReport) -> _Section:
    rows = []
    for v, d in _memory_rows(report):
        rss = (
            f"; process peak RSS {fmt_mib(d.rss_peak_bytes)} MiB measured (the whole process, not the peak column)"
            if d.rss_peak_bytes
            else ""
        )
        rows.append(
            [
                v.name,
                d.device,
                fmt_int(d.params),
                fmt_mib(d.params_bytes),
                fmt_mib(d.grads_bytes),
                fmt_mib(d.optimizer_bytes),
                fmt_mib(d.activations_bytes),
                fmt_mib(d.peak_bytes),
                d.source + rss,
            ]
        )
    return _Section(
        f"Parameters and memory per device (MiB, one training step at batch {report.config['memory_batch_size']})",
        ["variant", "device", "params", "param MiB", "grads", "optimizer", "activations", "peak", "source"],
        rows,
        right_from=2,
    )


def _throughput_section(report: CompareReport) -> _Section:
    sizes = _batch_sizes(report)
    rows = [
        [v.name, v.devices, mode, *[_rate(v, mode, b) for b in sizes]]
        for mode in ("train", "infer")
        for v in report.variants
        if v.results
    ]
    rows += [
        [v.name, v.devices, "train, infer", *["not measured here (see notes)"] * len(sizes)]
        for v in report.variants
        if not v.results
    ]
    return _Section(
        "Throughput (images/s, measured: median ± half the range of the repeats)",
        ["variant", "device", "mode", *(f"batch {b}" for b in sizes)],
        rows,
        right_from=3,
    )


def _cpu_section(report: CompareReport) -> _Section:
    sizes = _batch_sizes(report)
    return _Section(
        "CPU seconds per training step (measured, the busiest process)",
        ["variant", "device", *(f"batch {b}" for b in sizes)],
        [[v.name, v.devices, *[_cpu(v, b) for b in sizes]] for v in report.variants if v.results],
        right_from=2,
        intro="Process CPU time (`time.process_time`) per step; under `dual/ranks`, the larger of the two "
        "processes'. Other jobs sharing the machine inflate it less than the images/s above (not "
        "at all only where they leave the caches alone).",
        terminal=False,
    )


def _comm_section(report: CompareReport) -> _Section:
    rows = [
        [v.name, str(b), fmt_int(v.comm_bytes_per_step), fmt_int(v.comm_bytes_per_step // b)]
        for v in report.variants
        if v.memory is not None
        for b in [v.memory.batch_size]
    ]
    return _Section(
        "Bytes exchanged between devices per training step (forward + backward)",
        ["variant", "batch", "bytes", "per image"],
        rows,
    )


def _speedup_section(report: CompareReport) -> _Section:
    return _Section(
        "Speed-ups (images/s over images/s, same run)",
        ["variant", "mode", "batch", *(f"vs {b}" for b in BASELINES)],
        [[name, mode, str(batch), *cells] for name, mode, batch, cells in _speedup_rows(report)],
        right_from=2,
        intro="A VARIANT+bf16 (or +fp16) row is compared with the baselines in the same precision."
        if any(v.precision != "fp32" for v in report.variants)
        else "",
    )


def _compiled_sections(report: CompareReport) -> list[_Section]:
    """The compiled gain of every variant that ran compiled, and each one's compile time."""
    compiled = [v for v in report.variants if v.compiled and v.results]
    if not compiled:
        return []
    sizes = _batch_sizes(report)
    gains = {(g["name"], g["mode"], g["batch_size"]): g["gain"] for g in compiled_gains(report.variants)}
    gain_rows = []
    for mode in ("train", "infer"):
        for v in compiled:
            name = eager_name(v.name)
            cells = [f"{gains[name, mode, b]:.2f}x" if (name, mode, b) in gains else "" for b in sizes]
            gain_rows.append([name, mode, *cells])
    time_rows = [
        [v.name, r.mode, str(r.batch_size), f"{r.compile_s:,.1f}"]
        for v in compiled
        for r in v.results
        if r.compile_s is not None
    ]
    return [
        _Section(
            "Compiled gain (torch.compile images/s over eager images/s, same run)",
            ["variant", "mode", *(f"batch {b}" for b in sizes)],
            gain_rows,
            right_from=2,
        ),
        _Section(
            "Compile time (s; the first call of each mode and batch: compilation plus one step, never in images/s)",
            ["variant", "mode", "batch", "seconds"],
            time_rows,
            right_from=2,
        ),
    ]


def _precision_section(report: CompareReport) -> list[_Section]:
    """Each low-precision variant's images/s over its float32 twin's, where both ran."""
    gains = precision_gains(report.variants)
    if not gains:
        return []
    sizes = _batch_sizes(report)
    table = {(g["name"], g["precision"], g["mode"], g["batch_size"]): g["gain"] for g in gains}
    keys = list(dict.fromkeys((g["name"], g["precision"], g["mode"]) for g in gains))
    keys.sort(key=lambda k: k[2] != "train")
    rows = [
        [
            name,
            precision,
            mode,
            *[f"{table[name, precision, mode, b]:.2f}x" if (name, precision, mode, b) in table else "" for b in sizes],
        ]
        for name, precision, mode in keys
    ]
    return [
        _Section(
            "Mixed-precision gain (autocast images/s over float32 images/s, same run)",
            ["variant", "precision", "mode", *(f"batch {b}" for b in sizes)],
            rows,
            right_from=3,
        )
    ]


def _sections(report: CompareReport) -> list[_Section]:
    return [
        _memory_section(report),
        _throughput_section(report),
        _cpu_section(report),
        _comm_section(report),
        _speedup_section(report),
        *_compiled_sections(report),
        *_precision_section(report),
    ]


def _rich_table(section: _Section) -> Table:
    table = Table(title=section.heading, title_justify="left")
    for i, name in enumerate(section.header):
        numeric = i >= section.right_from and name != "source"
        # numbers are never cut short: folded onto a second line before an ellipsis
        table.add_column(name, justify="right" if numeric else "left", overflow="fold", no_wrap=i == 0)
    for row in section.rows:
        table.add_row(*row)
    return table


def render_compare(report: CompareReport) -> None:
    out = console()
    out.print(f"[bold]alexnet2gpu compare[/]: {_where(report)}")
    for section in _sections(report):
        if section.terminal:
            out.print(_rich_table(section))
    for line in _numerics_line(report) + _compiled_line(report) + _notes(report):
        out.print(line.removeprefix("- "))


def _notes(report: CompareReport) -> list[str]:
    lines = [f"{v.name}: {v.note}" for v in report.variants if v.note]
    lines += [f"{name}: {why}" for name, why in report.skipped.items()]
    o = report.overhead
    if o is not None:
        lines.append(
            f"harness overhead (measured, {o.model}, batch {o.batch_size}, {o.device}): bench "
            f"{o.harness_images_per_s:,.1f} images/s, plain PyTorch loop {o.plain_images_per_s:,.1f} images/s: "
            f"{100 * o.overhead:+.1f} % (medians of {o.repeats}); fastest repeats {o.harness_best_images_per_s:,.1f} "
            f"against {o.plain_best_images_per_s:,.1f}: {100 * o.overhead_best:+.1f} %; CPU seconds per step "
            f"{o.harness_cpu_s_per_step:.3f} against {o.plain_cpu_s_per_step:.3f}: {100 * o.overhead_cpu:+.1f} %"
        )
    lines.append(f"wall time {report.wall_s:,.0f} s")
    return lines


def _md_table(section: _Section) -> str:
    align = ["---" if i < section.right_from or name == "source" else "---:" for i, name in enumerate(section.header)]
    lines = ["| " + " | ".join(section.header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in section.rows]
    return "\n".join(lines)


def _rss_line(report: CompareReport) -> list[str]:
    names = list(dict.fromkeys(v.name for v, d in _memory_rows(report) if d.rss_peak_bytes))
    if not names:
        return []
    return [
        f"- {', '.join(f'`{n}`' for n in names)}: the `source` column also gives each process's peak RSS, "
        "**measured**: the whole process (Python, torch, buffers), not the step's peak beside it; the memory plot "
        "draws it as a marker of its own above the estimated bar."
    ]


def _numerics_line(report: CompareReport) -> list[str]:
    """The arithmetic of the rows: precisions (rows beyond fp32 are named VARIANT+bf16),
    memory format, and the cudnn.benchmark and TF32 switches as the first record has them."""
    records = [r.numerics for v in report.variants for r in v.results if r.numerics]
    precisions = list(dict.fromkeys(v.precision for v in report.variants))
    words = [
        f"precision {', '.join(precisions)}"
        + (
            " (rows beyond fp32 under torch.autocast, named VARIANT+PRECISION)"
            if len(precisions) > 1 or precisions[:1] != ["fp32"]
            else ""
        )
    ]
    if records:
        first = records[0]
        words += [
            f"memory format {first.get('memory_format', 'contiguous')}",
            f"cudnn.benchmark {'on' if first.get('cudnn_benchmark') else 'off'}",
            f"TF32 matmul {'on' if first.get('tf32_matmul') else 'off'}, "
            f"cuDNN {'on' if first.get('tf32_cudnn') else 'off'}",
        ]
    return [f"- numerics: {'; '.join(words)}"]


def _compiled_line(report: CompareReport) -> list[str]:
    names = [v.name for v in report.variants if v.compiled]
    if not names:
        return []
    return [
        f"- compiled variants (`torch.compile`, inductor, static shapes): {', '.join(names)}; the others run eager. "
        "Compile time is reported on its own; every images/s is timed after it."
    ]


def compare_markdown(report: CompareReport) -> str:
    c = report.config
    parts = [
        "# alexnet2gpu compare",
        "",
        f"- command: `{report.command}`" if report.command else "- command: (library call)",
        f"- machine: {_where(report)}",
        f"- settings: batch sizes {c['batch_sizes']}, memory at batch {c['memory_batch_size']}, "
        f"{c['warmup']} warm-up step(s), {c['repeats']} timed repeats of {c['steps']} step(s), "
        f"image size {c['image_size'] or 'each net’s own (227; simplified 224)'}, width {c['width']:g}",
        f"- wall time: {report.wall_s:,.0f} s",
        "- throughput figures are **measured** (median of the repeats ± half their range); memory figures say "
        "in their `source` column whether they are **measured** (CUDA allocator) or **estimated** "
        "(accounted from the tensors of a real step, per intended device); in the memory plot estimated bars are "
        "hatched.",
        *_numerics_line(report),
        *_rss_line(report),
        *_compiled_line(report),
        "",
    ]
    for section in _sections(report):
        parts += [f"## {section.heading}", ""]
        if section.intro:
            parts += [section.intro, ""]
        parts += [_md_table(section), ""]
    parts += ["## Notes", "", *[f"- {line}" for line in _notes(report)], "", "## Plots", ""]
    parts += ["![memory per device](memory.png)", "", "![throughput against batch size](throughput.png)", ""]
    return "\n".join(parts)


def write_compare(report: CompareReport, out_dir: str | os.PathLike) -> list[Path]:
    """Writes ``FILES`` into ``out_dir``: all to temporary names first, then each moved into
    place. An interruption before the moves leaves every previous file as it was."""
    from .plots import plot_memory, plot_throughput

    out = Path(out_dir)
    writers = {
        "compare.json": lambda f: f.write((json.dumps(report.to_json(), indent=2) + "\n").encode()),
        "compare.md": lambda f: f.write(compare_markdown(report).encode()),
        "memory.png": lambda f: plot_memory(report, f),
        "throughput.png": lambda f: plot_throughput(report, f),
    }
    return write_all_atomic({out / name: write for name, write in writers.items()})
