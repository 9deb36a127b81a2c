"""Forward + backward time of the project's LRN against nn.LocalResponseNorm on the CPU,
on conv1's output of one tower at batch 64 ([64, 48, 55, 55], the paper's constants), one
thread, the two interleaved (so other load falls on both alike), median of the repeats:

    .venv/bin/python scripts/lrn_speed.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from alexnet2gpu.models.layers import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE, LocalResponseNorm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x0 = (torch.randn(64, 48, 55, 55) * 30).relu_()  # ReLU outputs at conv1's scale on 0-255 inputs
    dy = torch.randn_like(x0)
    layers = {
        "alexnet2gpu LocalResponseNorm": LocalResponseNorm(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K),
        "nn.LocalResponseNorm": nn.LocalResponseNorm(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K),
    }
    seconds: dict[str, list[float]] = {name: [] for name in layers}
    for repeat in range(args.repeats + 1):  # the first round is a warm-up
        for name, layer in layers.items():
            x = x0.clone().requires_grad_()
            started = time.perf_counter()
            layer(x).backward(dy)
            if repeat:
                seconds[name].append(time.perf_counter() - started)
    ours, reference = (statistics.median(seconds[name]) for name in layers)
    print(f"forward + backward, [64, 48, 55, 55], 1 thread, median of {args.repeats}; load {os.getloadavg()[0]:.2f}")
    for name in layers:
        print(f"  {name:30s} {statistics.median(seconds[name]) * 1000:7.1f} ms")
    print(f"  speed-up {reference / ours:.2f}x")


if __name__ == "__main__":
    main()
