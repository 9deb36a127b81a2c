"""Training, one module per job:

* :mod:`.config`: :class:`TrainConfig`, the recipes and the records a run reports;
* :mod:`.build`: the layout (resolved once), the data, the net, optimizer and schedule;
* :mod:`.loop`: the loop itself, :func:`train`;
* :mod:`.checkpointing`: what a checkpoint holds and how it goes back into any placement;
* :mod:`.metrics`: the metrics JSONL and the running means;
* :mod:`.faults`: non-finite values, dead or hung ranks, and test-only fault injection.

A new recipe: one entry in :data:`.config.RECIPES`, each constant cited.
"""

from .config import RECIPES, Recipe, TrainConfig, TrainResult
from .loop import train

__all__ = ["RECIPES", "Recipe", "TrainConfig", "TrainResult", "train"]
