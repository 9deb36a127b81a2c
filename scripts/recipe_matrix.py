"""Does every model x recipe that `alexnet2gpu train` accepts learn on Fashion-MNIST? Each
pair trains the full-width net for a few steps on the first images of the training set, on
this machine's CPU, then is evaluated on the whole test set; chance is 0.10:

    .venv/bin/python scripts/recipe_matrix.py [--steps 40] [--models dual,half] [--recipes d2l] [--json PATH]

Each row: mean training loss over the first and the last 10 steps, test accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from alexnet2gpu.train import RECIPES, TrainConfig, train

MODELS = ("dual", "half", "simplified", "torchvision")


def _losses(metrics: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if r["event"] == "step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=72)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: all)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated (default: all)")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args()
    rows = []
    print(f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}, {args.steps} steps of {args.batch_size}")
    for model in args.models.split(","):
        for recipe in args.recipes.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                metrics = Path(tmp) / "metrics.jsonl"
                started = time.perf_counter()
                result = train(
                    TrainConfig(
                        model=model,
                        recipe=recipe,
                        image_size=args.image_size,
                        train_subset=args.steps * args.batch_size,
                        batch_size=args.batch_size,
                        steps=args.steps,
                        threads=args.threads,
                        metrics=str(metrics),
                    )
                )
                losses = _losses(metrics)
            row = {
                "model": model,
                "recipe": recipe,
                "loss_first_10": sum(losses[:10]) / 10,
                "loss_last_10": sum(losses[-10:]) / 10,
                "test_accuracy": result.test_accuracy,
                "seconds": time.perf_counter() - started,
            }
            rows.append(row)
            print(
                f"{model:12s} {recipe:6s} loss {row['loss_first_10']:.3f} -> {row['loss_last_10']:.3f}  "
                f"test accuracy {row['test_accuracy']:.3f}  ({row['seconds']:.0f} s)",
                flush=True,
            )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
