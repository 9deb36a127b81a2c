"""What a person sees while training, on rank 0 only: a header, a live line (loss,
accuracy, images/s, lr, ETA) on a terminal or a plain line every N seconds in a log
(:class:`LogProgress`), and the end summary in the seed's format
(``loss 0.327, train acc 0.881, test acc 0.885`` / ``4149.6 examples/sec on cuda:0``)."""

from __future__ import annotations

import math
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import console

__all__ = ["LogProgress", "TrainingDisplay", "render_header", "render_run_summary", "summary_lines"]


def _num(value, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def render_header(header: dict) -> None:
    c = console()
    resumed = f", resumed from {header['resumed_from']}" if header.get("resumed_from") else ""
    c.print(
        f"[bold]train[/bold] {header['model']} on {header['placement']}: {header['device']}{resumed}", soft_wrap=True
    )
    c.print(f"  data: {header['data']}", soft_wrap=True)
    c.print(
        f"  recipe {header['recipe']}: global batch {header['batch_size']}, {header['steps']} steps, "
        f"lr {header['lr']:g}, input {header['in_channels']}x{header['image_size']}x{header['image_size']}, "
        f"{header.get('precision', 'fp32')}",
        soft_wrap=True,
    )
    for note in header.get("departures", ()):
        c.print(f"  [yellow]{note}[/yellow]", soft_wrap=True)
    if header.get("hint"):
        c.print(f"  [dim]{header['hint']}[/dim]", soft_wrap=True)


class TrainingDisplay:
    """A rich live progress line; the step records come from the training loop."""

    def __init__(self, total_steps: int, header: dict) -> None:
        render_header(header)
        self.total = total_steps
        self.progress = Progress(
            TextColumn("step"),
            MofNCompleteColumn(),
            BarColumn(bar_width=24),
            TextColumn(
                "loss {task.fields[loss]}  acc {task.fields[acc]}  val {task.fields[val]}  test {task.fields[test]}  "
                "{task.fields[ips]} img/s  lr {task.fields[lr]}"
            ),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console(),
            transient=False,
        )
        self.task = None

    def start(self, step: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=self.total, completed=step, loss="-", acc="-", val="-", test="-", ips="-", lr="-"
        )

    def update(self, record) -> None:
        self.progress.update(
            self.task,
            completed=record.step,
            loss=_num(record.loss, ".3f"),
            acc=_num(record.accuracy, ".3f"),
            ips=_num(record.images_per_s, ".1f"),
            lr=_num(record.lr, ".2g"),
        )

    def evaluated(self, step: int, test_accuracy: float, val_accuracy: float | None = None) -> None:
        self.progress.update(self.task, val=_num(val_accuracy, ".3f"), test=_num(test_accuracy, ".3f"))

    def note(self, message: str) -> None:
        self.progress.console.print(f"[yellow]{message}[/yellow]")

    def stop(self) -> None:
        self.progress.stop()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


class LogProgress:
    """The live line's numbers as a plain line every ``every_s`` seconds, for a log file or
    CI (a live line there shows nothing until the end): step, loss, accuracy, images/s,
    ETA. Same interface as :class:`TrainingDisplay`."""

    def __init__(self, total_steps: int, header: dict, every_s: float = 30.0) -> None:
        render_header(header)
        self.total, self.every_s = total_steps, every_s
        self.test = None
        self.last = None

    def start(self, step: int) -> None:
        self.first_step, self.started = step, time.monotonic()
        self.printed = self.started

    def update(self, record) -> None:
        self.last = record
        now = time.monotonic()
        if now - self.printed >= self.every_s or record.step == self.total:
            self.printed = now
            self._print(record, now)

    def _print(self, record, now: float) -> None:
        done = record.step - self.first_step
        rate = (now - self.started) / done if done else 0.0
        eta = _duration(rate * (self.total - record.step)) if done else "-"
        test = f"  test {_num(self.test, '.3f')}" if self.test is not None else ""
        console().print(
            f"step {record.step}/{self.total}  loss {_num(record.loss, '.3f')}  acc {_num(record.accuracy, '.3f')}"
            f"{test}  {_num(record.images_per_s, '.1f')} img/s  lr {_num(record.lr, '.2g')}  ETA {eta}",
            soft_wrap=True,
        )

    def evaluated(self, step: int, test_accuracy: float, val_accuracy: float | None = None) -> None:
        self.test = test_accuracy
        val = f"val acc {_num(val_accuracy, '.3f')}  " if val_accuracy is not None else ""
        console().print(f"step {step}/{self.total}  {val}test acc {_num(test_accuracy, '.3f')}", soft_wrap=True)

    def note(self, message: str) -> None:
        console().print(message, soft_wrap=True)

    def stop(self) -> None:
        pass


def summary_lines(result) -> list[str]:
    """The seed's two summary lines (d2l's ``train_ch6``), then what else happened."""
    lines = [
        f"loss {_num(result.loss, '.3f')}, train acc {_num(result.train_accuracy, '.3f')}, "
        f"test acc {_num(result.test_accuracy, '.3f')}",
        f"{result.images_per_s:.1f} examples/sec on {result.device}",
    ]
    if result.val_accuracy is not None:
        lines.append(f"val acc {result.val_accuracy:.3f} (held out of the training images; the schedule's guide)")
    if result.compile_seconds is not None:
        lines.append(f"torch.compile: the first step took {result.compile_seconds:.1f} s (not in examples/sec)")
    if result.skipped_steps:
        lines.append(f"{result.skipped_steps} step(s) skipped for non-finite values")
    if result.overflow_steps:
        lines.append(
            f"{result.overflow_steps} step(s) skipped by fp16's loss scaler (the scaled gradients overflowed; routine)"
        )
    if result.checkpoint:
        lines.append(f"checkpoint: {result.checkpoint}")
    return lines


def render_run_summary(result) -> None:
    for line in summary_lines(result):
        console().print(line)
