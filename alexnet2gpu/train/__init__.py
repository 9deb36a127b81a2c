"""Training, one module per job:

* :mod:`.config`: :class:`TrainConfig`, the recipes and the records a run reports;
* :mod:`.build`: the layout (resolved once), the data, the net (in its memory format), its
  numerics (precision, fp16's loss scaler), optimizer and schedule;
* :mod:`.loop`: the loop itself, :func:`train`; :mod:`.sync`, its reads of the device;
  :mod:`.evaluation`, its validation and test passes;
* :mod:`.records`: the records a run reports (a step, an evaluation, the summary);
* :mod:`.checkpointing`: what a checkpoint holds and how it goes back into any placement;
* :mod:`.metrics`: the metrics JSONL and the running means;
* :mod:`.faults`: non-finite values, dead or hung ranks, and test-only fault injection.

A new recipe: one entry in :data:`.config.RECIPES`, each constant cited, and its name in
:data:`.names.RECIPE_NAMES` (the command line's choices, without torch).

Importing this package loads no torch: its names load on first use (PEP 562).
"""

from .._lazy import lazy_getattr

# Loaded, with torch, on first use: submodule -> the names it gives this package.
_LAZY = {
    ".config": ("RECIPES", "Recipe", "TrainConfig", "TrainResult"),
    ".loop": ("train",),
}
__getattr__ = lazy_getattr(__name__, _LAZY)
__all__ = ["RECIPES", "Recipe", "TrainConfig", "TrainResult", "train"]
