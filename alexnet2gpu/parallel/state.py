"""The full state dict of the two-tower net in every placement: the same keys
(``tower_a.*``, ``tower_b.*``, ``fc8.*``) whichever placement wrote it, so a checkpoint
written under ``ranks`` loads under ``towers`` and the other way round."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError

__all__ = ["full_state_dict", "load_full_state_dict"]


def _gather_tower_states(placed: nn.Module, local: dict) -> dict:
    """Every tower rank's ``local`` dict (CPU tensors) merged, on both tower ranks."""
    parts: list = [None, None]
    dist.all_gather_object(parts, local, group=placed.tower_group)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def full_state_dict(placed: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on CPU, whatever the placement. Under ``ranks`` it is a
    collective: every rank must call it (both tower ranks receive the full dict)."""
    local = {k: v.detach().cpu().clone() for k, v in placed.state_dict().items()}
    layout = getattr(placed, "layout", None)
    if layout is None or not layout.distributed:
        return local
    merged = _gather_tower_states(placed, local)
    return {k: merged[k] for k in _dual_key_order(merged)}


def _dual_key_order(keys) -> list[str]:
    """Keys in the order of DualAlexNet.state_dict(): tower_a, tower_b, fc8."""
    rank = {"tower_a": 0, "tower_b": 1, "fc8": 2}
    return sorted(keys, key=lambda k: rank.get(k.split(".", 1)[0], 3))


def load_full_state_dict(placed: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads a full dual-net state dict (from any placement) into ``placed``: under
    ``ranks`` each rank takes its own tower (and fc8 on tower rank 0)."""
    own = placed.state_dict().keys()
    missing = [k for k in own if k not in state]
    if missing:
        raise ConfigError(
            f"the state dict lacks {len(missing)} of this model's parameters (e.g. {missing[0]}): "
            "it was written for a different model, width or input size"
        )
    subset = {k: state[k] for k in own}
    try:
        placed.load_state_dict(subset, strict=True)
    except RuntimeError as error:
        raise ConfigError(
            f"the state dict does not fit this model: {str(error).splitlines()[0]} "
            f"{_first_shape_mismatch(placed, subset)}"
        ) from None


def _first_shape_mismatch(placed: nn.Module, state: dict) -> str:
    for k, v in placed.state_dict().items():
        if k in state and tuple(state[k].shape) != tuple(v.shape):
            return f"({k}: saved {list(state[k].shape)}, model {list(v.shape)})"
    return ""
