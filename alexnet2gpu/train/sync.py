"""The training loop's reads of the device: a step's numbers (loss, correct count,
non-finite flags) stay on the device as a :class:`PendingStep` until a sync point, where
:func:`sync` all-reduces every pending step at once, reads them with one host sync, and
writes, displays and checks each in order. On a GPU every ``float()``, ``.item()`` or
``bool()`` of a device tensor waits for its queue; reading once per interval, as nanoGPT
reads its loss once per ``log_interval``, keeps the GPU fed.

``run`` is the loop's ``_Run`` (:mod:`.loop`): its config, layout, metrics, display,
means, optimizer, numerics, the pending steps and ``sum_over_ranks``.

fp16 (``--precision fp16``): non-finite gradients are those of the scaled loss, and an
overflow of the loss scale is routine: the scaler skips that step and halves its scale
(every rank alike), so such a step is recorded as skipped with its loss scale, counted
in ``overflows``, and is not a fault. A non-finite *loss* is one in every precision.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass

import torch

from ..errors import Alexnet2gpuError
from .config import DIVERGENCE_FACTOR, DIVERGENCE_STEPS, StepRecord
from .faults import diverging_message, nonfinite_message

__all__ = ["PendingStep", "agreed_signal", "check_divergence", "on_nonfinite", "sync"]


@dataclass
class PendingStep:
    """A step done whose numbers are still on the device, read at the next sync point."""

    step: int
    epoch: int
    lr: float
    host_seconds: float  # the host's time in the step (on a GPU: launching; the rest shows at the sync)
    stats: torch.Tensor  # [loss, correct, seen, non-finite loss, ... gradients in tower a, in b, loss scale], float64


def agreed_signal(run) -> int:
    """SIGINT or SIGTERM when any rank received one (0: none): host flags, summed over the
    CPU (gloo) under ``ranks``, so no rank waits for its device."""
    signum = run.signals.signum if run.signals else 0
    flags = [float(signum == signal.SIGINT), float(signum == signal.SIGTERM)]
    if run.layout.distributed:  # one process needs no tensor at all
        flags = run.sum_over_ranks(torch.tensor(flags, dtype=torch.float64)).tolist()
    return signal.SIGINT if flags[0] else signal.SIGTERM if flags[1] else 0


def sync(run) -> bool:
    """A sync point: one all-reduce of every pending step's numbers and one host read,
    then each step's record written, displayed and checked in order (non-finite values,
    divergence). Returns whether the last step read was non-finite (and so skipped)."""
    if not run.pending:
        return False
    pending, run.pending = run.pending, []
    t0 = time.perf_counter()
    rows = run.sum_over_ranks(torch.stack([p.stats for p in pending])).tolist()  # the one host sync
    waited = (time.perf_counter() - t0) / len(pending)  # the device's time not seen while launching
    nonfinite = False
    scaled = run.numerics.scaled
    for p, (loss_sum, correct, seen, bad_loss, bad_a, bad_b, scale_sum) in zip(pending, rows):
        dt = p.host_seconds + waited
        overflow = scaled and not bad_loss and bool(bad_a or bad_b)  # the scaler skipped it: routine
        if overflow:
            bad_a = bad_b = 0.0
            run.overflows += 1
        nonfinite = bool(bad_loss or bad_a or bad_b)
        if nonfinite:
            on_nonfinite(run, nonfinite_message(p.step, bad_loss, bad_a, bad_b, run.layout.two_towers), p)
        if run.config.compile and run.compile_seconds is None:
            run.compile_seconds = dt  # the first step compiles: kept out of images/s
        else:
            run.train_seconds += dt
            run.images += seen
        record = StepRecord(
            step=p.step,
            epoch=p.epoch,
            loss=float("nan") if nonfinite else loss_sum / run.layout.dp_size,
            accuracy=correct / seen if seen else 0.0,
            lr=p.lr,
            images_per_s=seen / dt if dt > 0 else 0.0,
            skipped=nonfinite or overflow,
            loss_scale=scale_sum / run.layout.dp_size if scaled else None,
        )
        if not nonfinite:
            run.means.add(record.loss, correct, seen)
        run.metrics.write(record.to_json())
        if run.display:
            run.display.update(record)
        if not nonfinite:
            check_divergence(run, record)
    return nonfinite


def check_divergence(run, record: StepRecord) -> None:
    """Stops a run whose loss stays far above its start (every rank sees the same loss)."""
    if run.loss_start is None:
        run.loss_start = record.loss
    run.above_start = run.above_start + 1 if record.loss > DIVERGENCE_FACTOR * run.loss_start else 0
    if run.above_start >= DIVERGENCE_STEPS:
        message = diverging_message(record.step, run.loss_start, record.loss, DIVERGENCE_STEPS, record.lr)
        run.metrics.write({"event": "diverged", "step": record.step, "message": message})
        raise Alexnet2gpuError(message)


def on_nonfinite(run, message: str, pending: PendingStep) -> None:
    """Stops the run, or (``--on-nonfinite skip``) drops this step's gradients."""
    policy = run.config.on_nonfinite
    run.metrics.write({"event": "nonfinite", "step": pending.step, "action": policy, "message": message})
    if policy == "stop":
        raise Alexnet2gpuError(
            f"{message}: stopped, no checkpoint written for it; the likely cause is a learning rate too high "
            f"for this net and data: try --lr {pending.lr / 3:.2g} (or --on-nonfinite skip to skip such steps)"
        )
    run.optimizer.zero_grad(set_to_none=True)
    run.skipped += 1
    if run.display:
        run.display.note(f"{message}: step skipped")
