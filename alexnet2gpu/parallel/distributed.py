"""Joining and leaving torchrun's process group, and telling which rank stopped.

* :func:`init_distributed`: on ``cuda:LOCAL_RANK`` one group with two backends,
  ``cpu:gloo,cuda:nccl`` (NCCL takes CUDA tensors only; gloo carries what lives on the
  host: barriers, object collectives, CPU tensors), gloo alone on the CPU, and a collective
  timeout after which a collective waiting for a dead or hung rank fails;
* :func:`all_sum`: the one way the training loop sums over ranks;
* :func:`is_collective_error`: whether an exception came from a collective (a peer that
  died or hung, a broken connection), as opposed to this rank's own failure;
* :func:`close_distributed`: ``destroy_process_group`` on every exit path;
* :class:`RankLiveness`: each rank's current step in torchrun's store, so that a failed
  collective can name the ranks that stopped making progress.
"""

from __future__ import annotations

import datetime
import gc
import os
import sys
import time
import weakref

import torch
import torch.distributed as dist

from .layout import Layout, TorchrunEnv, resolve_layout
from .names import DEFAULT_TIMEOUT_S

__all__ = [
    "BACKEND_CPU",
    "BACKEND_CUDA",
    "DEFAULT_TIMEOUT_S",
    "RankLiveness",
    "all_sum",
    "close_distributed",
    "init_distributed",
    "join_process_group",
    "is_collective_error",
    "register_group_holder",
    "select_collectives",
]

# The backends: on CUDA, NCCL for CUDA tensors and gloo beside it for everything on the
# host (NCCL raises on a CPU tensor); on the CPU, gloo alone.
BACKEND_CUDA = "cpu:gloo,cuda:nccl"
BACKEND_CPU = "gloo"

# Objects holding process groups (placed models); close_distributed makes them let go.
_GROUP_HOLDERS: weakref.WeakSet = weakref.WeakSet()


def register_group_holder(holder) -> None:
    """``holder.release_groups()`` will be called by :func:`close_distributed`."""
    _GROUP_HOLDERS.add(holder)


def init_distributed(
    devices=None, timeout_s: float = DEFAULT_TIMEOUT_S, *, placement: str = "ranks", two_tower: bool = True
) -> Layout:
    """Resolves this process's layout for ``placement`` (``ranks``, ``replicas`` or
    ``hybrid``; ``two_tower``: the net is ``dual``) and joins torchrun's process group
    (:func:`join_process_group`). ``devices``: None for ``cuda:LOCAL_RANK`` (else the CPU),
    one device for every process, or one per local rank."""
    layout = resolve_layout(placement, devices, two_tower=two_tower)
    join_process_group(layout, timeout_s)
    return layout


def join_process_group(layout: Layout, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Joins the process group torchrun set up for an already resolved ``layout`` (a no-op
    when it is already initialised): gloo on the CPU, gloo + NCCL where the layout's device
    is a GPU, whose timeout is ``timeout_s``."""
    if dist.is_initialized():
        return
    env = TorchrunEnv.from_environ()
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _attempt_store(env, timeout)
    kwargs = {"store": store, "rank": env.rank, "world_size": env.world_size} if store is not None else {}
    if layout.device.type == "cuda":
        torch.cuda.set_device(layout.device)
        dist.init_process_group(BACKEND_CUDA, timeout=timeout, device_id=layout.device, **kwargs)
    else:
        dist.init_process_group(BACKEND_CPU, timeout=timeout, **kwargs)


def select_collectives(module=dist):
    """The (all-gather, reduce-scatter) pair into / out of one flat tensor, from ``module``
    (``torch.distributed``): ``all_gather_single`` / ``reduce_scatter_single`` where they
    exist (torch 2.13 on, where the old names are deprecated), else ``all_gather_into_tensor``
    / ``reduce_scatter_tensor`` (torch 2.11-2.12, the floor in pyproject.toml): the same
    operations with the same arguments under their older names."""
    if hasattr(module, "all_gather_single") and hasattr(module, "reduce_scatter_single"):
        return module.all_gather_single, module.reduce_scatter_single
    return module.all_gather_into_tensor, module.reduce_scatter_tensor


def _reduce_device(tensor: torch.Tensor) -> torch.device:
    """Where the default group can reduce ``tensor``: its own device when the group has a
    backend for that device type, else the first device type it has (a group started
    elsewhere as NCCL alone: the current CUDA device)."""
    types = [d.type for d in dist.distributed_c10d._get_default_group()._device_types]
    if not types or tensor.device.type in types:
        return tensor.device
    if types[0] == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(types[0])


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over every rank of the default group, on ``tensor``'s device.

    The training loop's collectives all come here: a CUDA tensor is reduced by NCCL
    without a host sync (the caller reads it when it needs the numbers); a CPU tensor by
    gloo. Where the group has no backend for the tensor's device (NCCL alone), the tensor
    goes to one it has and comes back. Outside a process group it is returned as it is."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    device = _reduce_device(tensor)
    moved = tensor.to(device)
    dist.all_reduce(moved)
    return moved.to(tensor.device)


def is_collective_error(error: BaseException) -> bool:
    """True for the errors a collective raises when a peer died, hung past the
    process-group timeout, or the connection broke: ``torch.distributed.DistError`` and
    its subclasses, and gloo's transport errors that older releases raise as a plain
    RuntimeError. This rank's own errors (a shape, out of memory, a bug) are not."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(marker in text for marker in _TRANSPORT_MARKERS)


# What gloo's and NCCL's failures say (gloo/transport/tcp/pair.cc, ProcessGroupGloo.cpp,
# ProcessGroupNCCL.cpp) when they arrive as a plain RuntimeError.
_TRANSPORT_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Timed out waiting",
    "Socket Timeout",
    "gloo/transport",
    "NCCL error",
    "NCCL communicator was aborted",
)


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
    store = dist.TCPStore(
        addr,
        int(port),
        env.world_size,
        is_master=(env.rank == 0 and not agent_hosts),
        timeout=timeout,
        wait_for_workers=False,
    )
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
        for holder in list(_GROUP_HOLDERS):
            holder.release_groups()
        gc.collect()


class RankLiveness:
    """Each rank's current step in torchrun's store, to name the ranks that stopped when a
    collective fails."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        try:
            self.store = dist.distributed_c10d._get_default_store()
        except Exception:  # no store: errors just cannot name the rank
            self.store = None

    def mark(self, rank: int, step: int) -> None:
        if self.store is not None:
            self.store.set(f"alexnet2gpu/progress/{rank}", str(step))

    def silent_ranks(self, me: int, wait_s: float = 1.0) -> str:
        """Reports this rank's failure in the store, waits up to ``wait_s`` for the others'
        reports, and names the ranks that sent none: the dead or hung ones."""
        if self.store is None:
            return ""
        reported: set[int] = set()
        try:
            self.store.set_timeout(datetime.timedelta(seconds=2))
            self.store.set(f"alexnet2gpu/failed/{me}", "1")
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and len(reported) < self.world_size:
                reported |= {r for r in range(self.world_size) if self.store.check([f"alexnet2gpu/failed/{r}"])}
                time.sleep(0.05)
        except BaseException:  # the store is gone, or torchrun is stopping us: say what we know
            pass
        silent = [r for r in range(self.world_size) if r not in reported and r != me]
        if not silent or not reported:
            return ""
        steps = []
        for r in silent:
            try:
                key = f"alexnet2gpu/progress/{r}"
                steps.append(
                    f"rank {r} (last began step {int(self.store.get(key)) + 1})"
                    if self.store.check([key])
                    else f"rank {r}"
                )
            except BaseException:
                steps.append(f"rank {r}")
        return f"; not responding (dead or hung): {', '.join(steps)}"
