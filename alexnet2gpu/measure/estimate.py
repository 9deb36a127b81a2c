"""Memory per device without the devices: one real training step (on the CPU, or wherever
the net is placed, or under ``FakeTensorMode``), accounted per *intended* device from its
tensors. Labelled ``estimated``.

Parameters, gradients and momentum buffers are charged to their owner (``split``: tower a
and fc8 on device 0, tower b on device 1, even when split runs on ``cpu,cpu``).
Activations are the tensors autograd saves for the backward, seen through
``torch.autograd.graph.saved_tensors_hooks`` and charged to the part of the net that was
running (forward pre-hooks on its modules), each storage once per device, counted by dtype.
Under autocast the float32 weights stay float32 (and so do their gradients and momentum);
the low-precision copies of the weights that conv and linear layers save for the backward
are a category of their own, *weight casts*, not activations. The estimated peak is
params + grads + optimizer + activations + weight casts + the input batch: it leaves out
temporaries (workspaces, the gradient of the activation being freed), and counts
gradients and activations as if they coexisted in full.
"""

from __future__ import annotations

import copy
import functools
import math

import torch
from torch import nn

from ..models import build_model
from ..parallel import FP32, Layout, Numerics, devices_of, forward_loss, place
from .accounting import (
    MemoryReport,
    build_report,
    collectives_counted,
    nbytes,
    parts,
    reset_exchange_counter,
    rss_peak_bytes,
    slot_labels,
)
from .workload import make_batch, make_optimizer

__all__ = ["SavedTensorAccountant", "estimate_memory", "largest_batch_that_fits"]

# The nodes between a parameter and a copy of it saved for the backward: autocast's cast
# (ToCopyBackward0), grouped's joined weights (CatBackward0), views (linear saves the
# transposed cast: TBackward0 -> ToCopyBackward0 -> AccumulateGrad).
_COPY_NODES = {
    "ToCopyBackward0",
    "CatBackward0",
    "TBackward0",
    "TransposeBackward0",
    "ViewBackward0",
    "PermuteBackward0",
    "ExpandBackward0",
}
_COPY_GRAPH_LIMIT = 16  # nodes walked before a saved tensor counts as an activation


def _storage(t: torch.Tensor) -> torch.UntypedStorage:
    """The storage this process holds of ``t``: a DTensor's (``hybrid``'s fc layers) is its
    local shard's."""
    return getattr(t, "_local_tensor", t).untyped_storage()


def _storage_key(t: torch.Tensor) -> int:
    """Identifies a tensor's storage, for real and fake tensors alike (a fake tensor's
    data_ptr is 0 for all of them; its StorageImpl is its own)."""
    return _storage(t)._cdata


class SavedTensorAccountant:
    """Charges every tensor autograd saves during a forward pass to the device slot of the
    part of the net that is running, each storage once per slot, by dtype. Parameters
    (saved by conv and linear layers in float32) are already counted as parameters and are
    skipped; autocast's low-precision copies of them are counted apart, as weight casts."""

    def __init__(self, placed: nn.Module, slots: int, skip: list[torch.Tensor]) -> None:
        self.by_dtype: list[dict[str, int]] = [{} for _ in range(slots)]
        self.weight_casts = [0] * slots
        self.slot = 0
        # parameters are counted as parameters; the input batch is counted where it was made
        # (slot 0), while a copy of it made for another slot is that slot's activation
        self._param_ids = {id(p) for p in placed.parameters()}
        self._params = {_storage_key(p) for p in placed.parameters()}
        self._seen: set[tuple[int, int]] = {(0, _storage_key(t)) for t in skip}
        self._handles = []
        for _name, module, slot in parts(placed):
            for sub in module.modules():
                self._handles.append(sub.register_forward_pre_hook(self._entering(slot)))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def activations(self) -> list[int]:
        return [sum(d.values()) for d in self.by_dtype]

    def _entering(self, slot: int):
        def hook(_module, _inputs):
            self.slot = slot

        return hook

    def _is_weight_cast(self, t: torch.Tensor) -> bool:
        """``t`` is a copy of parameters made in the step: autocast's cast of a weight
        (ToCopyBackward0 straight over the parameter's AccumulateGrad), a view of one, or
        ``grouped``'s two towers' weights joined (CatBackward0): every path down its graph
        passes only such nodes and ends at a parameter's AccumulateGrad."""
        stack, visited = [t.grad_fn], 0
        while stack:
            node = stack.pop()
            visited += 1
            if node is None or visited > _COPY_GRAPH_LIMIT:
                return False
            name = type(node).__name__
            if name == "AccumulateGrad":
                if id(node.variable) not in self._param_ids:
                    return False
                continue
            if name not in _COPY_NODES:
                return False
            stack.extend(n for n, _ in node.next_functions if n is not None)
        return visited > 1  # a copy, not the parameter itself

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = _storage_key(t)
        key = (self.slot, storage)
        if storage in self._params or key in self._seen:
            return t
        self._seen.add(key)
        size = _storage(t).nbytes()
        if self._is_weight_cast(t):
            self.weight_casts[self.slot] += size
        else:
            dtype = str(t.dtype).removeprefix("torch.")
            self.by_dtype[self.slot][dtype] = self.by_dtype[self.slot].get(dtype, 0) + size
        return t

    def __enter__(self) -> SavedTensorAccountant:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()


def estimate_memory(
    placed: nn.Module,
    model_name: str,
    batch_size: int,
    *,
    seed: int = 0,
    width: float = 1.0,
    labels: list[str] | None = None,
    planned_for: str = "",
    numerics: Numerics = FP32,
    backward: bool = True,
) -> MemoryReport:
    """Runs one real training step on ``placed`` (wherever it is; under ``FakeTensorMode``
    nothing is computed) with the forward under ``numerics``' autocast, and accounts its
    memory per intended device from the tensors. ``labels`` names the devices the estimate
    is for (default: where ``placed`` runs); ``planned_for`` says so in the note when the
    step ran on stand-ins (e.g. ``cuda:0,cuda:1`` estimated on ``cpu,cpu``). ``backward``
    False: the forward alone (no gradients, no momentum: their bytes are 0 in the report)."""
    labels = labels or slot_labels(placed)
    slots = len(labels)
    x, y = make_batch(placed, batch_size, seed=seed)
    optimizer = make_optimizer(placed)
    placed.train()
    reset_exchange_counter(placed)
    optimizer.zero_grad(set_to_none=True)
    with collectives_counted(placed):
        with SavedTensorAccountant(placed, slots, skip=[x]) as accountant, numerics.autocast(devices_of(placed)):
            loss = forward_loss(placed, x, y)
        if backward:
            loss.backward()
            optimizer.step()
    layout = placed.layout
    ranks_cpu = layout.distributed and layout.device.type == "cpu"
    del loss
    ran_on = ",".join(sorted({str(d) for d in devices_of(placed)}))
    head = f"estimated for {planned_for} (not on this machine)" if planned_for else "estimated"
    casts = " + weight casts (autocast's low-precision copies of the weights)" if numerics.mixed else ""
    return build_report(
        placed,
        model_name,
        batch_size,
        width,
        optimizer,
        labels,
        "estimated",
        activations=accountant.activations,
        activations_by_dtype=accountant.by_dtype,
        weight_casts=accountant.weight_casts,
        numerics=numerics,
        peaks=None,
        input_bytes=[nbytes(x)] + [0] * (slots - 1),
        rss_peak_bytes=rss_peak_bytes() if ranks_cpu else None,
        note=(
            f"{head}: accounted from the tensors of one real step on {ran_on} in {numerics.precision}; "
            f"peak = params + grads + optimizer + activations{casts} + input, without temporaries"
        ),
    )


def planning_layout(layout: Layout) -> Layout:
    """The CPU layout a plan of ``layout`` runs on: towers apart (``split``, or one tower per
    process under ``ranks``) as ``split`` on ``cpu,cpu``, the rest on one ``cpu``."""
    if layout.towers_apart:
        return Layout("split", (torch.device("cpu"), torch.device("cpu")))
    return Layout(layout.placement, (torch.device("cpu"),))


@functools.lru_cache(maxsize=8)
def _meta_model(model_name: str, model_kwargs: tuple) -> nn.Module:
    """``model_name`` built on the meta device, once per configuration (its initialisation
    runs through torch's Python reference ops on meta, the slow part of a plan): callers
    place a deep copy."""
    with torch.device("meta"):
        return build_model(model_name, **dict(model_kwargs))


def plan_memory(
    model_name: str,
    layout: Layout,
    batch_size: int,
    *,
    numerics: Numerics = FP32,
    backward: bool = True,
    **model_kwargs,
) -> MemoryReport:
    """:func:`estimate_memory` of ``model_name`` placed as ``layout`` (see
    :func:`planning_layout`) without computing anything: the net is built on the meta device
    and the step runs under ``FakeTensorMode``, whose tensors have shapes, dtypes and
    storages but no data. The same accounting as a real step, in a fraction of its time."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = copy.deepcopy(_meta_model(model_name, tuple(sorted(model_kwargs.items()))))
    with FakeTensorMode(allow_non_fake_inputs=True):
        placed = place(model, planning_layout(layout))
        report = estimate_memory(
            placed,
            model_name,
            batch_size,
            width=model_kwargs.get("width", 1.0),
            numerics=numerics,
            backward=backward,
        )
    report.note = report.note.replace("one real step", "one step under FakeTensorMode (no data)")
    return report


def largest_batch_that_fits(
    model_name: str, layout: Layout, capacity_bytes: int, slot: int = 0, *, numerics: Numerics = FP32, **model_kwargs
) -> tuple[int, int, int]:
    """(largest batch, fixed bytes, bytes per image) for device ``slot`` of ``layout``,
    from the planned step (:func:`plan_memory`) at batch 1 and 2: the estimated peak grows
    linearly with the batch (activations and input), the rest is fixed (params, grads,
    optimizer, weight casts). Towers apart are planned as ``split`` on ``cpu,cpu``."""
    peaks = []
    for b in (1, 2):
        report = plan_memory(model_name, layout, b, numerics=numerics, **model_kwargs)
        peaks.append(report.devices[min(slot, len(report.devices) - 1)].peak_bytes)
    per_image = max(1, peaks[1] - peaks[0])
    fixed = peaks[0] - per_image
    return max(0, math.floor((capacity_bytes - fixed) / per_image)), fixed, per_image
