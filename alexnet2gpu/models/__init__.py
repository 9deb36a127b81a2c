"""The networks, as plain ``nn.Module``s with no device inside (where they run is
:mod:`alexnet2gpu.parallel`'s job):

* ``dual``: the 2012 two-tower AlexNet and its schedule (:mod:`.dual`);
* ``simplified``, ``half``, ``torchvision``: the single-stream nets (:mod:`.single`);
* :mod:`.layers`: LRN with a closed-form backward, conv1's padding, per-tower dropout;
* :mod:`.init`: the paper's, the released config's and d2l's initialisations;
* :mod:`.convert`: the lossless grouped (Caffe) parameter layout;
* :mod:`.names`: the names and default inputs, without torch (the command line's choices).

A new model: a module in :mod:`.single` (or a file beside it), one line in ``_builders``
and one in ``names.DEFAULTS``.

Importing this package loads no torch: the nets load on first use of one of their names
(PEP 562's module ``__getattr__``), so ``alexnet2gpu --help`` answers at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .._lazy import lazy_getattr
from ..errors import ConfigError
from .names import DEFAULTS, INIT_NAMES, MODEL_NAMES

if TYPE_CHECKING:
    from torch import nn

# Loaded, with torch, on first use: submodule -> the names it gives this package.
_LAZY = {
    ".convert": ("from_grouped_state_dict", "to_grouped_state_dict"),
    ".dual": ("DualAlexNet", "Tower"),
    ".init": ("INITS", "init_cfg_", "init_paper_", "init_xavier_", "initialise_"),
    ".layers": ("TowerDropout", "seed_dropout"),
    ".single": ("HalfAlexNet", "SimplifiedAlexNet"),
    ".sizes": ("smallest_image_size",),
}
__getattr__ = lazy_getattr(__name__, _LAZY)
__all__ = [
    "DEFAULTS",
    "INITS",
    "INIT_NAMES",
    "MODEL_NAMES",
    "DualAlexNet",
    "HalfAlexNet",
    "SimplifiedAlexNet",
    "Tower",
    "TowerDropout",
    "build_model",
    "from_grouped_state_dict",
    "init_cfg_",
    "init_paper_",
    "init_xavier_",
    "initialise_",
    "is_two_tower",
    "seed_dropout",
    "smallest_image_size",
    "to_grouped_state_dict",
]


def _builders() -> dict[str, Callable[..., nn.Module]]:
    from .dual import DualAlexNet
    from .single import HalfAlexNet, SimplifiedAlexNet, build_torchvision_alexnet

    return {
        "dual": DualAlexNet,
        "half": HalfAlexNet,
        "simplified": SimplifiedAlexNet,
        "torchvision": build_torchvision_alexnet,
    }


def is_two_tower(model: nn.Module) -> bool:
    """True for the two-tower net, which the placements can split."""
    from .dual import DualAlexNet

    return isinstance(model, DualAlexNet)


def build_model(
    name: str,
    *,
    in_channels: int | None = None,
    num_classes: int | None = None,
    image_size: int | None = None,
    width: float = 1.0,
    dropout: float = 0.5,
) -> nn.Module:
    """Builds one of ``MODEL_NAMES``; ``None`` takes that model's default
    (``dual``/``half``/``torchvision``: 3x227, 1000 classes; ``simplified``: 1x224, 10)."""
    if name not in DEFAULTS:
        raise ConfigError(f"unknown model '{name}': choose one of {', '.join(MODEL_NAMES)}")
    c, k, s = DEFAULTS[name]
    in_channels = c if in_channels is None else in_channels
    num_classes = k if num_classes is None else num_classes
    image_size = s if image_size is None else image_size
    for label, value in (("in_channels", in_channels), ("num_classes", num_classes), ("image_size", image_size)):
        if value < 1:
            raise ConfigError(f"{label} must be at least 1, got {value}")
    if not width > 0:
        raise ConfigError(f"width must be positive, got {width}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
    return _builders()[name](
        in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width, dropout=dropout
    )
