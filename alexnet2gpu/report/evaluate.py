"""`evaluate`'s output: a terminal table (top-1, top-5, per-class accuracy) and the
confusion matrix as a PNG (class names on both axes, the image count in every cell, the
colour of each cell its share of its row: what fraction of a true class went where).
matplotlib is imported inside :func:`write_confusion_png` only."""

from __future__ import annotations

import io
import os

from rich.table import Table

from ..checks.evaluate import EvaluationRecord
from ..io.atomic import write_atomic
from . import console, fmt_int

__all__ = ["render_evaluation", "write_confusion_png"]

# Past this many classes (ImageNet's 1,000) the table lists the worst classes only, and the
# PNG draws the matrix without names or counts at a fixed size: a cell per class and a
# count per cell would make a 1000x1000-text figure tens of thousands of pixels wide.
MAX_NAMED_CLASSES = 30


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f} %"


def _headline(record: EvaluationRecord) -> str:
    crops = "10 crops (softmax averaged)" if record.crops == 10 else "single crop"
    top = "top-5" if record.top_k == 5 else f"top-{record.top_k} (all {record.top_k} classes)"
    return (
        f"[bold]top-1 {record.top1:.4f}[/]   {top} {record.top5:.4f}   on {fmt_int(record.images)} "
        f"{record.split} images, {crops}"
    )


def render_evaluation(record: EvaluationRecord) -> None:
    """The header (checkpoint, net, where it ran, data), the headline accuracies and the
    per-class table."""
    out = console()
    step = f" (step {record.step})" if record.step is not None else ""
    out.print(f"checkpoint {record.checkpoint}{step}")
    out.print(
        f"net {record.model}, width {record.width:g}, {record.in_channels}x{record.image_size} px, "
        f"recipe {record.recipe} (pixels {record.pixels}); {record.placement} on {record.device}, "
        f"batch {record.batch_size}"
    )
    out.print(f"data {record.data}")
    for note in record.notes:
        out.print(f"note: {note}")
    out.print(_headline(record))
    if record.single_crop is not None:
        out.print(
            f"centre crop alone: top-1 {record.single_crop['top1']:.4f}   "
            f"top-{record.top_k} {record.single_crop['top5']:.4f}"
        )
    rows = list(enumerate(record.per_class))
    title = f"per class ({record.split} split)"
    if len(rows) > MAX_NAMED_CLASSES:
        rows = sorted(rows, key=lambda row: (row[1].accuracy is None, row[1].accuracy or 0.0))[:MAX_NAMED_CLASSES]
        total = fmt_int(len(record.per_class))
        title = f"the {MAX_NAMED_CLASSES} least accurate of {total} classes ({record.split} split; all in the JSON)"
    table = Table(title=title, title_justify="left")
    table.add_column("class")
    table.add_column("images", justify="right")
    table.add_column("correct", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("most often mistaken for")
    for i, c in rows:
        table.add_row(c.name, fmt_int(c.images), fmt_int(c.correct), _pct(c.accuracy), _worst_confusion(record, i))
    out.print(table)
    out.print(f"{record.seconds:.1f} s")


def _worst_confusion(record: EvaluationRecord, row: int) -> str:
    """The class that the images of class ``row`` were most often predicted as, wrongly."""
    counts = [(n, j) for j, n in enumerate(record.confusion[row]) if j != row and n > 0]
    if not counts:
        return ""
    n, j = max(counts)
    return f"{record.classes[j]} ({fmt_int(n)})"


def write_confusion_png(path: str | os.PathLike, record: EvaluationRecord) -> None:
    """The confusion matrix (rows: true class, columns: predicted) as a PNG at ``path``,
    written atomically: counts in the cells, colour the row-normalised share."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    n = len(record.classes)
    named = n <= MAX_NAMED_CLASSES
    shares = [[count / (sum(row) or 1) for count in row] for row in record.confusion]
    side = max(4.5, 0.55 * n + 2.5) if named else 10.0
    figure, axes = plt.subplots(figsize=(side + 1.2, side))
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class's images")
    fontsize = 8 if n <= 12 else max(3, 8 - (n - 12) // 4)
    for i, row in enumerate(record.confusion if named else []):
        for j, count in enumerate(row):
            if count or i == j:
                colour = "white" if shares[i][j] > 0.55 else "black"
                axes.text(j, i, fmt_int(count), ha="center", va="center", fontsize=fontsize, color=colour)
    if named:
        axes.set_xticks(range(n), record.classes, rotation=45, ha="right", fontsize=fontsize + 1)
        axes.set_yticks(range(n), record.classes, fontsize=fontsize + 1)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    crops = ", 10 crops" if record.crops == 10 else ""
    step = f", step {record.step}" if record.step is not None else ""
    axes.set_title(
        f"{record.model}{step}: {record.split} top-1 {record.top1:.4f}, top-{record.top_k} {record.top5:.4f}"
        f"\n{fmt_int(record.images)} images{crops}; colour: share of the row",
        fontsize=9,
    )
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    write_atomic(path, lambda f: f.write(buffer.getvalue()))
