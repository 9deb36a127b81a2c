"""The names a training run is configured with, without torch: the command line offers
them as choices before it imports anything heavy. What each one means is in :mod:`.config`."""

from __future__ import annotations

__all__ = ["NONFINITE_POLICIES", "RECIPE_NAMES", "SCHEDULES"]

RECIPE_NAMES = ("paper", "d2l")  # the keys of config.RECIPES
SCHEDULES = ("plateau", "constant", "cosine")  # how the learning rate moves
NONFINITE_POLICIES = ("stop", "skip")  # a NaN/inf loss or gradient: stop the run, or skip that step
