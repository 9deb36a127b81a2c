"""alexnet2gpu: the original two-GPU AlexNet (2012) in PyTorch, beside the simplified
single-stream net that textbooks teach.

    >>> from alexnet2gpu import build_model, place
    >>> model = build_model("dual")            # 60,965,224 parameters, 3x227, 1000 classes
    >>> placed = place(model, "auto")          # split on 2 GPUs, else grouped on one device
    >>> placed.layout.placement, placed.layout.reason

Importing the package loads no torch: the names load on first use (PEP 562), so the
command line parses, and refuses a bad flag, before it imports anything heavy.
"""

from ._lazy import lazy_getattr
from .errors import Alexnet2gpuError, ConfigError
from .models.names import MODEL_NAMES
from .parallel.names import PLACEMENTS

__version__ = "0.1.0"

# Loaded, with torch, on first use: subpackage -> the names it gives this package.
_LAZY = {
    ".models": (
        "build_model",
        "from_grouped_state_dict",
        "seed_dropout",
        "smallest_image_size",
        "to_grouped_state_dict",
    ),
    ".parallel": ("Layout", "place"),
}
__getattr__ = lazy_getattr(__name__, _LAZY)
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
