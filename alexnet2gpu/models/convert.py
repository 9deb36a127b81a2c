"""Lossless conversion between the two-tower parameter layout and the grouped
single-stream layout under Caffe's names (``bvlc_alexnet``: conv1 ... fc8).

Tower a is group 0: the first half of every output dimension. The inputs of conv3, fc6,
fc7 and fc8 are ordered tower a first, then tower b (fc6 flattened C x H x W in PyTorch's
order), which is how ``torch.cat`` joins the towers at the exchanges, so no input
dimension needs reordering. Shapes at width 1 (DESIGN.md section 2): conv1 [96,3,11,11],
conv2 [256,48,5,5], conv3 [384,256,3,3], conv4 [384,192,3,3], conv5 [256,192,3,3],
fc6 [4096,9216], fc7 [4096,4096], fc8 [1000,4096].
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["to_grouped_state_dict", "from_grouped_state_dict", "TOWER_LAYERS"]

TOWER_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")
_PARAMS = ("weight", "bias")


def to_grouped_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tower layout (``tower_a.conv1.weight`` ...) -> Caffe layout (``conv1.weight`` ...)."""
    grouped = {}
    for layer in TOWER_LAYERS:
        for param in _PARAMS:
            a, b = (state_dict[f"tower_{t}.{layer}.{param}"] for t in "ab")
            grouped[f"{layer}.{param}"] = torch.cat([a, b])
    for param in _PARAMS:
        grouped[f"fc8.{param}"] = state_dict[f"fc8.{param}"]
    return grouped


def from_grouped_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Caffe layout -> tower layout; the inverse of :func:`to_grouped_state_dict`."""
    towers = {}
    for layer in TOWER_LAYERS:
        for param in _PARAMS:
            whole = state_dict[f"{layer}.{param}"]
            if whole.shape[0] % 2:
                raise ValueError(f"{layer}.{param} has {whole.shape[0]} outputs: not two equal towers")
            a, b = whole.chunk(2)
            towers[f"tower_a.{layer}.{param}"] = a.clone()
            towers[f"tower_b.{layer}.{param}"] = b.clone()
    for param in _PARAMS:
        towers[f"fc8.{param}"] = state_dict[f"fc8.{param}"]
    return towers
