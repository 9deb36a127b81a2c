"""The ``replicas`` placement: data parallel, what everyone does today. Under torchrun every
process holds the whole net (``dual`` as the fused grouped net, :mod:`.grouped`), reads its
own share of the global batch, and
:class:`~torch.nn.parallel.DistributedDataParallel` averages the gradients over the
processes (one all-reduce per gradient bucket, overlapped with the backward).

The placed module keeps the single-device parameter names (DDP's own ``module.`` prefix
stays inside), so ``state_dict()`` has the keys of every other placement and a checkpoint
moves to any of them and back.

**Dropout and equivalence.** Each replica draws its own masks: ``dual``'s
:class:`~alexnet2gpu.models.layers.TowerDropout` from its per-(seed, replica, tower)
generator (``seed_dropout(placed, seed, replica=layout.replica)``), the single-stream nets'
``nn.Dropout`` from each process's global RNG. The single-process reference of a
``replicas`` step is therefore: the global batch cut into ``dp_size`` equal shares, share
``r`` run with replica ``r``'s masks, the loss the mean of the shares' losses (equal
shares: the mean over the whole batch). For ``dual`` that reference is exact with dropout
on (:mod:`alexnet2gpu.checks.verify_processes`); the single-stream nets are checked with
dropout 0, since their masks come from torch's global RNG.

**Bytes**: DDP's all-reduce of every gradient, counted per bucket by
:func:`~.traffic.counting_allreduce_hook` into ``placed.traffic``:
2 (p - 1) / p x the parameter bytes per step, whatever the batch (:func:`~.traffic.replicas_bytes`).
"""

from __future__ import annotations

import torch
from torch import nn

from .distributed import join_process_group, register_group_holder
from .grouped import GroupedDualAlexNet
from .layout import Layout
from .schedule import wrap_children
from .traffic import CollectiveCounter, HookState, counting_allreduce_hook

__all__ = ["ReplicatedNet", "place_replicas"]


class ReplicatedNet(nn.Module):
    """This process's whole replica under DDP, with the net's own parameter names.

    Call it as the net (``placed(x)`` on this process's share of the batch) and train with
    ``forward_loss(placed, x, y).backward()``; DDP averages the gradients during the
    backward. ``no_sync()`` is DDP's, for gradient accumulation. ``traffic`` counts the bytes
    of the gradient all-reduce (:mod:`.traffic`)."""

    def __init__(self, net: nn.Module, layout: Layout) -> None:
        super().__init__()
        from torch.nn.parallel import DistributedDataParallel

        wrap_children(self, net)
        self.layout, self.device = layout, layout.device
        self.traffic = CollectiveCounter()
        self._net = [net]  # not a submodule: its children are registered above
        ids = [self.device.index] if self.device.type == "cuda" else None
        # DDP broadcasts rank 0's weights at start, so the replicas begin equal.
        ddp = DistributedDataParallel(net, device_ids=ids)
        ddp.register_comm_hook(HookState(self.traffic, "gradients", average=True), counting_allreduce_hook)
        self._runner = [ddp]
        register_group_holder(self)

    def check_input(self, x: torch.Tensor) -> None:
        check = getattr(self._net[0], "check_input", None)
        if check is not None:
            check(x)

    def train(self, mode: bool = True) -> ReplicatedNet:
        self._net[0].train(mode)
        return super().train(mode)

    def no_sync(self):
        """DDP's ``no_sync``: gradients accumulate locally until a step outside it."""
        return self._runner[0].no_sync()

    def release_groups(self) -> None:
        """Forgets DDP, which holds the process group (after ``destroy_process_group``)."""
        self._runner = [self._net[0]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._runner[0](x.to(self.device))


def place_replicas(model: nn.Module, layout: Layout, plan: bool = False) -> ReplicatedNet:
    """Places the whole ``model`` on this process's device (``dual`` fused as
    :class:`~.grouped.GroupedDualAlexNet`) under DDP, joining torchrun's process group
    first if needed."""
    if plan:
        raise NotImplementedError("replicas cannot be planned on the meta device: plan 'single' or 'grouped'")
    join_process_group(layout)
    net = model.to(layout.device)
    if layout.two_towers:
        net = GroupedDualAlexNet(net, layout)
    return ReplicatedNet(net, layout)
