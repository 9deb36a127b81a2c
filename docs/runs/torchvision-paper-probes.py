"""The probes behind the refusal of --model torchvision --recipe paper on Fashion-MNIST
(docs/results.md, "Every model and recipe"): the settings scripts/recipe_matrix.py uses
(72 px, 40 steps of 64, one thread), with the smaller lr, Xavier weights, or d2l with
momentum. Run 15:59-16:05 UTC beside two training runs: .venv/bin/python docs/runs/torchvision-paper-probes.py
"""

import json
import tempfile
from pathlib import Path

from alexnet2gpu.errors import Alexnet2gpuError
from alexnet2gpu.train import TrainConfig, train

for kw in [dict(lr=0.001), dict(init="xavier"), dict(recipe="d2l", momentum=0.9)]:
    with tempfile.TemporaryDirectory() as tmp:
        m = Path(tmp) / "m.jsonl"
        try:
            r = train(
                TrainConfig(
                    **{
                        **dict(
                            model="torchvision",
                            image_size=72,
                            train_subset=2560,
                            batch_size=64,
                            steps=40,
                            threads=1,
                            metrics=str(m),
                        ),
                        **kw,
                    }
                )
            )
            losses = [x["loss"] for x in map(json.loads, m.read_text().splitlines()) if x["event"] == "step"]
            print(kw, f"{sum(losses[:10]) / 10:.3f} -> {sum(losses[-10:]) / 10:.3f}", r.test_accuracy, flush=True)
        except Alexnet2gpuError as e:
            print(kw, "ERROR", e, flush=True)
