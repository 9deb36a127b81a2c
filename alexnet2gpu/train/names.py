"""The names a training run is configured with, without torch: the command line offers
them as choices before it imports anything heavy. What each one means is in :mod:`.config`."""

from __future__ import annotations

__all__ = ["NONFINITE_POLICIES", "RECIPE_NAMES", "SCHEDULES", "SYNC_EVERY_STEPS"]

RECIPE_NAMES = ("paper", "d2l")  # the keys of config.RECIPES
SCHEDULES = ("plateau", "constant", "cosine")  # how the learning rate moves
NONFINITE_POLICIES = ("stop", "skip")  # a NaN/inf loss or gradient: stop the run, or skip that step

# Steps between two host reads of the loss, accuracy and non-finite flags. Each read waits
# for the device's queue (a host sync), so on a GPU the loop reads once per interval, as
# nanoGPT reads its loss once per log_interval; checkpoints, evaluations, signals and the
# run's end read at once. `--on-nonfinite skip` reads every step: it must know before the
# optimizer steps.
SYNC_EVERY_STEPS = 10
