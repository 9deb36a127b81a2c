"""The placements' names, without torch: the command line offers them as choices before
it imports anything heavy. What each one means is :mod:`.layout`'s docstring."""

from __future__ import annotations

__all__ = ["DEFAULT_TIMEOUT_S", "PLACEMENTS", "PRECISIONS", "TWO_TOWER_PLACEMENTS"]

TWO_TOWER_PLACEMENTS = ("towers", "grouped", "split", "ranks")
PLACEMENTS = ("auto", *TWO_TOWER_PLACEMENTS, "single")

# Process-group timeout: how long a collective waits for a rank that died or hangs before
# the job fails (torch's own default is 30 min for gloo, 10 min for NCCL).
DEFAULT_TIMEOUT_S = 180.0

# Arithmetic of a step (:mod:`.precision`): float32 (the paper's), or autocast to bfloat16 or
# float16 with float32 weights.
PRECISIONS = ("fp32", "bf16", "fp16")
