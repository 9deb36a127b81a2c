"""Proves that a placement computes the reference function: same logits, loss and
parameter gradients as the two-tower net's own forward, run in float64 on the same kind of
device, for the same weights, batch and dropout masks. Returns plain records.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..models import DualAlexNet, build_model, init_xavier_, seed_dropout, smallest_image_size
from ..parallel import parse_devices, place

__all__ = ["PlacementCheck", "available_placements", "check_placement", "relative_error", "TOLERANCE"]

TOLERANCE = 1e-5  # float32 against the float64 reference, relative to the largest value


@dataclass
class PlacementCheck:
    placement: str
    devices: list[str]
    logits_rel_err: float
    loss_rel_err: float
    grads_rel_err: float
    worst_grad: str  # the parameter whose gradient differs most
    tolerance: float = TOLERANCE

    @property
    def ok(self) -> bool:
        return max(self.logits_rel_err, self.loss_rel_err, self.grads_rel_err) < self.tolerance

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, computed in float64 on the CPU."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float((actual - expected).abs().max() / scale)


def available_placements() -> list[tuple[str, list[str]]]:
    """Every placement this machine can run: towers and grouped on the first device, split
    on two GPUs where there are two, else on ("cpu", "cpu")."""
    first = "cuda:0" if torch.cuda.is_available() else "cpu"
    split = ["cuda:0", "cuda:1"] if torch.cuda.device_count() >= 2 else ["cpu", "cpu"]
    return [("towers", [first]), ("grouped", [first]), ("split", split)]


def _step(model, x: torch.Tensor, y: torch.Tensor, seed: int):
    seed_dropout(model, seed)
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits, y.to(logits.device))
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return logits, loss, grads


def check_placement(
    placement: str,
    devices,
    *,
    model: DualAlexNet | None = None,
    width: float = 1 / 16,
    image_size: int | None = None,
    batch_size: int = 4,
    dropout: float = 0.5,
    seed: int = 0,
) -> PlacementCheck:
    """One training step of ``placement`` on ``devices`` against the float64 reference on
    the first of those devices, with TF32 off. ``model`` defaults to a tiny dual net (width
    1/16, the smallest input) with Xavier-uniform weights drawn from ``seed``: the paper's
    N(0, 0.01) makes conv1's gradient a sum that cancels to ~1e-3 relative error in
    float32 itself at full width, whatever the placement, which would hide placement bugs."""
    devices = parse_devices(devices)
    if model is None:
        torch.manual_seed(seed)
        size = image_size or smallest_image_size("dual")
        model = build_model("dual", image_size=size, width=width, dropout=dropout)
        init_xavier_(model)
    with _full_float32():
        return _compare(placement, devices, model, batch_size, seed)


@contextlib.contextmanager
def _full_float32():
    """TF32 off for convolutions and matmuls: it would differ from float64 by ~1e-3."""
    matmul = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)


def _compare(placement: str, devices, model: DualAlexNet, batch_size: int, seed: int) -> PlacementCheck:
    data = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, model.in_channels, model.image_size, model.image_size, generator=data)
    y = torch.randint(0, model.num_classes, (batch_size,), generator=data)

    reference = copy.deepcopy(model).double().to(devices[0])
    ref_logits, ref_loss, ref_grads = _step(reference, x.double().to(devices[0]), y, seed)

    placed = place(copy.deepcopy(model), placement, devices)
    logits, loss, grads = _step(placed, x, y, seed)

    grad_errors = {name: relative_error(grads[name], ref_grads[name]) for name in ref_grads}
    worst = max(grad_errors, key=grad_errors.get)
    return PlacementCheck(
        placement=placement,
        devices=[str(d) for d in devices],
        logits_rel_err=relative_error(logits, ref_logits),
        loss_rel_err=relative_error(loss, ref_loss),
        grads_rel_err=grad_errors[worst],
        worst_grad=worst,
    )
