"""``fit --check``: the planner's largest batch run for real on CUDA, with the caching
allocator capped at the card's capacity less the CUDA context, a smaller card emulated on a
larger GPU: the predicted batch must fit, and the out-of-memory one above it is caught and
reported."""

from __future__ import annotations

import torch

from ..parallel import Numerics
from .fit import FitRow, Reserve

__all__ = ["check_on_cuda"]


def _real_step(row: FitRow, devices: list[torch.device], batch: int, **model_kwargs) -> dict:
    """One warm-up and one measured training step at ``batch`` on ``devices``; an
    out-of-memory is caught and reported, and everything the step held is freed."""
    import gc

    from ..models import build_model
    from ..parallel import place
    from .workload import make_batch, make_optimizer, train_step

    numerics = Numerics(row.precision)
    held: list = []
    try:
        placed = place(build_model(row.model, **model_kwargs), row.placement, ",".join(map(str, devices)))
        held.append(placed)
        x, y = make_batch(placed, batch)
        optimizer = make_optimizer(placed)
        held += [x, y, optimizer]
        scaler = numerics.grad_scaler("cuda")
        train_step(placed, optimizer, x, y, numerics, scaler)
        for d in devices:
            torch.cuda.synchronize(d)
            torch.cuda.reset_peak_memory_stats(d)
        train_step(placed, optimizer, x, y, numerics, scaler)
        for d in devices:
            torch.cuda.synchronize(d)
        return {"fits": True, "peak_bytes": [torch.cuda.max_memory_allocated(d) for d in devices]}
    except torch.OutOfMemoryError as error:
        return {"fits": False, "error": str(error).splitlines()[0][:300]}
    finally:
        held.clear()
        gc.collect()
        torch.cuda.empty_cache()


def check_on_cuda(row: FitRow, reserve: Reserve, **model_kwargs) -> dict:
    """Runs the real step on CUDA at the predicted batch and one above, the caching
    allocator capped at the card's capacity less the CUDA context
    (``set_per_process_memory_fraction``: a smaller card on a larger GPU): the predicted
    batch must fit, and the out-of-memory above it is caught and reported. Single-device
    placements run on cuda:0, split on cuda:0,cuda:1; ranks (torchrun) is not run here."""
    if row.placement == "ranks":
        return {"source": "measured", "skipped": "ranks runs under torchrun; split is planned the same"}
    need = 2 if row.placement == "split" else 1
    if torch.cuda.device_count() < need or row.largest_batch < 1:
        return {"source": "measured", "skipped": f"needs {need} CUDA device(s) and a batch that fits"}
    devices = [torch.device("cuda", i) for i in range(need)]
    totals = [torch.cuda.get_device_properties(d).total_memory for d in devices]
    allowed = row.capacity_bytes - reserve.context_bytes
    if allowed > min(totals):
        return {"source": "measured", "skipped": f"the card is larger than this GPU ({min(totals):,} bytes)"}
    for d, total in zip(devices, totals):
        torch.cuda.set_per_process_memory_fraction(allowed / total, d)
    try:
        steps = {
            str(b): _real_step(row, devices, b, **model_kwargs) for b in (row.largest_batch, row.largest_batch + 1)
        }
    finally:
        for d in devices:
            torch.cuda.set_per_process_memory_fraction(1.0, d)
    predicted = [dev["total_bytes"] - reserve.bytes for dev in row.devices]
    at = steps[str(row.largest_batch)]
    return {
        "source": "measured",
        "allocator_cap_bytes": allowed,
        "steps": steps,
        "predicted_peak_bytes": predicted,
        "measured_peak_bytes": at.get("peak_bytes"),
        "fits_at_batch": at["fits"],
        "exceeds_above": not steps[str(row.largest_batch + 1)]["fits"],
    }
