"""The placements' names, without torch: the command line offers them as choices before
it imports anything heavy. What each one means is :mod:`.layout`'s docstring."""

from __future__ import annotations

__all__ = ["PLACEMENTS", "TWO_TOWER_PLACEMENTS"]

TWO_TOWER_PLACEMENTS = ("towers", "grouped", "split", "ranks")
PLACEMENTS = ("auto", *TWO_TOWER_PLACEMENTS, "single")
