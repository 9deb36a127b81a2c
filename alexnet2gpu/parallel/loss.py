"""One training step's forward and loss, the same call for every placement.

The loss is computed once, on the device that holds fc8 ([cfg]: softmax and loss on the
first GPU). Every process calls ``forward_loss(...).backward()``; under ``ranks`` the
tower that does not hold fc8 gets a surrogate whose backward runs its side of the
exchanges' backward (see :mod:`alexnet2gpu.parallel.ranks`). Under ``replicas`` each
process's loss is the mean over its own share of the batch (DDP averages the gradients);
under ``hybrid`` every process returns the loss of the whole global batch (see
:mod:`alexnet2gpu.parallel.hybrid`). Summed over the ranks and divided by
``layout.dp_size``, every placement's loss is the global batch's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["forward_loss"]


def forward_loss(
    placed: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> torch.Tensor:
    """Runs ``placed`` on ``x`` and returns the loss against ``y`` (on the logits' device)."""
    own_loss = getattr(placed, "forward_loss", None)  # a placement whose loss is a collective
    if own_loss is not None:
        return own_loss(x, y, criterion)
    logits = placed(x)
    return criterion(logits, y.to(logits.device))
