"""Draws docs/runs/precision-simplified-72px-steps.png: the training loss and accuracy of
each step (mean of 20-step windows) of the fp32, bf16 and fp16 runs, read from their
metrics records (docs/runs/precision-{fp32,bf16,fp16}-simplified-72px.jsonl). Run from the
repository root: .venv/bin/python docs/runs/precision-simplified-72px-steps.py"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RUNS = Path(__file__).resolve().parent
WINDOW = 20

fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
for precision in ("fp32", "bf16", "fp16"):
    events = [json.loads(line) for line in open(RUNS / f"precision-{precision}-simplified-72px.jsonl")]
    steps = [e for e in events if e["event"] == "step"]
    test = [e for e in events if e["event"] == "eval"][-1]["test_accuracy"]
    xs, losses, accs = [], [], []
    for start in range(0, len(steps), WINDOW):
        window = steps[start : start + WINDOW]
        xs.append(window[-1]["step"])
        losses.append(sum(e["loss"] for e in window) / len(window))
        accs.append(sum(e["accuracy"] for e in window) / len(window))
    label = f"{precision} (test {test:.3f})"
    ax_loss.plot(xs, losses, marker=".", label=label)
    ax_acc.plot(xs, accs, marker=".", label=label)
ax_loss.set(xlabel="step (batch 32)", ylabel=f"training loss, mean of {WINDOW} steps", title="loss")
ax_acc.set(xlabel="step (batch 32)", ylabel=f"training accuracy, mean of {WINDOW} steps", title="accuracy", ylim=(0, 1))
for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
fig.suptitle("simplified (width 0.25), Fashion-MNIST 72 px, 12,800 images, 1 epoch: fp32, bf16, fp16 (autocast)")
fig.tight_layout()
fig.savefig(RUNS / "precision-simplified-72px-steps.png", dpi=100)
