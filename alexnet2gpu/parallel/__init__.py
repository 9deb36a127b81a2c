"""Where the nets run: a :class:`~.layout.Layout` decided in one place, and one
:func:`~.place.place` call that returns the module to call.

* :mod:`.layout`: placements, devices, ``auto``, torchrun's ranks -> (replica, tower);
* :mod:`.schedule`: what every placed two-tower net shares (the schedule itself is
  :func:`alexnet2gpu.models.dual.run_towers`);
* :mod:`.grouped`, :mod:`.split`, :mod:`.ranks`: each supplies only its exchange;
* :mod:`.distributed`: process groups, the store, which rank stopped;
* :mod:`.state`: the full state dict in every placement;
* :mod:`.loss`: the loss, computed once, on the device that holds fc8.
"""

from .distributed import DEFAULT_TIMEOUT_S, close_distributed, init_distributed
from .layout import (
    PLACEMENTS,
    TWO_TOWER_PLACEMENTS,
    Layout,
    TorchrunEnv,
    default_device,
    own_forward_placement,
    parse_devices,
    resolve_layout,
)
from .loss import forward_loss
from .place import devices_of, place
from .schedule import ExchangeCounter
from .state import full_state_dict, load_full_state_dict

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "PLACEMENTS",
    "TWO_TOWER_PLACEMENTS",
    "ExchangeCounter",
    "Layout",
    "TorchrunEnv",
    "close_distributed",
    "default_device",
    "devices_of",
    "forward_loss",
    "full_state_dict",
    "init_distributed",
    "load_full_state_dict",
    "own_forward_placement",
    "parse_devices",
    "place",
    "resolve_layout",
]
