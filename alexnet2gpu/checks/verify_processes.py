"""Proves that a torchrun placement (``ranks``, ``replicas``, ``hybrid``) computes the
single-process function: the same loss and parameter gradients as the net's own forward in
float64 on the CPU, for the same weights and global batch, and that the bytes it counts at
its collectives equal the closed form (:mod:`alexnet2gpu.parallel.traffic`).

Runs *inside* a process group that is already up (torchrun, gloo or NCCL): every rank calls
:func:`check_processes` with the same arguments and gets the same record back.

**The reference under data parallelism.** Each data-parallel replica reads its own share of
the global batch and draws its own dropout masks, so the reference cuts the global batch into
``dp_size`` equal shares, runs share ``r`` with replica ``r``'s masks
(``seed_dropout(reference, seed, replica=r)``) and takes the mean of the shares' losses (with
equal shares, the mean over the whole batch). For ``dual`` this holds with dropout on
(``TowerDropout`` draws per (seed, replica, tower)); the single-stream nets draw dropout masks
from torch's global RNG, which no reference can replay, so they are checked with dropout 0,
and so is ``hybrid``.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..models import build_model, init_xavier_, seed_dropout, smallest_image_size
from ..parallel import FP32, Numerics, close_distributed, forward_loss, full_gradients, place, set_cpu_threads
from ..parallel.traffic import closed_form_bytes, count_collectives, counted_bytes
from .verify import FP16_LOSS_SCALE, TOLERANCE, global_relative_error, relative_error, tolerances

__all__ = ["ProcessCheck", "check_processes", "count_step", "reference_step", "run_checks"]


@dataclass
class ProcessCheck:
    placement: str
    model: str
    processes: int
    batch_size: int  # the global batch
    dropout: float
    loss: float
    loss_rel_err: float
    grads_rel_err: float
    worst_grad: str  # the parameter whose gradient differs most
    sent_bytes: list[float] = field(default_factory=list)  # counted, per process, one step
    closed_form_bytes: float = 0.0  # per process, one step
    tolerance: float = TOLERANCE  # the loss (and the gradients where grads_tolerance is None)
    precision: str = "fp32"
    grads_tolerance: float | None = None
    grads_norm: str = "max"  # "max": each tensor's largest element; "global": all gradients as one vector
    worst_rank: int = 0  # the rank whose gradients differ most

    @property
    def bytes_ok(self) -> bool:
        return all(sent == self.closed_form_bytes for sent in self.sent_bytes)

    @property
    def ok(self) -> bool:
        grads_tolerance = self.tolerance if self.grads_tolerance is None else self.grads_tolerance
        return self.loss_rel_err < self.tolerance and self.grads_rel_err < grads_tolerance and self.bytes_ok

    @classmethod
    def from_json(cls, data: dict) -> ProcessCheck:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def to_json(self) -> dict:
        return {**asdict(self), "bytes_ok": self.bytes_ok, "ok": self.ok}


def reference_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dp_size: int, seed: int):
    """The single-process step a data-parallel run must equal, in float64 on the CPU: share
    ``r`` of the batch with replica ``r``'s dropout masks, the loss the mean of the shares'.
    Returns the loss and the gradients by parameter name."""
    reference = copy.deepcopy(model).double().cpu()
    reference.train()
    losses = []
    for replica, (xs, ys) in enumerate(zip(x.double().chunk(dp_size), y.chunk(dp_size))):
        seed_dropout(reference, seed, replica=replica)
        losses.append(F.cross_entropy(reference(xs), ys))
    loss = torch.stack(losses).mean()
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in reference.named_parameters()}


def _sum_over_ranks(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor)


def _gather_objects(value) -> list:
    """``value`` from every rank, in rank order (a collective)."""
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value)
    return parts


def _placed_step(model: nn.Module, placement: str, x, y, seed: int, device, numerics: Numerics = FP32):
    """One step of ``placement`` on this rank's share under ``numerics`` (float16: the loss
    scaled by ``FP16_LOSS_SCALE`` for the backward, as GradScaler does); returns the placed
    net, its share of the loss summed over the ranks / dp_size, and the bytes it counted."""
    placed = place(copy.deepcopy(model), placement, devices=[device])
    layout = placed.layout
    seed_dropout(placed, seed, replica=layout.replica)
    placed.train()
    rows = slice(layout.replica * (x.shape[0] // layout.dp_size), (layout.replica + 1) * (x.shape[0] // layout.dp_size))
    counting = count_collectives(placed) if placed.traffic is not None else contextlib.nullcontext()
    counter = placed.exchange_counter
    if counter is not None:
        counter.reset()
    with counting:
        with numerics.autocast([device]):
            loss = forward_loss(placed, x[rows].to(device), y[rows].to(device))
        (loss * (FP16_LOSS_SCALE if numerics.scaled else 1.0)).backward()
    return placed, _sum_over_ranks(float(loss.detach())) / layout.dp_size, counted_bytes(placed)


def check_processes(
    placement: str,
    model_name: str,
    *,
    width: float = 1 / 16,
    image_size: int | None = None,
    num_classes: int = 10,
    batch_size: int = 4,
    dropout: float = 0.5,
    seed: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    perturb_rank: int | None = None,
) -> ProcessCheck:
    """One training step of ``placement`` for ``model_name`` (tiny by default) on every rank
    of the running process group, against :func:`reference_step`. ``dropout`` applies to
    ``dual`` under ``ranks`` and ``replicas``; the others are checked with dropout 0 (see the
    module docstring). ``precision``: the step under autocast (``bf16``, ``fp16``), held to
    the tolerances derived from the dtype. ``perturb_rank``: that rank doubles its first
    gradient after the backward, a placement that computes another function, which
    the check must catch (for tests). A collective: every rank calls it with the same
    arguments."""
    torch.manual_seed(seed)
    size = image_size or smallest_image_size(model_name)
    two_tower = model_name == "dual"
    dropout = dropout if two_tower and placement != "hybrid" else 0.0
    model = build_model(model_name, image_size=size, width=width, num_classes=num_classes, dropout=dropout)
    init_xavier_(model)  # larger gradients than N(0, 0.01), so a wrong gradient shows
    data = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, model.in_channels, size, size, generator=data)
    y = torch.randint(0, num_classes, (batch_size,), generator=data)
    processes = dist.get_world_size()
    numerics = Numerics(precision)
    placed, loss, sent = _placed_step(model, placement, x, y, seed, torch.device(device), numerics)
    if perturb_rank == dist.get_rank():
        with torch.no_grad():
            next(p for p in placed.parameters() if p.grad is not None).grad.mul_(2.0)
    grads = full_gradients(placed)
    if numerics.scaled:
        grads = {name: g / FP16_LOSS_SCALE for name, g in grads.items()}
    ref_loss, ref_grads = reference_step(model, x, y, placed.layout.dp_size, seed)
    rank_errors = _errors(grads, ref_grads, numerics.mixed)
    grads_err, worst, worst_rank = max(_gather_objects((*rank_errors, dist.get_rank())), key=lambda e: e[0])
    limits = tolerances(precision)
    activation_bytes = 2 if numerics.mixed else 4  # under autocast the activations cross in bf16/fp16
    record = ProcessCheck(
        placement=placement,
        model=model_name,
        processes=processes,
        batch_size=batch_size,
        dropout=dropout,
        loss=loss,
        loss_rel_err=relative_error(torch.tensor(loss), ref_loss),
        grads_rel_err=grads_err,
        worst_grad=worst,
        sent_bytes=_gather_objects(float(sent)),
        closed_form_bytes=float(closed_form_bytes(placement, model, batch_size, processes, activation_bytes)),
        tolerance=limits.forward,
        precision=precision,
        grads_tolerance=limits.grads if numerics.mixed else None,
        grads_norm="global" if numerics.mixed else "max",
        worst_rank=worst_rank,
    )
    _release(placed)
    return record


def _errors(grads: dict, ref_grads: dict, mixed: bool) -> tuple[float, str]:
    """(error, the parameter whose gradient differs most): the largest per-tensor relative
    error in float32; the norm of all the gradients together under bf16/fp16."""
    errors = {name: relative_error(grads[name], ref_grads[name]) for name in ref_grads}
    worst = max(errors, key=errors.get)
    return (global_relative_error(grads, ref_grads) if mixed else errors[worst]), worst


def _release(placed: nn.Module) -> None:
    """Lets the placed net's process groups go now (its DDP, mesh), not at interpreter exit."""
    if placed.layout.distributed:
        dist.barrier()
    placed.release_groups()


def count_step(
    placement: str,
    model_name: str,
    batch_size: int,
    *,
    width: float = 1.0,
    image_size: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict:
    """One training step of ``placement`` for ``model_name`` (full size by default) on a
    random global batch, with no reference: the bytes each process counted at its
    collectives beside the closed form. A collective: every rank calls it."""
    torch.manual_seed(seed)
    model = build_model(model_name, image_size=image_size, width=width)
    size = model.image_size
    data = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, model.in_channels, size, size, generator=data)
    y = torch.randint(0, model.num_classes, (batch_size,), generator=data)
    processes = dist.get_world_size()
    expected = closed_form_bytes(placement, model, batch_size, processes)
    placed, loss, sent = _placed_step(model, placement, x, y, seed, torch.device(device))
    by_kind = placed.traffic.by_kind() if placed.traffic is not None else {}
    _release(placed)
    return {
        "placement": placement,
        "model": model_name,
        "width": width,
        "image_size": size,
        "processes": processes,
        "batch_size": batch_size,
        "loss": loss,
        "sent_bytes": _gather_objects(float(sent)),
        "sent_by_kind": by_kind,
        "closed_form_bytes": float(expected),
    }


def run_checks(checks=(), counts=(), *, num_classes: int = 10, threads: int = 1, **options) -> dict:
    """Every check of a torchrun job, as one function: a launcher's entrypoint (e.g.
    ``torch.distributed.launcher.api.elastic_launch(config, run_checks)(checks)``, which
    returns each rank's result). Joins the process group (gloo) if it is not up, runs
    :func:`check_processes` for each ``(placement, model, global batch)`` in ``checks`` and
    :func:`count_step` for each in ``counts``, leaves the group, and returns the records as
    JSON-ready dicts (the same on every rank). ``options`` go to :func:`check_processes`
    (``width``, ``seed``, ``precision``, ...)."""
    set_cpu_threads(threads)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    try:
        records = [
            check_processes(placement, model, batch_size=int(batch), num_classes=num_classes, **options).to_json()
            for placement, model, batch in checks
        ]
        counted = [count_step(placement, model, int(batch)) for placement, model, batch in counts]
        result = {"checks": records, "counts": counted, "world_size": dist.get_world_size()}
    except BaseException:
        close_distributed()
        raise
    close_distributed(barrier=True)
    return result
