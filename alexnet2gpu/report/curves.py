"""The seed's figure: train loss, train accuracy and test accuracy against epoch (d2l's
``train_ch6`` animator), as a PNG rewritten atomically after each evaluation so that a
person can watch a long run. matplotlib is imported here only."""

from __future__ import annotations

import io
import os

from ..io.atomic import write_atomic

__all__ = ["write_curves"]


def write_curves(path: str | os.PathLike, curve: list[dict], title: str = "") -> None:
    """Draws ``curve`` (points ``{"epoch", "train_loss", "train_accuracy", "test_accuracy"}``)
    and replaces ``path`` with it atomically."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    epochs = [p["epoch"] for p in curve]
    figure, axes = plt.subplots(figsize=(5.5, 3.8))
    axes.plot(epochs, [p["train_loss"] for p in curve], "-", marker="o", ms=3, label="train loss")
    axes.plot(epochs, [p["train_accuracy"] for p in curve], "--", marker="o", ms=3, label="train acc")
    axes.plot(epochs, [p["test_accuracy"] for p in curve], "-.", marker="o", ms=3, label="test acc")
    axes.set_xlabel("epoch")
    axes.set_xlim(0, max(epochs + [1.0]))
    axes.grid(True, alpha=0.3)
    axes.legend()
    if title:
        axes.set_title(title, fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    write_atomic(path, lambda f: f.write(buffer.getvalue()))
