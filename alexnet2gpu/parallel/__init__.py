"""Where the nets run: a :class:`~.layout.Layout` decided in one place, and one
:func:`~.place.place` call that returns the module to call.

* :mod:`.layout`: placements, devices, ``auto``, torchrun's ranks -> (replica, tower);
* :mod:`.schedule`: what every placed two-tower net shares (the schedule itself is
  :func:`alexnet2gpu.models.dual.run_towers`);
* :mod:`.grouped`, :mod:`.split`, :mod:`.ranks`: each supplies only its exchange;
* :mod:`.replicas` (data parallel, DDP) and :mod:`.hybrid` (Krizhevsky 2014: conv trunk data
  parallel, fc6-fc8 tensor parallel): every net's whole trunk on every process;
* :mod:`.traffic`: bytes sent at the collectives, counted and in closed form;
* :mod:`.distributed`: process groups, the store, which rank stopped;
* :mod:`.state`: the full state dict in every placement;
* :mod:`.loss`: the loss, computed once, on the device that holds fc8;
* :mod:`.precision`: a step's precision (autocast, GradScaler), memory format, numerics switches;
* :mod:`.names`: the placements' and precisions' names, without torch (the command line's choices).

Importing this package loads no torch: the rest loads on first use of one of its names
(PEP 562's module ``__getattr__``), so ``alexnet2gpu --help`` answers at once.
"""

import sys
import types

from .._lazy import lazy_getattr
from .names import PLACEMENTS, PRECISIONS, PROCESS_PLACEMENTS, SINGLE_STREAM_PLACEMENTS, TWO_TOWER_PLACEMENTS

# Loaded, with torch, on first use: submodule -> the names it gives this package.
_LAZY = {
    ".distributed": ("DEFAULT_TIMEOUT_S", "close_distributed", "init_distributed"),
    ".devices": ("check_available", "default_device", "parse_devices", "set_cpu_threads"),
    ".layout": ("Layout", "TorchrunEnv", "own_forward_placement", "resolve_layout"),
    ".loss": ("forward_loss",),
    ".place": ("devices_of", "place"),
    ".precision": ("DTYPES", "FP32", "Numerics", "numerics_record"),
    ".schedule": ("ExchangeCounter",),
    ".state": ("full_gradients", "full_state_dict", "load_full_state_dict"),
    ".traffic": ("CollectiveCounter", "count_collectives", "hybrid_bytes", "replicas_bytes", "towers_bytes"),
}
__getattr__ = lazy_getattr(__name__, _LAZY)
__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DTYPES",
    "FP32",
    "PLACEMENTS",
    "PRECISIONS",
    "PROCESS_PLACEMENTS",
    "SINGLE_STREAM_PLACEMENTS",
    "TWO_TOWER_PLACEMENTS",
    "CollectiveCounter",
    "ExchangeCounter",
    "Layout",
    "Numerics",
    "TorchrunEnv",
    "close_distributed",
    "count_collectives",
    "default_device",
    "devices_of",
    "forward_loss",
    "full_gradients",
    "full_state_dict",
    "hybrid_bytes",
    "init_distributed",
    "load_full_state_dict",
    "numerics_record",
    "own_forward_placement",
    "parse_devices",
    "place",
    "replicas_bytes",
    "resolve_layout",
    "towers_bytes",
]


class _Package(types.ModuleType):
    """Loading the submodule :mod:`.place` binds it on this package under its name (the
    import system does that); ``place`` stays the function, as with an eager import."""

    def __setattr__(self, name: str, value) -> None:
        if name == "place" and isinstance(value, types.ModuleType):
            value = value.place
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
