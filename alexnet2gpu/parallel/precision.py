"""How a step's arithmetic runs, decided in one place: the precision (``torch.autocast``
and, for float16, ``torch.amp.GradScaler``), the memory format, and the backends' numerics
switches (``cudnn.benchmark``, TF32) that every JSON record carries.

Mixed precision here is PyTorch's automatic mixed precision: the weights, their gradients
and the optimizer state stay float32; inside ``autocast`` the convolutions and matmuls run
in the low precision, so most activations autograd saves for the backward are bfloat16 or
float16. The LRN computes in float32 and returns the input's dtype
(:func:`alexnet2gpu.models.layers.local_response_norm`). float16's five exponent bits
underflow small gradients: its loss is scaled (``GradScaler``), bfloat16's is not (it has
float32's exponent range).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .names import PRECISIONS

__all__ = ["DTYPES", "FP32", "PRECISIONS", "Numerics", "numerics_record"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Numerics:
    """The precision and memory format of a step. ``cudnn_benchmark``: None leaves torch's
    setting as it is; True/False sets it (:meth:`apply`)."""

    precision: str = "fp32"
    channels_last: bool = False
    cudnn_benchmark: bool | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision '{self.precision}': choose {', '.join(PRECISIONS)}")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype autocast computes in (float32 for ``fp32``: no autocast)."""
        return DTYPES[self.precision]

    @property
    def mixed(self) -> bool:
        return self.precision != "fp32"

    @property
    def scaled(self) -> bool:
        """float16 scales its loss (GradScaler); bfloat16 and float32 do not."""
        return self.precision == "fp16"

    def autocast(self, devices):
        """The context a forward pass and its loss run in: ``torch.autocast`` in the low
        precision on each device type among ``devices`` (a device, a type name, or several:
        ``split`` on ``cuda:0,cpu`` casts on both), or nothing for ``fp32``."""
        if not self.mixed:
            return contextlib.nullcontext()
        if isinstance(devices, (str, torch.device)):
            devices = [devices]
        types = dict.fromkeys(torch.device(d).type for d in devices)
        stack = contextlib.ExitStack()
        for device_type in types:
            if device_type == "meta":
                continue
            stack.enter_context(torch.autocast(device_type=device_type, dtype=self.dtype))
        return stack

    def grad_scaler(self, device_type: str) -> torch.amp.GradScaler:
        """A ``GradScaler`` enabled for ``fp16`` only (disabled it passes everything through)."""
        return torch.amp.GradScaler(device_type, enabled=self.scaled)

    def format_model(self, module: nn.Module) -> nn.Module:
        """``module`` in channels-last memory format where asked (in place), else as it is."""
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def format_input(self, x: torch.Tensor) -> torch.Tensor:
        """A 4-d batch in the step's memory format."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def apply(self) -> None:
        """Sets ``torch.backends.cudnn.benchmark`` where this says to (None: unchanged)."""
        if self.cudnn_benchmark is not None:
            torch.backends.cudnn.benchmark = self.cudnn_benchmark

    def record(self) -> dict:
        """What every JSON record carries: this step's settings and torch's switches as they are."""
        return {"precision": self.precision, **numerics_record(self.channels_last)}


def numerics_record(channels_last: bool = False) -> dict:
    """The memory format, cudnn.benchmark and TF32 settings in force now."""
    return {
        "memory_format": "channels_last" if channels_last else "contiguous",
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


FP32 = Numerics()  # the paper's arithmetic, and every command's default
