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
  ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` pair never did in our runs.)
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

import datetime
import gc
import logging
import os
import sys
import weakref

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError
from .models import DualAlexNet, Tower
from .placement import ExchangeCounter, Layout, check_available, parse_devices
from .torchrun import TorchrunEnv

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "RanksDualAlexNet",
    "init_distributed",
    "close_distributed",
    "place_ranks",
    "full_state_dict",
    "load_full_state_dict",
]

log = logging.getLogger("alexnet2gpu")

# Process-group timeout: how long a collective waits for a rank that died or hangs before
# the job fails with an error (torch's own default is 30 min for gloo, 10 min for NCCL).
DEFAULT_TIMEOUT_S = 180.0
TOWER_NAMES = ("tower_a", "tower_b")

_LAUNCH_HINT = (
    "launch one process per tower with torchrun, e.g. "
    "`torchrun --nproc-per-node 2 -m alexnet2gpu train --placement ranks ...`"
)


def _check_world(env: TorchrunEnv) -> None:
    if not env.launched:
        raise ConfigError(f"placement 'ranks' runs one tower per process and needs torchrun: {_LAUNCH_HINT}")
    if env.world_size < 2 or env.world_size % 2:
        raise ConfigError(
            f"placement 'ranks' needs an even WORLD_SIZE (two processes, one per tower, for each "
            f"data-parallel replica), got WORLD_SIZE={env.world_size}: use --nproc-per-node 2 or 4, "
            "or --nnodes N --nproc-per-node 2"
        )


def _local_device(devices, env: TorchrunEnv) -> torch.device:
    """``cuda:LOCAL_RANK`` where CUDA exists, else the CPU; ``devices`` overrides: one device
    for every process (e.g. ``cpu``), or one per local rank."""
    devices = parse_devices(devices or None)  # `auto` passes an empty list
    if devices is None:
        return torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if len(devices) == 1:
        device = devices[0]
    elif env.local_rank < len(devices):
        device = devices[env.local_rank]
    else:
        raise ConfigError(
            f"--devices lists {len(devices)} devices but this is local rank {env.local_rank}: "
            "give one device for every process (e.g. cpu) or one per local rank"
        )
    check_available([device])
    return device


def init_distributed(device: torch.device | str | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> TorchrunEnv:
    """Joins the process group torchrun set up (a no-op when it is already initialised):
    NCCL on ``cuda:LOCAL_RANK``, gloo on the CPU, with a collective timeout of ``timeout_s``
    seconds, after which a collective waiting for a dead or hung rank fails."""
    env = TorchrunEnv.from_environ()
    _check_world(env)
    if dist.is_initialized():
        return env
    device = _local_device(device if device is None or isinstance(device, (list, tuple)) else [device], env)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _attempt_store(env, timeout)
    kwargs = {"store": store, "rank": env.rank, "world_size": env.world_size} if store is not None else {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device, **kwargs)
    else:
        dist.init_process_group("gloo", timeout=timeout, **kwargs)
    return env


def _attempt_store(env: TorchrunEnv, timeout: datetime.timedelta):
    """torchrun's store, under a prefix per restart attempt, or None for the default.

    After torchrun ``--max-restarts`` restarts the workers, the store it shares with them
    (torch >= 2.4 hosts it in the agent) still holds the previous attempt's connection keys,
    and gloo then fails to connect: pytorch issue 135712. A fresh key prefix per attempt
    (``TORCHELASTIC_RESTART_COUNT``) avoids that without ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if attempt is None or not addr or not port:
        return None
    # Where torchrun's agent hosts the store, every worker is a client; otherwise rank 0
    # hosts it, as the env:// rendezvous would.
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(addr, int(port), env.world_size, is_master=(env.rank == 0 and not agent_hosts),
                          timeout=timeout, wait_for_workers=False)
    return dist.PrefixStore(f"alexnet2gpu/attempt{attempt}", store)


def close_distributed(*, barrier: bool | None = None) -> None:
    """``destroy_process_group`` if a group is up: call it on every exit path (e.g. in a
    ``finally``).

    On the success path the ranks first meet at a barrier (``barrier=None`` means: when no
    exception is propagating), so that none leaves while a peer still works; on an error
    path there is no barrier: the peers may be dead or hung. Then every placed model
    forgets its process groups, so that the gloo groups end here. Left alive until
    interpreter exit (a placed model still referenced), their worker threads could try
    to take the GIL during finalisation and abort the process ("terminate called without
    an active exception"): 5 of 8 two-rank runs with torch 2.14 before this, 0 of 46 after."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if barrier is None:
        barrier = sys.exc_info()[0] is None
    try:
        if barrier:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        # Drop the placed models' references to their process groups, so that the gloo
        # groups (and their worker threads) end now rather than during interpreter exit,
        # where a worker thread that wants the GIL aborts the process (seen in gdb as
        # "pt_gloo_runloop" in take_gil -> std::terminate).
        for placed in list(_PLACED):
            placed.release_groups()
        gc.collect()


class _GatherTowers(torch.autograd.Function):
    """Exchanges 1-3: ``[tower a | tower b]`` along dim 1 on both tower ranks, from each
    rank's own ``[N, C, ...]`` output (``dist.all_gather_into_tensor``). Backward is a
    reduce-scatter (``dist.reduce_scatter_tensor``, SUM): each tower's gradient is the sum of
    what both towers' next layers send back for its half."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group, counter: ExchangeCounter) -> torch.Tensor:
        ctx.group, ctx.counter = group, counter
        tensor = tensor.contiguous()
        counter.add(tensor)  # sent to the other tower
        gathered = tensor.new_empty((2 * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_into_tensor(gathered, tensor, group=group)  # [a; b] along dim 0
        return torch.cat(gathered.chunk(2), dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        halves = torch.cat(grad.chunk(2, dim=1), dim=0).contiguous()  # [grad for a; grad for b]
        mine = halves.new_empty((halves.shape[0] // 2, *halves.shape[1:]))
        ctx.counter.add(mine)  # the other tower's half goes to it
        dist.reduce_scatter_tensor(mine, halves, group=ctx.group)
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


class _Column(nn.Module):
    """This process's column of the net: its tower, the exchanges, and fc8 on tower rank 0.
    The unit that DDP wraps; its output is the logits on tower rank 0, the exchange-4
    token on tower rank 1."""

    def __init__(self, tower: Tower, fc8: nn.Linear | None, owner: "RanksDualAlexNet") -> None:
        super().__init__()
        self.tower, self.fc8 = tower, fc8
        self._owner = [owner]  # not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = self._owner[0]
        counter, group = owner.exchange_counter, owner.tower_group
        h = x
        for stage in range(Tower.NUM_STAGES - 1):
            h = _GatherTowers.apply(self.tower.stage(stage, h), group, counter)  # exchanges 1-3
        out = self.tower.stage(3, h)
        if self.fc8 is None:  # tower b: exchange 4 sends fc7's output to tower a
            return _SendToTowerA.apply(out, owner.peer, group, counter)
        other = _ReceiveFromTowerB.apply(out, owner.peer, group, counter)
        return self.fc8(torch.cat([out, other], dim=1))


_PLACED: "weakref.WeakSet[RanksDualAlexNet]" = weakref.WeakSet()


class RanksDualAlexNet(nn.Module):
    """This process's share of :class:`DualAlexNet` under ``ranks``: ``tower_a`` and
    ``fc8`` on tower rank 0, ``tower_b`` on tower rank 1, under the dual net's own
    parameter names, so ``state_dict()`` is this rank's subset of the full state dict
    (:func:`full_state_dict` gathers all of it).

    Train with ``forward_loss(x, y, criterion).backward()`` on every rank. ``forward(x)``
    (inference) returns the logits on both tower ranks: tower rank 0 computes them and
    broadcasts a detached copy to tower rank 1 (not an exchange of the 2012 net, so not
    counted)."""

    def __init__(self, model: DualAlexNet, mesh, device: torch.device, layout: Layout) -> None:
        super().__init__()
        self.mesh, self.layout, self.device = mesh, layout, device
        self.tower_group = mesh.get_group("tower")
        self.dp_group = mesh.get_group("dp")
        self.tower_rank = mesh.get_local_rank("tower")
        self.dp_rank = mesh.get_local_rank("dp")
        pair = dist.get_process_group_ranks(self.tower_group)
        self.peer = pair[1 - self.tower_rank]  # global rank of the other tower
        self.tower_ranks = tuple(pair)
        self.in_channels, self.num_classes = model.in_channels, model.num_classes
        self.image_size = model.image_size
        self.exchange_counter = ExchangeCounter()
        tower = model.towers[self.tower_rank].to(device)
        self.tower_name = TOWER_NAMES[self.tower_rank]
        self.add_module(self.tower_name, tower)
        fc8 = model.fc8.to(device) if self.tower_rank == 0 else None
        if fc8 is not None:
            self.fc8 = fc8
        # Drop what this rank does not hold: the other tower (and fc8 on tower rank 1) go
        # to the meta device, which frees their memory.
        model.towers[1 - self.tower_rank].to("meta")
        if fc8 is None:
            model.fc8.to("meta")
        column = _Column(tower, fc8, self)
        if layout.dp_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            # DDP averages this tower's gradients over its replicas (the "dp" dim) and
            # broadcasts dp rank 0's weights at start so that replicas begin equal.
            column = DistributedDataParallel(column, device_ids=ids, process_group=self.dp_group)
        self._runner = [column]  # not a submodule: the parameters are registered above
        _PLACED.add(self)

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
        logits = out if self.is_loss_rank else torch.empty(
            (x.shape[0], self.num_classes), dtype=x.dtype, device=self.device)
        shared = logits.detach().contiguous()
        dist.broadcast(shared, src=self.tower_ranks[0], group=self.tower_group)
        return logits if self.is_loss_rank else shared


def place_ranks(model: nn.Module, devices=None) -> RanksDualAlexNet:
    """Places ``model`` (a :class:`DualAlexNet`) for this process under torchrun: joins the
    process group (:func:`init_distributed`, default timeout) if needed, builds the (k, 2)
    ``("dp", "tower")`` mesh and keeps this rank's tower. ``devices``: None for
    ``cuda:LOCAL_RANK`` (else the CPU), or one device for all processes, or one per local rank."""
    from torch.distributed.device_mesh import init_device_mesh

    if not isinstance(model, DualAlexNet):
        raise ConfigError("placement 'ranks' splits the two-tower net 'dual'; use --model dual")
    env = TorchrunEnv.from_environ()
    _check_world(env)
    device = _local_device(devices, env)
    init_distributed(device)
    world = dist.get_world_size()
    if world % 2:
        raise ConfigError(f"placement 'ranks' needs an even world size, got {world}")
    dp_size = world // 2
    mesh = init_device_mesh(device.type, (dp_size, 2), mesh_dim_names=("dp", "tower"))
    layout = Layout("ranks", (device,), world_size=world, dp_size=dp_size,
                    reason=f"WORLD_SIZE={world}: {dp_size} replica(s) x 2 towers")
    return RanksDualAlexNet(model, mesh, device, layout)


def _gather_tower_states(placed: RanksDualAlexNet, local: dict) -> dict:
    """Every tower rank's ``local`` dict (CPU tensors) merged, on both tower ranks."""
    parts: list = [None, None]
    dist.all_gather_object(parts, local, group=placed.tower_group)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def full_state_dict(placed: nn.Module) -> dict[str, torch.Tensor]:
    """The full dual-net state dict (``tower_a.*``, ``tower_b.*``, ``fc8.*``) on CPU,
    whatever the placement. Under ``ranks`` it is a collective: every rank must call it
    (both tower ranks receive the full dict)."""
    local = {k: v.detach().cpu().clone() for k, v in placed.state_dict().items()}
    if not isinstance(placed, RanksDualAlexNet):
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
        raise ConfigError(f"the state dict does not fit this model: {str(error).splitlines()[0]} "
                          f"{_first_shape_mismatch(placed, subset)}") from None


def _first_shape_mismatch(placed: nn.Module, state: dict) -> str:
    for k, v in placed.state_dict().items():
        if k in state and tuple(state[k].shape) != tuple(v.shape):
            return f"({k}: saved {list(state[k].shape)}, model {list(v.shape)})"
    return ""
