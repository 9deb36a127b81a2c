"""The ``hybrid`` placement: Krizhevsky's "One weird trick for parallelizing convolutional
neural networks" (2014, arXiv:1404.5997), for the single-stream nets.

The convolutional layers hold most of the compute and few of the weights, the fully
connected ones the reverse, so each is parallelised the way that moves fewer bytes:

* the **conv trunk** (conv1-pool5, flatten) is data parallel: every process holds all of
  it, runs it on its own share of the global batch, and DDP sums its gradients over the
  processes (:func:`~.traffic.counting_allreduce_hook` with ``average=False``: see "loss");
* **fc6-fc8** are model parallel with PyTorch's tensor parallelism
  (``torch.distributed.tensor.parallel.parallelize_module`` on a 1-D ``DeviceMesh`` of all
  the processes, DTensor): each is :class:`~torch.distributed.tensor.parallel.ColwiseParallel`,
  so every process holds 1/p of each layer's output units, as each 2012 tower held half of
  fc6 and fc7. fc6 reads its input as ``Shard(0)`` (this process's examples) and
  redistributes it to ``Replicate``: the all-gather of every worker's conv output that lets
  the fully connected layers see the whole batch, as in the paper. fc7 and fc8 read the
  previous layer's ``Shard(-1)`` units and gather them (the paper's model-parallel exchange
  between fully connected layers); fc8's logits come out ``Replicate``: the whole batch, all
  classes, on every process. Backward, DTensor turns each gather into a reduce-scatter of
  the input's gradient (fc6's sends each worker the gradient of its own examples' conv
  output back).

**Loss.** The labels are gathered too, and every process computes the loss of the whole
batch (the mean over all examples): the fully connected layers' gradients are then exact on
every process, and each process's trunk gradient is the whole loss's gradient through *its*
examples, so the trunk's gradients are *summed* over the processes, not averaged. Every
process returns the same loss; summed over the ranks and divided by ``dp_size`` (what the
training loop does for every placement) it is the loss of the global batch.

**Checkpoints**: ``state_dict()`` has the single-device names; fc6-fc8 are DTensors there.
:func:`~.state.full_state_dict` gathers them (``full_tensor()``) into plain full tensors,
:func:`~.state.load_full_state_dict` distributes plain tensors back, so a hybrid run
resumes on one device and the other way round.

**Dropout**: the trunk's dropout (torchvision has one before fc6) acts on this process's
examples, the dropout after fc6 and fc7 (before fc7 and fc8 in torchvision) on this
process's units for the whole batch; both draw from the process's global RNG (seed it per
rank). The equality check runs with dropout 0.

``dual`` is refused: its fully connected layers already are the two towers' halves, which
``ranks`` splits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..models.sizes import check_input
from .distributed import join_process_group, register_group_holder, select_collectives
from .layout import Layout
from .schedule import wrap_children
from .traffic import CollectiveCounter, HookState, counting_allreduce_hook

__all__ = ["HybridNet", "place_hybrid", "split_trunk"]

_all_gather_single = select_collectives()[0]


def split_trunk(net: nn.Module) -> tuple[list[nn.Module], list[str]]:
    """The conv trunk's modules in order (ending with the flatten), and the names of the
    fully connected layers (fc6, fc7, fc8) relative to ``net``: torchvision's
    ``features``, ``avgpool`` and ``classifier.1/.4/.6``, or a flat ``nn.Sequential``'s
    children up to ``flatten`` and its ``fc6``, ``fc7``, ``fc8``."""
    children = dict(net.named_children())
    if "features" in children and "classifier" in children:  # torchvision's AlexNet
        trunk = [children["features"], children["avgpool"], nn.Flatten(1)]
        head = "classifier"
    elif "flatten" in children:
        names = list(children)
        trunk = [children[n] for n in names[: names.index("flatten") + 1]]
        head = ""
    else:
        raise TypeError(f"{type(net).__name__} has no conv trunk and classifier that hybrid knows")
    scope = getattr(net, head) if head else net
    linears = [name for name, m in scope.named_children() if isinstance(m, nn.Linear)]
    if len(linears) != 3:
        raise TypeError(f"hybrid splits three fully connected layers, {type(net).__name__} has {len(linears)}")
    return trunk, [f"{head}.{name}" if head else name for name in linears]


def _plan(fc_names: list[str]) -> dict:
    """fc6-fc8 column-parallel: fc6 gathers the examples, fc7 and fc8 the units, fc8's
    logits come out whole on every process."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel

    fc6, fc7, fc8 = fc_names
    return {
        fc6: ColwiseParallel(input_layouts=Shard(0)),
        fc7: ColwiseParallel(input_layouts=Shard(-1)),
        fc8: ColwiseParallel(input_layouts=Shard(-1), output_layouts=Replicate()),
    }


class HybridNet(nn.Module):
    """This process's share of a single-stream net under ``hybrid``: the whole conv trunk
    (under DDP) and 1/p of fc6-fc8's units (DTensor), under the net's own names.

    ``forward(x)`` returns the logits of this process's examples; ``forward_loss(x, y,
    criterion)`` the loss of the whole global batch (the same on every process). ``traffic``
    counts the trunk's gradient all-reduce and the label gather always, the fully connected
    layers' collectives inside :func:`~.traffic.count_collectives`."""

    def __init__(self, net: nn.Module, mesh, layout: Layout) -> None:
        super().__init__()
        from torch.distributed.tensor.parallel import parallelize_module
        from torch.nn.parallel import DistributedDataParallel

        trunk, self.fc_names = split_trunk(net)
        wrap_children(self, net)
        self.layout, self.mesh, self.device = layout, mesh, layout.device
        self.group = mesh.get_group()
        self.traffic = CollectiveCounter()
        self._net = [net]
        parallelize_module(self, mesh, _plan(self.fc_names))
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DistributedDataParallel(nn.Sequential(*trunk), device_ids=ids, process_group=self.group)
        ddp.register_comm_hook(
            HookState(self.traffic, "trunk gradients", average=False, group=self.group), counting_allreduce_hook
        )
        self._trunk = [ddp]  # not a submodule: the trunk's layers are registered above
        head = self.classifier if hasattr(self, "classifier") else nn.Sequential(*self._head_layers(net))
        self._head = [head]  # not a submodule either: its layers are registered above
        for module in head.modules():
            # A tensor-parallel layer's local output is a view made by DTensor's autograd
            # Function, which autograd forbids modifying in place (torchvision's ReLUs are
            # in-place): the same function, out of place.
            if isinstance(module, (nn.ReLU, nn.Dropout)):
                module.inplace = False
        register_group_holder(self)

    @staticmethod
    def _head_layers(net: nn.Module) -> list[nn.Module]:
        names = [n for n, _ in net.named_children()]
        return [getattr(net, n) for n in names[names.index("flatten") + 1 :]]

    def check_input(self, x: torch.Tensor) -> None:
        check_input(x, self.in_channels, self.image_size)

    def train(self, mode: bool = True) -> HybridNet:
        self._net[0].train(mode)
        return super().train(mode)

    def release_groups(self) -> None:
        """Forgets DDP and the mesh's group (after ``destroy_process_group``); the weights stay."""
        runner = self._trunk[0]
        self._trunk = [getattr(runner, "module", runner)]
        self.group = self.mesh = None

    def _whole_batch_logits(self, x: torch.Tensor) -> torch.Tensor:
        features = self._trunk[0](x.to(self.device))
        return self._head[0](features)

    def _rows(self, batch: int) -> slice:
        rank = dist.get_rank(self.group)
        return slice(rank * batch, (rank + 1) * batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of this process's examples (``x``), computed with the whole batch."""
        self.check_input(x)
        return self._whole_batch_logits(x)[self._rows(x.shape[0])]

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor, criterion) -> torch.Tensor:
        """The loss of the whole global batch, on every process (see the module docstring)."""
        self.check_input(x)
        logits = self._whole_batch_logits(x)
        labels = y.to(self.device).contiguous()
        every = labels.new_empty((labels.shape[0] * self.layout.world_size, *labels.shape[1:]))
        self.traffic.add_labelled("labels", "all_gather", every.numel() * every.element_size(), self.layout.world_size)
        _all_gather_single(every, labels, group=self.group)
        return criterion(logits, every)


def place_hybrid(model: nn.Module, layout: Layout, plan: bool = False) -> HybridNet:
    """Places a single-stream ``model`` for this process under torchrun: joins the process
    group if needed, builds the 1-D mesh of all the processes, and parallelises fc6-fc8."""
    from torch.distributed.device_mesh import init_device_mesh

    if plan:
        raise NotImplementedError("hybrid cannot be planned on the meta device: plan 'single'")
    join_process_group(layout)
    mesh = init_device_mesh(layout.device.type, (layout.world_size,), mesh_dim_names=("workers",))
    return HybridNet(model.to(layout.device), mesh, layout)
