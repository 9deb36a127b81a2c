"""The ``ranks`` placement: one tower per process under torchrun, data-parallel replicas on
a 2-D device mesh (DESIGN.md section 3).

With ``WORLD_SIZE = 2k`` the processes form a :class:`~torch.distributed.device_mesh.DeviceMesh`
of shape (k, 2) with dims ``("dp", "tower")``: global rank ``2 * d + t`` holds tower ``t``
(a or b) of replica ``d``. Tower rank 0 also holds fc8 and computes the loss, as the
released code put softmax and loss on the first GPU [cfg].

Exchanges ([paper] section 3.5, figure 2):

* 1-3 (conv3, fc6, fc7 read both towers): an all-gather over the "tower" group whose
  backward is a reduce-scatter (:class:`_GatherTowers`): each tower's input gradient is the
  *sum* of what both towers' layers send back. Plain ``dist.all_gather`` would carry no
  gradient at all. (``_functional_collectives.all_gather_single_autograd`` computes the
  same, but with gloo and torch 2.14 its asynchronous work made about one run in five
  abort at exit, "terminate called without an active exception"; the synchronous
  ``all_gather_single`` / ``reduce_scatter_single`` pair never did in our runs. They came
  with torch 2.13 as the new names for ``all_gather_into_tensor`` / ``reduce_scatter_tensor``,
  which 2.14 marks deprecated (a FutureWarning); on torch 2.11-2.12, which lack the new
  names, :func:`select_collectives` falls back to the old ones, the same operations.)
* 4 (fc8 reads both towers, on the first device): tower b's fc7 output goes to tower rank
  0 by ``dist.send``/``dist.recv`` (:class:`_SendToTowerA` / :class:`_ReceiveFromTowerB`);
  backward returns its gradient the same way.

The loss is computed once, on tower rank 0. Tower rank 1 gets a surrogate (a scalar
zero tied to exchange 4) whose ``backward()`` receives the gradient of its fc7 output and
runs its side of the backward, so every rank simply calls ``forward_loss(...).backward()``.
A loss computed on both ranks would double every gradient.

Each tower's gradients are averaged over the "dp" dim by
:class:`~torch.nn.parallel.DistributedDataParallel` on the dp sub-group (tower a's replicas
form one group, tower b's another).

**What ``exchange_counter`` counts**: the bytes *this process sends* to its partner tower:
forward, its stage output at exchanges 1-3 (and, on tower rank 1, its fc7 output at
exchange 4); backward, its share of the reduce-scatter at exchanges 1-3 (the gradient of
the other tower's half, the same size) and, on tower rank 0, the gradient of tower b's fc7
output at exchange 4. Summed over the two tower ranks of a replica this is the design's
table: 113,152 bytes each way plus 8,192 per image forward, the same backward, 468,992
bytes per image per training step at width 1, 227 input, float32. DDP's gradient
all-reduce over "dp" is not counted (it is not an exchange between the towers).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..models.dual import DualAlexNet, Tower, run_towers
from .distributed import join_process_group, register_group_holder, select_collectives
from .layout import Layout
from .schedule import ExchangeCounter

__all__ = ["RanksDualAlexNet", "place_ranks", "select_collectives"]

TOWER_NAMES = ("tower_a", "tower_b")


# Chosen once, at import: torch 2.11-2.12 have only the old names (issue 15).
_all_gather_single, _reduce_scatter_single = select_collectives()


class _GatherTowers(torch.autograd.Function):
    """Exchanges 1-3: ``[tower a | tower b]`` along dim 1 on both tower ranks, from each
    rank's own ``[N, C, ...]`` output (``all_gather_single``). Backward is a reduce-scatter
    (``reduce_scatter_single``, SUM): each tower's gradient is the sum of what both towers'
    next layers send back for its half. Both from :func:`select_collectives`."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group, counter: ExchangeCounter) -> torch.Tensor:
        ctx.group, ctx.counter = group, counter
        tensor = tensor.contiguous()
        counter.add(tensor)  # sent to the other tower
        gathered = tensor.new_empty((2 * tensor.shape[0], *tensor.shape[1:]))
        _all_gather_single(gathered, tensor, group=group)  # [a; b] along dim 0
        return torch.cat(gathered.chunk(2), dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        halves = torch.cat(grad.chunk(2, dim=1), dim=0).contiguous()  # [grad for a; grad for b]
        mine = halves.new_empty((halves.shape[0] // 2, *halves.shape[1:]))
        ctx.counter.add(mine)  # the other tower's half goes to it
        _reduce_scatter_single(mine, halves, group=ctx.group)
        return mine, None, None


class _SendToTowerA(torch.autograd.Function):
    """Exchange 4 on tower b's rank: sends its fc7 output to tower a's rank and returns a
    scalar zero; backward receives that output's gradient."""

    @staticmethod
    def forward(ctx, tensor, peer: int, group, counter: ExchangeCounter) -> torch.Tensor:
        tensor = tensor.contiguous()
        ctx.peer, ctx.group, ctx.shape = peer, group, tensor.shape
        counter.add(tensor)
        dist.send(tensor, dst=peer, group=group)
        return tensor.new_zeros(())

    @staticmethod
    def backward(ctx, _grad):
        grad = torch.empty(ctx.shape, dtype=_grad.dtype, device=_grad.device)
        dist.recv(grad, src=ctx.peer, group=ctx.group)
        return grad, None, None, None


class _ReceiveFromTowerB(torch.autograd.Function):
    """Exchange 4 on tower a's rank: receives tower b's fc7 output (shaped like ``like``,
    this tower's own); backward sends its gradient back."""

    @staticmethod
    def forward(ctx, like, peer: int, group, counter: ExchangeCounter) -> torch.Tensor:
        ctx.peer, ctx.group, ctx.counter = peer, group, counter
        received = torch.empty_like(like, memory_format=torch.contiguous_format)
        dist.recv(received, src=peer, group=group)
        return received

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        ctx.counter.add(grad)
        dist.send(grad, dst=ctx.peer, group=ctx.group)
        return None, None, None, None


class _CollectiveExchange:
    """Exchanges between this process's tower and its partner's: 1-3 by
    :class:`_GatherTowers`, 4 by send/receive to tower rank 0, which holds fc8."""

    def __init__(self, owner: RanksDualAlexNet) -> None:
        self.owner = owner

    def scatter(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x]

    def join(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        owner = self.owner
        return [_GatherTowers.apply(outputs[0], owner.tower_group, owner.exchange_counter)]

    def head(self, outputs: list[torch.Tensor], fc8: nn.Module | None) -> torch.Tensor:
        owner, out = self.owner, outputs[0]
        if fc8 is None:  # tower b: exchange 4 sends fc7's output to tower a
            return _SendToTowerA.apply(out, owner.peer, owner.tower_group, owner.exchange_counter)
        other = _ReceiveFromTowerB.apply(out, owner.peer, owner.tower_group, owner.exchange_counter)
        return fc8(torch.cat([out, other], dim=1))


class _Column(nn.Module):
    """This process's column of the net: its tower, the exchanges, and fc8 on tower rank 0.
    The unit that DDP wraps; its output is the logits on tower rank 0, the exchange-4
    token on tower rank 1."""

    def __init__(self, tower: Tower, fc8: nn.Linear | None, exchange: _CollectiveExchange) -> None:
        super().__init__()
        self.tower, self.fc8 = tower, fc8
        self.exchange = exchange

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_towers((self.tower.stage,), x, self.exchange, self.fc8)


class RanksDualAlexNet(nn.Module):
    """This process's share of :class:`DualAlexNet` under ``ranks``: ``tower_a`` and
    ``fc8`` on tower rank 0, ``tower_b`` on tower rank 1, under the dual net's own
    parameter names, so ``state_dict()`` is this rank's subset of the full state dict
    (:func:`~alexnet2gpu.parallel.state.full_state_dict` gathers all of it).

    Train with ``forward_loss(x, y, criterion).backward()`` on every rank. ``forward(x)``
    (inference) returns the logits on both tower ranks: tower rank 0 computes them and
    broadcasts a detached copy to tower rank 1 (not an exchange of the 2012 net, so not
    counted)."""

    def __init__(self, model: DualAlexNet, mesh, layout: Layout) -> None:
        super().__init__()
        self.mesh, self.layout, self.device = mesh, layout, layout.device
        self.tower_group = mesh.get_group("tower")
        self.dp_group = mesh.get_group("dp")
        # The mesh's row-major order is the layout's rank = 2 * replica + tower.
        assert (mesh.get_local_rank("tower"), mesh.get_local_rank("dp")) == (layout.tower, layout.replica)
        self.tower_rank = layout.tower
        pair = dist.get_process_group_ranks(self.tower_group)
        self.peer = pair[1 - self.tower_rank]  # global rank of the other tower
        self.tower_ranks = tuple(pair)
        self.in_channels, self.num_classes = model.in_channels, model.num_classes
        self.image_size = model.image_size
        self.exchange_counter = ExchangeCounter()
        tower = model.towers[self.tower_rank].to(self.device)
        self.tower_name = TOWER_NAMES[self.tower_rank]
        self.add_module(self.tower_name, tower)
        fc8 = model.fc8.to(self.device) if self.is_loss_rank else None
        if fc8 is not None:
            self.fc8 = fc8
        # Drop what this rank does not hold: the other tower (and fc8 on tower rank 1) go
        # to the meta device, which frees their memory.
        model.towers[1 - self.tower_rank].to("meta")
        if fc8 is None:
            model.fc8.to("meta")
        column = _Column(tower, fc8, _CollectiveExchange(self))
        if layout.dp_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # DDP averages this tower's gradients over its replicas (the "dp" dim) and
            # broadcasts dp rank 0's weights at start so that replicas begin equal.
            column = DistributedDataParallel(column, device_ids=ids, process_group=self.dp_group)
        self._runner = [column]  # not a submodule: the parameters are registered above
        register_group_holder(self)

    def release_groups(self) -> None:
        """Forgets the process groups (after ``destroy_process_group``); the weights stay."""
        runner = self._runner[0]
        self._runner = [getattr(runner, "module", runner)]  # unwrap DDP, which holds the dp group
        self.tower_group = self.dp_group = self.mesh = None

    @property
    def tower(self) -> Tower:
        return getattr(self, self.tower_name)

    @property
    def is_loss_rank(self) -> bool:
        """True on tower rank 0, which holds fc8 and the loss."""
        return self.tower_rank == 0

    def check_input(self, x: torch.Tensor) -> None:
        DualAlexNet.check_input(self, x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self._runner[0](x.to(self.device))

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor, criterion) -> torch.Tensor:
        """The loss on tower rank 0; on tower rank 1 a scalar zero whose ``backward()`` runs
        this tower's backward (it receives the gradient of exchange 4 from tower rank 0)."""
        out = self._run(x)
        if self.is_loss_rank:
            return criterion(out, y.to(out.device))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._run(x)
        logits = (
            out if self.is_loss_rank else torch.empty((x.shape[0], self.num_classes), dtype=x.dtype, device=self.device)
        )
        shared = logits.detach().contiguous()
        dist.broadcast(shared, src=self.tower_ranks[0], group=self.tower_group)
        return logits if self.is_loss_rank else shared


def place_ranks(model: DualAlexNet, layout: Layout) -> RanksDualAlexNet:
    """Places ``model`` for this process under torchrun: joins the process group
    (:func:`~alexnet2gpu.parallel.distributed.join_process_group`, default timeout) if
    needed, builds the (k, 2) ``("dp", "tower")`` mesh and keeps this rank's tower."""
    from torch.distributed.device_mesh import init_device_mesh

    join_process_group(layout)
    mesh = init_device_mesh(layout.device.type, (layout.dp_size, 2), mesh_dim_names=("dp", "tower"))
    return RanksDualAlexNet(model, mesh, layout)
