"""One :func:`place` call: a model in, the module to call out, with ``.layout`` saying
where it runs. The model's function never changes, but its parameters move: a placement
moves the towers to their devices (under ``ranks`` the tower another process holds goes to
the meta device, freeing it) and supplies the exchange (:mod:`.grouped` builds fused
parameters from the towers'; :mod:`.split`, :mod:`.ranks`), or wraps the whole net for
several processes (:mod:`.replicas`: DDP; :mod:`.hybrid`: a data-parallel trunk and
tensor-parallel fc6-fc8); every placed model keeps the parameter names of the net it was
given, so state dicts and checkpoints move freely between placements.

A new placement: a name in ``names.py`` (``TWO_TOWER_PLACEMENTS`` or
``SINGLE_STREAM_PLACEMENTS``) and its device count in ``layout.py``, a module that supplies
its exchange (a :class:`~.schedule.PlacedDual` subclass) or wraps the whole net, and one
entry in ``_PLACERS`` below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from ..models import is_two_tower
from .grouped import GroupedDualAlexNet
from .hybrid import place_hybrid
from .layout import Layout, resolve_layout
from .ranks import place_ranks
from .replicas import place_replicas
from .split import SplitDualAlexNet

__all__ = ["devices_of", "place"]


def _is_plan(model: nn.Module) -> bool:
    """A model on the meta device is a plan: placing it allocates nothing real."""
    return any(p.is_meta for p in model.parameters())


def _move(module: nn.Module, device: torch.device, plan: bool) -> nn.Module:
    # A plan is materialised uninitialised (as torchtitan does); under FakeTensorMode that
    # makes fake tensors on `device`, which need no such device to exist.
    return module.to_empty(device=device) if plan else module.to(device)


def _place_on_one_device(model: nn.Module, layout: Layout, plan: bool) -> nn.Module:
    return _move(model, layout.device, plan)


def _place_grouped(model: nn.Module, layout: Layout, plan: bool) -> nn.Module:
    return GroupedDualAlexNet(_move(model, layout.device, plan), layout)


def _place_split(model: nn.Module, layout: Layout, plan: bool) -> nn.Module:
    device_a, device_b = layout.devices
    _move(model.tower_a, device_a, plan)
    _move(model.tower_b, device_b, plan)
    _move(model.fc8, device_a, plan)
    return SplitDualAlexNet(model, layout)


def _place_ranks(model: nn.Module, layout: Layout, plan: bool) -> nn.Module:
    return place_ranks(model, layout)


_PLACERS: dict[str, Callable[[nn.Module, Layout, bool], nn.Module]] = {
    "single": _place_on_one_device,
    "towers": _place_on_one_device,  # DualAlexNet's own forward joins the towers with torch.cat
    "grouped": _place_grouped,
    "split": _place_split,
    "ranks": _place_ranks,
    "replicas": place_replicas,  # under torchrun: the whole net per process, DDP
    "hybrid": place_hybrid,  # under torchrun: conv trunk data parallel, fc6-fc8 tensor parallel
}


def place(model: nn.Module, placement: str | Layout = "auto", devices=None) -> nn.Module:
    """Places ``model`` and returns the module to call; its ``layout`` says where it runs.

    ``placement`` is a name (see :data:`~.layout.PLACEMENTS`) or a resolved
    :class:`~.layout.Layout`. ``devices`` is a list (or comma-separated string) of devices:
    one for ``towers``, ``grouped`` and ``single`` (default: the first GPU, else the CPU),
    two for ``split`` (default: cuda:0, cuda:1); under torchrun (``ranks``, ``replicas``,
    ``hybrid``) one for every process or one per local rank (default: ``cuda:LOCAL_RANK``,
    else the CPU), and the process group is joined here if it is not yet. ``auto`` chooses
    and says why in ``layout.reason`` (and the log). A model built on the meta device is a plan: it is
    materialised uninitialised, which under ``FakeTensorMode`` allocates nothing and needs
    none of the devices.
    """
    plan = _is_plan(model)
    two_tower = is_two_tower(model)
    if isinstance(placement, Layout):
        # The net decides whether the layout's net has two towers (``replicas`` runs both
        # kinds); a placement that does not fit the net is refused here.
        layout = placement if placement.two_towers == two_tower else replace(placement, two_tower_net=two_tower)
    else:
        layout = resolve_layout(placement, devices, two_tower=two_tower, plan=plan)
    placed = _PLACERS[layout.placement](model, layout, plan)
    placed.layout = layout
    _give_shape(placed)
    return placed


def _no_groups() -> None:
    """A placement in one process holds no process groups to release."""


def _give_shape(placed: nn.Module) -> None:
    """Every placed net answers the same questions, whatever the placement, so callers read
    attributes and never probe: ``layout``; ``exchange_counter``, the towers' exchanges
    (``split``, ``ranks``; else None); ``traffic``, the bytes at the collectives
    (``replicas``, ``hybrid``; else None); ``release_groups()``, letting its process groups
    go (a no-op in one process)."""
    for name in ("exchange_counter", "traffic"):
        if not hasattr(placed, name):
            setattr(placed, name, None)
    if not hasattr(placed, "release_groups"):
        placed.release_groups = _no_groups


def devices_of(model: nn.Module) -> tuple[torch.device, ...]:
    """The devices a placed model uses, in order."""
    layout = getattr(model, "layout", None)
    if layout is not None:
        return layout.devices
    return tuple(dict.fromkeys(p.device for p in model.parameters()))
