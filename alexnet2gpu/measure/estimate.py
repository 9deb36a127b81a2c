"""Memory per device without the devices: one real training step (on the CPU, or wherever
the net is placed), accounted per *intended* device from its tensors. Labelled
``estimated``.

Parameters, gradients and momentum buffers are charged to their owner (``split``: tower a
and fc8 on device 0, tower b on device 1, even when split runs on ``cpu,cpu``).
Activations are the tensors autograd saves for the backward, seen through
``torch.autograd.graph.saved_tensors_hooks`` and charged to the part of the net that was
running (forward pre-hooks on its modules), each storage once per device. The estimated
peak is params + grads + optimizer + activations + the input batch: it leaves out
temporaries (workspaces, the gradient of the activation being freed), and counts
gradients and activations as if they coexisted in full.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models import build_model
from ..parallel import Layout, devices_of, forward_loss, place
from .accounting import MemoryReport, build_report, nbytes, parts, reset_exchange_counter, rss_peak_bytes, slot_labels
from .workload import make_batch, make_optimizer

__all__ = ["estimate_memory", "largest_batch_that_fits"]


class _ActivationAccountant:
    """Charges every tensor autograd saves during a forward pass to the device slot of the
    part of the net that is running, each storage once per slot; parameters (saved by conv
    and linear layers) are already counted as parameters and are skipped."""

    def __init__(self, placed: nn.Module, slots: int, skip: list[torch.Tensor]) -> None:
        self.bytes = [0] * slots
        self.slot = 0
        # parameters are counted as parameters; the input batch is counted where it was made
        # (slot 0), while a copy of it made for another slot is that slot's activation
        self._params = {p.untyped_storage().data_ptr() for p in placed.parameters()}
        self._seen: set[tuple[int, int]] = {(0, t.untyped_storage().data_ptr()) for t in skip}
        self._handles = []
        for _name, module, slot in parts(placed):
            for sub in module.modules():
                self._handles.append(sub.register_forward_pre_hook(self._entering(slot)))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _entering(self, slot: int):
        def hook(_module, _inputs):
            self.slot = slot

        return hook

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        key = (self.slot, ptr)
        if ptr not in self._params and key not in self._seen:
            self._seen.add(key)
            self.bytes[self.slot] += storage.nbytes()
        return t

    def __enter__(self) -> _ActivationAccountant:
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
) -> MemoryReport:
    """Runs one real training step on ``placed`` (wherever it is) and accounts its memory
    per intended device from the tensors. ``labels`` names the devices the estimate is for
    (default: where ``placed`` runs); ``planned_for`` says so in the note when the step ran
    on stand-ins (e.g. ``cuda:0,cuda:1`` estimated on ``cpu,cpu``)."""
    labels = labels or slot_labels(placed)
    slots = len(labels)
    x, y = make_batch(placed, batch_size, seed=seed)
    optimizer = make_optimizer(placed)
    placed.train()
    reset_exchange_counter(placed)
    optimizer.zero_grad(set_to_none=True)
    with _ActivationAccountant(placed, slots, skip=[x]) as accountant:
        loss = forward_loss(placed, x, y)
    loss.backward()
    optimizer.step()
    layout = placed.layout
    ranks_cpu = layout.distributed and layout.device.type == "cpu"
    del loss
    ran_on = ",".join(sorted({str(d) for d in devices_of(placed)}))
    head = f"estimated for {planned_for} (not on this machine)" if planned_for else "estimated"
    return build_report(
        placed,
        model_name,
        batch_size,
        width,
        optimizer,
        labels,
        "estimated",
        activations=accountant.bytes,
        peaks=None,
        input_bytes=[nbytes(x)] + [0] * (slots - 1),
        rss_peak_bytes=rss_peak_bytes() if ranks_cpu else None,
        note=(
            f"{head}: accounted from the tensors of one real step on {ran_on}; "
            "peak = params + grads + optimizer + activations + input, without temporaries"
        ),
    )


def largest_batch_that_fits(
    model_name: str, layout: Layout, capacity_bytes: int, slot: int = 0, **model_kwargs
) -> tuple[int, int, int]:
    """(largest batch, fixed bytes, bytes per image) for device ``slot`` of ``layout``,
    from the estimator at batch 1 and 2 on the CPU: the estimated peak grows linearly with
    the batch (activations and input), the rest is fixed (params, grads, optimizer). Towers
    apart (``split``, or one tower per process under ``ranks``) are planned as ``split`` on
    ``cpu,cpu``."""
    if layout.towers_apart:
        plan = Layout("split", (torch.device("cpu"), torch.device("cpu")))
    else:
        plan = Layout(layout.placement, (torch.device("cpu"),))
    peaks = []
    for b in (1, 2):
        torch.manual_seed(0)
        placed = place(build_model(model_name, **model_kwargs), plan)
        report = estimate_memory(placed, model_name, b)
        peaks.append(report.devices[min(slot, len(report.devices) - 1)].peak_bytes)
    per_image = max(1, peaks[1] - peaks[0])
    fixed = peaks[0] - per_image
    return max(0, math.floor((capacity_bytes - fixed) / per_image)), fixed, per_image
