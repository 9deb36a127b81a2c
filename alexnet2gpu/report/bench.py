"""Terminal tables for `bench`: images/s per (model, placement, mode, batch size)."""

from __future__ import annotations

import sys
import time

import torch
from rich.table import Table

from ..measure.bench import BenchResult, OverheadResult
from . import console

__all__ = ["ProgressBar", "numerics_words", "progress_bar", "render_bench", "render_overhead"]


def render_bench(results: list[BenchResult], machine: dict | None = None) -> None:
    first = results[0] if results else None
    where = f"{first.device}, {first.threads} thread(s) per process" if first else ""
    arithmetic = numerics_words(results)
    where += f", {arithmetic}" if arithmetic else ""
    per_row = len({_arithmetic(r) for r in results}) > 1  # a column only where rows differ by it
    table = Table(
        title=f"throughput, measured ({where}, torch {torch.__version__}); median of "
        f"{len(first.repeats_images_per_s) if first else 0} repeats, ± half their range",
        title_justify="left",
    )
    for col in ("model", "placement", *(["numerics"] if per_row else []), "mode", "batch"):
        table.add_column(col, justify="right" if col == "batch" else "left")
    table.add_column("images/s", justify="right")
    table.add_column("± spread", justify="right")
    table.add_column("ms/step", justify="right")
    table.add_column("CPU ms/step", justify="right")
    for r in results:
        table.add_row(
            r.model,
            r.placement,
            *([_arithmetic(r)] if per_row else []),
            r.mode,
            str(r.batch_size),
            f"{r.images_per_s:,.1f}",
            f"{r.spread:,.1f}",
            f"{1000 * r.batch_size / r.images_per_s:,.1f}",
            f"{1000 * r.cpu_s_per_step:,.1f}",
        )
    console().print(table)
    compiled = [r for r in results if r.compile_s is not None]
    if compiled:
        times = ", ".join(f"{r.mode} at batch {r.batch_size}: {r.compile_s:,.1f} s" for r in compiled)
        console().print(
            f"compile time (torch.compile; the first call of each mode and batch, compilation plus one step, "
            f"not in images/s): {times}"
        )
    if machine:
        console().print(
            f"machine: {machine.get('cpu')}, {machine.get('cpu_cores')} cores, "
            f"GPUs: {', '.join(machine.get('gpus') or []) or 'none'}, "
            f"load average {machine.get('load_average')}"
        )


def _arithmetic(r: BenchResult) -> str:
    """``bf16``, ``fp32 channels_last``, ...: the precision and memory format of a record."""
    numerics = r.numerics or {}
    fmt = numerics.get("memory_format", "contiguous")
    return " ".join([numerics.get("precision", "fp32"), *([fmt] if fmt != "contiguous" else [])])


def numerics_words(results: list[BenchResult]) -> str:
    """The settings all ``results`` share, in words (empty where they differ or none are
    recorded): precision (autocast for bf16/fp16), memory format, cudnn.benchmark, TF32."""
    kinds = {_arithmetic(r) for r in results}
    records = [r.numerics for r in results if r.numerics]
    if len(kinds) != 1 or not records:
        return ""
    first = records[0]
    words = [next(iter(kinds)) + (" autocast" if first.get("precision", "fp32") != "fp32" else "")]
    if any(r.device.startswith("cuda") for r in results):
        words.append(f"cudnn.benchmark {'on' if first.get('cudnn_benchmark') else 'off'}")
        words.append(f"TF32 matmul {'on' if first.get('tf32_matmul') else 'off'}")
    return ", ".join(words)


def render_overhead(result: OverheadResult) -> None:
    verdict = "within 5 %" if abs(result.overhead) <= 0.05 else "MORE than 5 %"
    console().print(
        f"harness overhead, measured ({result.device}, {result.threads} thread(s), torch {torch.__version__}): "
        f"bench {result.harness_images_per_s:,.1f} images/s against a plain loop "
        f"{result.plain_images_per_s:,.1f} images/s ({result.model}, batch {result.batch_size}, "
        f"median of {result.repeats}): {100 * result.overhead:+.1f} % ({verdict}); fastest repeats: "
        f"{result.harness_best_images_per_s:,.1f} against {result.plain_best_images_per_s:,.1f}, "
        f"{100 * result.overhead_best:+.1f} %; CPU time per step: {1000 * result.harness_cpu_s_per_step:,.0f} ms "
        f"against {1000 * result.plain_cpu_s_per_step:,.0f} ms, {100 * result.overhead_cpu:+.1f} %"
    )


class ProgressBar:
    """Progress for long measurements; ``advance()`` is the callback that measurement code
    calls (it knows nothing of rich). On a terminal a rich bar with the elapsed time and an
    ETA; otherwise (a log, CI) a plain line on stderr at most every ``LOG_EVERY_S`` seconds
    and at the end. Off when ``enabled`` is False (other ranks, JSON to stdout), then
    ``advance`` does nothing."""

    LOG_EVERY_S = 15.0

    def __init__(self, total: int, description: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress = None
        self._task = None
        self._total, self._description = total, description
        self._done, self._started, self._last_line = 0, 0.0, 0.0

    def __enter__(self) -> ProgressBar:
        self._started = self._last_line = time.monotonic()
        if self.enabled and console().is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console(),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self._description, total=self._total)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
        elif self.enabled and exc[0] is None:
            self._log_line(self._description)

    def advance(self, steps: int = 1, description: str | None = None) -> None:
        self._done += steps
        if description:
            self._description = description
        if self._progress is not None:
            kwargs = {"description": description} if description else {}
            self._progress.update(self._task, advance=steps, **kwargs)
        elif self.enabled and time.monotonic() - self._last_line >= self.LOG_EVERY_S:
            self._log_line(self._description)

    def _log_line(self, description: str) -> None:
        now = time.monotonic()
        self._last_line = now
        elapsed = now - self._started
        done = min(self._done, self._total)
        eta = elapsed / done * (self._total - done) if done else float("nan")
        eta_words = "?" if eta != eta else f"{eta:.0f} s"
        print(
            f"{description}: {done}/{self._total} done, {elapsed:.0f} s elapsed, ETA {eta_words}",
            file=sys.stderr,
            flush=True,
        )


def progress_bar(total: int, description: str, enabled: bool = True) -> ProgressBar:
    """``with progress_bar(n, "measuring") as bar: work(on_repeat=bar.advance)``."""
    return ProgressBar(total, description, enabled)
