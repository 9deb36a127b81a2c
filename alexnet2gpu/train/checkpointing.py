"""What a training checkpoint holds beyond the weights: every random stream, captured and
restored by name so that a resumed run continues bit for bit.

RNG state. :func:`capture_rng_state` returns the torch CPU generator, every CUDA
generator (when CUDA is available), Python's ``random`` and each
:class:`~alexnet2gpu.models.TowerDropout` generator with its seed, keyed by module name
(``tower_a.dropout``...), which is the same in every placement. NumPy's generator is not
captured: nothing here draws from it. Under the ``ranks`` placement each process holds
only its own tower's generator: gather the ``"dropout"`` entries of both tower ranks into
one dict before rank 0 saves; :func:`restore_rng_state` restores the towers a process holds.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch
from torch import nn

from ..models import TowerDropout

__all__ = ["capture_rng_state", "restore_rng_state"]

log = logging.getLogger("alexnet2gpu")


def _dropouts(model: nn.Module) -> dict[str, tuple[TowerDropout, torch.device]]:
    """Each TowerDropout by name, with the device of its tower's parameters (where its
    activations, and so its generator, live)."""
    found = {}
    parents = dict(model.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, TowerDropout):
            parent = parents[name.rpartition(".")[0]] if "." in name else model
            param = next(parent.parameters(), None)
            found[name] = (module, param.device if param is not None else torch.device("cpu"))
    return found


def capture_rng_state(model: nn.Module) -> dict[str, Any]:
    """Every random stream a training step draws from, as a dict ``weights_only`` loads."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "dropout": {},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for name, (module, _) in _dropouts(model).items():
        generator = module.generator
        state["dropout"][name] = {
            "seed": module.seed,
            "device": str(generator.device) if generator is not None else None,
            "state": generator.get_state() if generator is not None else None,
        }
    return state


def restore_rng_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Puts back what :func:`capture_rng_state` captured. A dropout generator that had been
    created is re-created on its tower's current device and given its saved state; one
    that had not stays lazy (created from its seed on first use, as in an unbroken run).
    A state saved on another kind of device (CUDA vs CPU generators differ) cannot be
    continued: that generator restarts from its seed, with a warning."""
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "checkpoint holds %d CUDA generator states, this machine has %d devices: CUDA generators not restored",
                len(cuda),
                torch.cuda.device_count(),
            )
    saved = state.get("dropout", {})
    for name, (module, device) in _dropouts(model).items():
        if name not in saved:
            log.warning("checkpoint holds no dropout generator for %s: it starts from its seed", name)
            continue
        entry = saved[name]
        module.seed = int(entry["seed"])
        module.generator = None
        if entry["state"] is None or device.type == "meta":
            continue
        if torch.device(entry["device"]).type != device.type:
            log.warning(
                "dropout generator %s was saved on %s and now runs on %s: it restarts from its seed",
                name,
                entry["device"],
                device,
            )
            continue
        generator = torch.Generator(device=device)
        generator.set_state(entry["state"])
        module.generator = generator
