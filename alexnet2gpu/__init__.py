"""alexnet2gpu: the original two-GPU AlexNet (2012) in PyTorch, beside the simplified
single-stream net that textbooks teach.

    >>> from alexnet2gpu import build_model, place
    >>> model = build_model("dual")            # 60,965,224 parameters, 3x227, 1000 classes
    >>> placed = place(model, "auto")          # split on 2 GPUs, else grouped on one device
    >>> placed.layout.placement, placed.layout.reason
"""

from .errors import Alexnet2gpuError, ConfigError
from .models import (
    MODEL_NAMES,
    build_model,
    from_grouped_state_dict,
    seed_dropout,
    smallest_image_size,
    to_grouped_state_dict,
)
from .parallel import PLACEMENTS, Layout, place

__all__ = [
    "MODEL_NAMES",
    "PLACEMENTS",
    "Alexnet2gpuError",
    "ConfigError",
    "Layout",
    "build_model",
    "from_grouped_state_dict",
    "place",
    "seed_dropout",
    "smallest_image_size",
    "to_grouped_state_dict",
]

__version__ = "0.1.0"
