"""The full state dict in every placement: the same keys whichever placement wrote it
(``tower_a.*``, ``tower_b.*``, ``fc8.*`` for the two-tower net, the net's own names for a
single-stream one), plain full tensors on the CPU, so a checkpoint written under ``ranks``
or ``hybrid`` loads under ``towers`` or ``single`` and the other way round.

* ``ranks``: each process holds one tower; the dict is gathered over the tower pair;
* ``hybrid``: fc6-fc8 are DTensors (1/p of their units on each process): gathered with
  ``full_tensor()``, and loaded back by distributing the plain tensor;
* ``replicas``: every process holds all of it already.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError

__all__ = ["distributed_like", "full_cpu", "full_gradients", "full_state_dict", "load_full_state_dict", "local_part"]


def _gather_tower_states(placed: nn.Module, local: dict) -> dict:
    """Every tower rank's ``local`` dict (CPU tensors) merged, on both tower ranks."""
    parts: list = [None, None]
    dist.all_gather_object(parts, local, group=placed.tower_group)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def _is_dtensor(value) -> bool:
    return type(value).__name__ == "DTensor" and hasattr(value, "full_tensor")


def full_cpu(value: torch.Tensor) -> torch.Tensor:
    """A plain CPU copy; a DTensor's whole tensor (a collective: every rank must call)."""
    if _is_dtensor(value):
        value = value.full_tensor()
    return value.detach().cpu().clone()


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a DTensor (hybrid's fc6-fc8: a view, so in-place changes
    reach the DTensor); a plain tensor as it is. No communication."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _on_ranks(placed: nn.Module) -> bool:
    layout = getattr(placed, "layout", None)
    return layout is not None and layout.placement == "ranks"


def full_state_dict(placed: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on CPU, whatever the placement. Under ``ranks`` and ``hybrid`` it
    is a collective: every rank must call it (every rank receives the full dict)."""
    local = {k: full_cpu(v) for k, v in placed.state_dict().items()}
    if not _on_ranks(placed):
        return local
    merged = _gather_tower_states(placed, local)
    return {k: merged[k] for k in _dual_key_order(merged)}


def full_gradients(placed: nn.Module) -> dict[str, torch.Tensor | None]:
    """Every parameter's gradient as a plain full CPU tensor under its full-state-dict name
    (None where there is none), whatever the placement; a collective like
    :func:`full_state_dict` under ``ranks`` and ``hybrid``."""
    local = {k: None if p.grad is None else full_cpu(p.grad) for k, p in placed.named_parameters()}
    if not _on_ranks(placed):
        return local
    merged = _gather_tower_states(placed, local)
    return {k: merged[k] for k in _dual_key_order(merged)}


def _dual_key_order(keys) -> list[str]:
    """Keys in the order of DualAlexNet.state_dict(): tower_a, tower_b, fc8."""
    rank = {"tower_a": 0, "tower_b": 1, "fc8": 2}
    return sorted(keys, key=lambda k: rank.get(k.split(".", 1)[0], 3))


def distributed_like(current, value: torch.Tensor):
    """``value`` (a plain full tensor) laid out as ``current``: a DTensor with its mesh and
    placements (from this process's own copy: no communication), else as it is."""
    if not _is_dtensor(current):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        value.to(current.device, current.dtype), current.device_mesh, current.placements, src_data_rank=None
    )


def load_full_state_dict(placed: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads a full state dict (from any placement) into ``placed``: under ``ranks`` each rank
    takes its own tower (and fc8 on tower rank 0), under ``hybrid`` its share of fc6-fc8."""
    own = placed.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ConfigError(
            f"the state dict lacks {len(missing)} of this model's parameters (e.g. {missing[0]}): "
            "it was written for a different model, width or input size"
        )
    mismatch = _first_shape_mismatch(own, state)
    if mismatch:
        raise ConfigError(f"the state dict does not fit this model: {mismatch}")
    subset = {k: distributed_like(v, state[k]) for k, v in own.items()}
    try:
        placed.load_state_dict(subset, strict=True)
    except RuntimeError as error:
        raise ConfigError(f"the state dict does not fit this model: {str(error).splitlines()[0]}") from None


def _first_shape_mismatch(own: dict, state: dict) -> str:
    """The first key whose saved shape differs from the model's (a DTensor's whole shape)."""
    for k, v in own.items():
        if k in state and tuple(state[k].shape) != tuple(v.shape):
            return f"({k}: saved {list(state[k].shape)}, model {list(v.shape)})"
    return ""
