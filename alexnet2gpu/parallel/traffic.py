"""Bytes each process sends per training step: counted at the collectives, and the closed
form of the three ways to use several devices (docs/architecture.md, "Three ways to use two
devices").

**What "sends" means.** A collective over ``p`` processes on a tensor of ``n`` bytes (the
*whole* tensor: the all-reduced one, the all-gather's output, the reduce-scatter's input) is
charged as the ring algorithm sends it, per process:

==============  =======================  =========================
collective      bytes one process sends  e.g. p = 2
==============  =======================  =========================
all-reduce      2 (p - 1) / p x n        n
all-gather      (p - 1) / p x n          n / 2: its own share
reduce-scatter  (p - 1) / p x n          n / 2: the other's share
==============  =======================  =========================

This is NCCL's "bus bandwidth" accounting; gloo and NCCL may pick other algorithms (a
tree, halving-doubling) for some sizes, so the figure is the volume of the bandwidth-optimal
algorithm, not a capture of the wire. The ``ranks`` placement's
:class:`~.schedule.ExchangeCounter` already counts this way for ``p = 2``: an all-gather of
a tower's output charges that output once, its reduce-scatter charges the other tower's half.

Counted: :class:`CollectiveCounter` is fed by DDP's comm hook (:func:`counting_allreduce_hook`:
the bucket bytes of the gradient all-reduce), by the hybrid's label gather, and, inside
:func:`count_collectives`, by a dispatch mode that sees every functional collective DTensor
issues (the tensor-parallel fc6-fc8, forward and backward).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from fractions import Fraction

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "RING_FACTOR",
    "CollectiveCounter",
    "count_collectives",
    "counted_bytes",
    "counting_allreduce_hook",
    "hybrid_bytes",
    "hybrid_sizes",
    "replicas_bytes",
    "closed_form_bytes",
    "ring_bytes",
    "towers_bytes",
    "towers_bytes_per_image",
]

# Bytes one process sends, as a multiple of (p - 1) / p x the whole tensor's bytes.
RING_FACTOR = {"all_reduce": 2, "all_gather": 1, "reduce_scatter": 1, "all_to_all": 1}
FLOAT32_BYTES = 4
LABEL_BYTES = 8  # int64 class indices


def ring_bytes(kind: str, nbytes: int, processes: int) -> Fraction:
    """Bytes one process sends in collective ``kind`` over ``processes`` on a whole tensor
    of ``nbytes`` (see the module docstring); exact, as a fraction."""
    return Fraction(RING_FACTOR[kind] * (processes - 1) * nbytes, processes)


class CollectiveCounter:
    """Bytes this process sent at the collectives, by kind, in the ring accounting.
    Thread-safe: DDP's hooks run in the autograd engine's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent: dict[str, Fraction] = {}
        self.calls = 0

    def add(self, kind: str, nbytes: int, processes: int, label: str = "") -> None:
        """Books one collective ``kind`` on a whole tensor of ``nbytes`` over ``processes``,
        under ``label: kind`` (e.g. ``"trunk gradients: all_reduce"``)."""
        sent = ring_bytes(kind, nbytes, processes)
        key = f"{label}: {kind}" if label else kind
        with self._lock:
            self._sent[key] = self._sent.get(key, Fraction(0)) + sent
            self.calls += 1

    def add_labelled(self, label: str, kind: str, nbytes: int, processes: int) -> None:
        """As :meth:`add`, booked under ``label``."""
        self.add(kind, nbytes, processes, label)

    @property
    def bytes(self) -> int | float:
        """Bytes sent in all; an int whenever the ring accounting comes out whole (always
        for float32 tensors over 2 or 4 processes)."""
        with self._lock:
            total = sum(self._sent.values(), Fraction(0))
        return int(total) if total.denominator == 1 else float(total)

    def by_kind(self) -> dict[str, float]:
        with self._lock:
            return {k: float(v) for k, v in sorted(self._sent.items())}

    def reset(self) -> None:
        with self._lock:
            self._sent.clear()
            self.calls = 0

    def __getstate__(self) -> dict:  # a lock does not copy or pickle: a copy gets its own
        with self._lock:
            return {"sent": dict(self._sent), "calls": self.calls}

    def __setstate__(self, state: dict) -> None:
        self._lock = threading.Lock()
        self._sent, self.calls = dict(state["sent"]), state["calls"]


class HookState:
    """What :func:`counting_allreduce_hook` needs: the group, whether to average (data
    parallel: the mean of the replicas' gradients) or sum (the hybrid's trunk), the counter."""

    def __init__(self, counter: CollectiveCounter, label: str, *, average: bool, group=None) -> None:
        self.counter, self.label, self.average, self.group = counter, label, average, group

    def size(self) -> int:
        return dist.get_world_size(self.group)


def counting_allreduce_hook(state: HookState, bucket):  # no return annotation: DDP checks it
    """DDP's default all-reduce (``default_hooks.allreduce_hook``: divide, then all-reduce
    the bucket; a ``torch.futures.Future`` of the result), counting the bucket's bytes; with
    ``state.average`` False the gradients are summed instead of averaged."""
    buffer = bucket.buffer()
    processes = state.size()
    state.counter.add_labelled(state.label, "all_reduce", buffer.numel() * buffer.element_size(), processes)
    if state.average:
        buffer.div_(processes)
    work = dist.all_reduce(buffer, group=state.group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def _group_size(name) -> int:
    return dist.get_world_size(dist.distributed_c10d._resolve_process_group(name))


class _FunctionalCollectives(TorchDispatchMode):
    """Books every functional collective (``torch.ops._c10d_functional``, what DTensor's
    redistributions call) in ``counter``: forward and, for a backward started inside the
    mode, backward (the autograd engine carries the mode to its threads)."""

    def __init__(self, counter: CollectiveCounter, label: str) -> None:
        super().__init__()
        self.counter, self.label = counter, label
        ops = torch.ops._c10d_functional
        self._kinds = {
            ops.all_gather_into_tensor.default: "all_gather",
            ops.reduce_scatter_tensor.default: "reduce_scatter",
            ops.all_reduce.default: "all_reduce",
            ops.all_to_all_single.default: "all_to_all",
        }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = self._kinds.get(func)
        if kind is not None:
            tensor = args[0]
            nbytes = tensor.numel() * tensor.element_size()
            if kind == "all_gather":
                processes = args[1]
                nbytes *= processes  # the gathered tensor
            elif kind == "reduce_scatter":
                processes = args[2]
            else:
                processes = _group_size(args[-1])
            self.counter.add_labelled(self.label, kind, nbytes, processes)
        return func(*args, **(kwargs or {}))


def _traffic(placed: nn.Module) -> CollectiveCounter:
    counter = placed.traffic
    if counter is None:
        raise TypeError(f"{type(placed).__name__} counts no collectives (replicas and hybrid do)")
    return counter


@contextlib.contextmanager
def count_collectives(placed: nn.Module) -> Iterator[CollectiveCounter]:
    """Counts what ``placed`` (``replicas``, ``hybrid``) sends at its collectives inside the
    block: wrap a whole training step, forward *and* ``backward()``. Resets the counter on
    entry; yields it (read ``.bytes`` after the block)."""
    counter = _traffic(placed)
    counter.reset()
    with _FunctionalCollectives(counter, "fully connected activations"):
        yield counter


# Closed forms: bytes each process sends per training step, float32.


def replicas_bytes(params: int, processes: int, dtype_bytes: int = FLOAT32_BYTES) -> Fraction:
    """Data parallel: one all-reduce of every gradient, whatever the batch:
    2 (p - 1) / p x the parameter bytes (p = 2: the parameter bytes themselves)."""
    return ring_bytes("all_reduce", params * dtype_bytes, processes)


def hybrid_sizes(model: nn.Module) -> dict[str, int | list[int]]:
    """What :func:`hybrid_bytes` needs from a single-stream net: the conv trunk's parameter
    count, the input width of each fully connected layer (fc6, fc7, fc8) and the classes."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    fc_params = sum(p.numel() for m in linears for p in m.parameters())
    return {
        "trunk_params": sum(p.numel() for p in model.parameters()) - fc_params,
        "fc_inputs": [m.in_features for m in linears],
        "classes": linears[-1].out_features,
    }


def hybrid_bytes(
    batch: int,
    trunk_params: int,
    fc_inputs: Sequence[int],
    classes: int,
    processes: int,
    activation_bytes: int = FLOAT32_BYTES,
) -> Fraction:
    """The 2014 hybrid (:mod:`.hybrid`), global batch ``batch`` over ``processes``:

    * the trunk's gradient all-reduce: 2 (p - 1) / p x 4 x trunk params;
    * each fully connected layer's input, whole batch: an all-gather forward and a
      reduce-scatter of its gradient backward: 2 (p - 1) / p x 4 x batch x (fc6 + fc7 + fc8
      inputs);
    * the logits gathered (each process's slice of the classes, padded to ceil(C / p) as
      DTensor pads an uneven shard): (p - 1) / p x 4 x batch x p x ceil(C / p);
    * the labels gathered: (p - 1) / p x 8 x batch.

    ``activation_bytes``: the size of an activation (fc inputs, logits): 2 under bf16/fp16
    autocast, whose gradients stay float32.
    """
    p, a = processes, activation_bytes
    total = ring_bytes("all_reduce", trunk_params * FLOAT32_BYTES, p)
    total += 2 * ring_bytes("all_gather", batch * sum(fc_inputs) * a, p)
    total += ring_bytes("all_gather", batch * p * -(-classes // p) * a, p)
    total += ring_bytes("all_gather", batch * LABEL_BYTES, p)
    return total


def towers_bytes_per_image(model: nn.Module, activation_bytes: int = FLOAT32_BYTES) -> int:
    """The 2012 towers (``ranks``, one replica): bytes each tower's process sends per image
    and training step. Forward, at exchanges 1-3, its conv2 output (after pooling), its
    pool5 output and its fc6 output; backward the other tower's half of each gradient,
    the same sizes; and one fc7-sized tensor at exchange 4 (tower b's output forward, its
    gradient back from tower a). Width 1, 227 px: 58,624 floats, 234,496 bytes, the design's
    468,992 per image for the two processes together."""
    from ..models.sizes import conv1_out_2012, pool5_size, pooled

    tower = model.tower_a
    side2 = pooled(pooled(conv1_out_2012(model.image_size)))
    side5 = pool5_size("dual", model.image_size)
    fc = tower.fc6.out_features
    floats = 2 * (tower.conv2.out_channels * side2**2 + tower.conv5.out_channels * side5**2 + fc) + fc
    return floats * activation_bytes


def towers_bytes(batch: int, model: nn.Module, activation_bytes: int = FLOAT32_BYTES) -> int:
    """The 2012 towers: :func:`towers_bytes_per_image` x the batch, per process."""
    return batch * towers_bytes_per_image(model, activation_bytes)


def closed_form_bytes(
    placement: str, model: nn.Module, batch: int, processes: int, activation_bytes: int = FLOAT32_BYTES
) -> int | float:
    """Bytes each process sends per training step under ``placement`` for the unplaced
    ``model`` and global ``batch``: ``ranks`` (the towers' exchanges for one replica's share of
    the batch; DDP's all-reduce between replicas is not counted there), ``replicas``,
    ``hybrid``. ``activation_bytes``: 2 under bf16/fp16 autocast (activations exchanged in
    the low precision; gradients all-reduced in float32)."""
    if placement == "ranks":
        return towers_bytes(batch // max(1, processes // 2), model, activation_bytes)
    if placement == "replicas":
        total = replicas_bytes(sum(p.numel() for p in model.parameters()), processes)
    elif placement == "hybrid":
        total = hybrid_bytes(batch, processes=processes, activation_bytes=activation_bytes, **hybrid_sizes(model))
    else:
        raise ValueError(f"placement '{placement}' sends nothing between processes")
    return int(total) if total.denominator == 1 else float(total)


def counted_bytes(placed: nn.Module) -> int | float:
    """What ``placed`` counted since its counter was last reset: ``ranks``'s exchanges, or the
    collectives of ``replicas`` and ``hybrid``."""
    exchanges = placed.exchange_counter
    return exchanges.bytes if exchanges is not None else _traffic(placed).bytes
