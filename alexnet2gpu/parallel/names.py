"""The placements' names, without torch: the command line offers them as choices before
it imports anything heavy. What each one means is :mod:`.layout`'s docstring."""

from __future__ import annotations

__all__ = [
    "ANY_NET_PLACEMENTS",
    "DEFAULT_TIMEOUT_S",
    "PLACEMENTS",
    "PRECISIONS",
    "PROCESS_PLACEMENTS",
    "SINGLE_STREAM_PLACEMENTS",
    "TWO_TOWER_PLACEMENTS",
]

# Placements that split the two-tower net `dual` (and only it).
TWO_TOWER_PLACEMENTS = ("towers", "grouped", "split", "ranks")
# Placements of a single-stream net (simplified, half, torchvision): one device, data
# parallel, or the 2014 hybrid (data-parallel trunk, tensor-parallel fc6-fc8).
SINGLE_STREAM_PLACEMENTS = ("single", "replicas", "hybrid")
# Placements for every net: `replicas` holds the whole net (the fused grouped net for `dual`).
ANY_NET_PLACEMENTS = ("replicas",)
# Placements that run one process per device under torchrun.
PROCESS_PLACEMENTS = ("ranks", "replicas", "hybrid")
PLACEMENTS = ("auto", *TWO_TOWER_PLACEMENTS, *SINGLE_STREAM_PLACEMENTS)

# Process-group timeout: how long a collective waits for a rank that died or hangs before
# the job fails (torch's own default is 30 min for gloo, 10 min for NCCL).
DEFAULT_TIMEOUT_S = 180.0

# Arithmetic of a step (:mod:`.precision`): float32 (the paper's), or autocast to bfloat16 or
# float16 with float32 weights.
PRECISIONS = ("fp32", "bf16", "fp16")
