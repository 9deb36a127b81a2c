"""A CUDA out-of-memory error as one line that names the device, the batch, and the
largest batch the memory estimate says would fit. ``bench`` and ``memory`` both raise it."""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import Alexnet2gpuError
from ..parallel import FP32, Numerics
from .estimate import largest_batch_that_fits

__all__ = ["out_of_memory_error"]

GiB = 1024**3


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.2f} MiB"


def _oom_device(error: BaseException, placed: nn.Module) -> tuple[str, int]:
    """The device named in a CUDA OOM message ("GPU 1 has a total capacity ..."), and its
    slot in the placement; else the first CUDA device in use."""
    layout = placed.layout
    devices = list(layout.devices)
    match = re.search(r"GPU (\d+)", str(error))
    if match:
        device = torch.device("cuda", int(match.group(1)))
    else:
        device = next((d for d in devices if d.type == "cuda"), devices[0])
    slot = devices.index(device) if device in devices else 0
    if layout.distributed:
        slot = layout.tower  # tower t's process ~ split's device t
    return str(device), slot


def _capacity(error: BaseException, device: str) -> int | None:
    """Total memory of the device: from the OOM message, else from CUDA."""
    match = re.search(r"total capacity of ([\d.]+) (GiB|MiB|KiB)", str(error))
    if match:
        scale = {"GiB": GiB, "MiB": 1024**2, "KiB": 1024}[match.group(2)]
        return int(float(match.group(1)) * scale)
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return None


def out_of_memory_error(
    error: BaseException,
    model_name: str,
    placed: nn.Module,
    batch_size: int,
    mode: str,
    *,
    model_kwargs: dict | None = None,
    numerics: Numerics = FP32,
) -> Alexnet2gpuError:
    """A one-line error for a CUDA out-of-memory: the device, the batch size, and the
    largest batch the memory estimate says would fit (for a training step)."""
    device, slot = _oom_device(error, placed)
    what = f"{model_name}/{placed.layout.placement}, {mode}"
    capacity = _capacity(error, device)
    if capacity is None:
        return Alexnet2gpuError(
            f"out of memory on {device} at batch size {batch_size} ({what}); its capacity is unknown: "
            "try a smaller batch size"
        )
    fits, fixed, per_image = largest_batch_that_fits(
        model_name, placed.layout, capacity, slot, numerics=numerics, **(model_kwargs or {})
    )
    advice = (
        f"use a batch size of at most {fits}"
        if fits >= 1
        else "the model alone does not fit: use a smaller --width or more devices"
    )
    return Alexnet2gpuError(
        f"out of memory on {device} at batch size {batch_size} ({what}): the memory estimate says "
        f"batch {fits} is the largest that fits in its {_size(capacity)} "
        f"({_size(fixed)} fixed + {_size(per_image)} per image); {advice}"
    )
