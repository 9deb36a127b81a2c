"""What goes wrong in a run, and the one line that says so: non-finite values, a rank
that died or hangs, and the test-only faults that make those happen on purpose.

Test-only fault injection: ``ALEXNET2GPU_FAULT=<what>:rank<R>:step<S>`` with ``what`` one of
``kill`` (the process kills itself with SIGKILL), ``hang`` (sleeps for an hour),
``nan-loss`` (the loss on the rank that holds fc8 becomes NaN), ``nan-grad`` (rank R's
gradients become NaN). It fires only in torchrun's first attempt
(``TORCHELASTIC_RESTART_COUNT`` 0), so a restarted job runs clean. It exists for
tests/test_train.py; do not use it otherwise.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import Alexnet2gpuError, ConfigError
from ..parallel import Layout
from ..parallel.distributed import RankLiveness, is_collective_error
from ..parallel.state import local_part

__all__ = ["Fault", "collective_failure", "diverging_message", "grad_flags", "nonfinite_message", "weights_nonfinite"]


@dataclass(frozen=True)
class Fault:
    """A test-only fault: ``what`` happens on global rank ``rank`` in step ``step``."""

    what: str
    rank: int
    step: int

    @classmethod
    def from_environ(cls) -> Fault | None:
        spec = os.environ.get("ALEXNET2GPU_FAULT")
        if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return None
        try:
            what, rank, step = spec.split(":")
            return cls(what, int(rank.removeprefix("rank")), int(step.removeprefix("step")))
        except ValueError:
            raise ConfigError(f"ALEXNET2GPU_FAULT={spec}: expected WHAT:rankR:stepS (test-only)") from None

    def before_forward(self, layout: Layout, step: int) -> None:
        """``kill`` and ``hang`` on their rank, as the step begins."""
        if step != self.step or layout.rank != self.rank:
            return
        if self.what == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.what == "hang":
            time.sleep(3600)

    def spoil_loss(self, loss: torch.Tensor, holds_loss: bool, step: int) -> torch.Tensor:
        return loss * float("nan") if self.what == "nan-loss" and step == self.step and holds_loss else loss

    def spoil_gradients(self, placed: nn.Module, layout: Layout, step: int) -> None:
        if self.what == "nan-grad" and step == self.step and layout.rank == self.rank:
            next(iter(placed.parameters())).grad.fill_(float("nan"))


def _tower_of(name: str) -> str:
    head = name.split(".", 1)[0]
    return {"tower_a": "a", "tower_b": "b", "fc8": "a"}.get(head, "a")


def grad_flags(placed: nn.Module, device: torch.device) -> torch.Tensor:
    """``[tower a has a non-finite gradient, tower b has one]`` as 0/1 float64 on
    ``device``, computed there without a host sync (read it when the numbers are needed);
    single-stream nets count as tower a; of a DTensor (hybrid) this process's part (the
    flags are summed over the ranks at the sync point). Each tower's flags are reduced on the tower's own
    device (``split`` has two) before one small copy to ``device``."""
    finite: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    for name, p in placed.named_parameters():
        if p.grad is not None:
            finite[_tower_of(name)].append(torch.isfinite(local_part(p.grad)).all())
    flags = [
        torch.stack(f).all().logical_not().to(device, torch.float64)
        if f
        else torch.zeros((), dtype=torch.float64, device=device)
        for f in (finite["a"], finite["b"])
    ]
    return torch.stack(flags)


def weights_nonfinite(placed: nn.Module, device: torch.device) -> torch.Tensor:
    """1.0 (float64, on ``device``) when any weight is non-finite, else 0.0; no host sync."""
    bad = [torch.isfinite(local_part(p.detach())).all().logical_not().to(device) for p in placed.parameters()]
    return torch.stack(bad).any().to(torch.float64)


def nonfinite_message(step: int, bad_loss: float, bad_a: float, bad_b: float, two_towers: bool = True) -> str:
    """Which values went non-finite; towers are named only for a two-tower net."""
    what = []
    if bad_loss:
        what.append("loss (in tower a, which holds fc8)" if two_towers else "loss")
    towers = [t for t, bad in (("a", bad_a), ("b", bad_b)) if bad]
    if towers:
        what.append("gradients in tower " + " and tower ".join(towers) if two_towers else "gradients")
    return f"non-finite {' and '.join(what)} at step {step}"


def diverging_message(step: int, start: float, loss: float, steps: int, lr: float) -> str:
    return (
        f"the run is diverging: the training loss has stayed above twice its start ({start:.3g}) for {steps} "
        f"steps, {loss:.3g} at step {step}; the likely cause is a learning rate too high for this net and "
        f"data: try --lr {lr / 3:.2g}"
    )


def collective_failure(
    layout: Layout, liveness: RankLiveness | None, step: int, timeout: float, error: RuntimeError
) -> Exception:
    """A failed collective as one line naming the ranks that stopped; other errors (this
    rank's own: a shape, out of memory, a bug) as they are, never as a peer's death."""
    if not layout.distributed or not is_collective_error(error):
        return error
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    where = liveness.silent_ranks(layout.rank) if liveness else ""
    failure = Alexnet2gpuError(
        f"rank {layout.rank}: a collective failed at step {step} (process-group timeout {timeout:g}s){where}: {first}"
    )
    failure.rank_specific = True  # every rank prints its own (other errors: rank 0 only)
    return failure
