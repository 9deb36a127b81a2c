"""Proves that a placement computes the reference function: same logits, loss and
parameter gradients as the two-tower net's own forward, run in float64 on the same kind of
device, for the same weights, batch and dropout masks. Returns plain records.

Under ``bf16``/``fp16`` (autocast, float32 weights) each placement is held to tolerances
derived from the dtype's unit roundoff (:func:`tolerances`; the derivation is in
docs/architecture.md, "How close bf16 and fp16 must be"), and the placements are also held
to each other (:class:`AgreementCheck`), which is the tight check there.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..models import DualAlexNet, build_model, init_xavier_, seed_dropout, smallest_image_size
from ..parallel import FP32, Numerics, default_device, devices_of, parse_devices, place

__all__ = [
    "TOLERANCE",
    "UNIT_ROUNDOFF",
    "AgreementCheck",
    "PlacementCheck",
    "Tolerances",
    "available_placements",
    "check_all",
    "check_placement",
    "relative_error",
    "tolerances",
]

TOLERANCE = 1e-5  # float32 against the float64 reference, relative to the largest value
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11}  # 2^-(significand bits): 8 for bfloat16, 11 for float16
WEIGHT_LAYERS = 8  # conv1-conv5, fc6-fc8: the products on the longest path, forward and backward
DECISIONS = 10  # ReLU x7 and max-pool x3 on that path: discrete choices a rounding can flip
FP16_LOSS_SCALE = 2.0**16  # GradScaler's initial scale: float16 gradients must not underflow


@dataclass(frozen=True)
class Tolerances:
    """``forward``: logits and loss (largest element). ``grads``: gradients against float64
    (float32: each tensor's largest element; bf16/fp16: the norm of all of them together).
    ``agree``: a low-precision placement against another one, each tensor's largest element."""

    forward: float
    grads: float
    agree: float


def tolerances(precision: str = "fp32") -> Tolerances:
    """float32: 1e-5 everywhere. bf16/fp16 with unit roundoff u: rounding both operands of
    each of the ``WEIGHT_LAYERS`` products costs at most 2u apiece, adding up to 2Lu; a
    flipped ReLU or max-pool choice (a fraction ~u of them, each changing one term of a
    gradient sum by about a term) adds sqrt(u) per such layer, sqrt(Du) over D of them in
    quadrature. docs/architecture.md has the derivation."""
    if precision == "fp32":
        return Tolerances(TOLERANCE, TOLERANCE, TOLERANCE)
    u = UNIT_ROUNDOFF[precision]
    rounding = 2 * WEIGHT_LAYERS * u
    return Tolerances(forward=rounding, grads=rounding + math.sqrt(DECISIONS * u), agree=rounding)


@dataclass
class PlacementCheck:
    placement: str
    devices: list[str]
    logits_rel_err: float
    loss_rel_err: float
    grads_rel_err: float
    worst_grad: str  # the parameter whose gradient differs most
    tolerance: float = TOLERANCE  # logits and loss (and gradients where grads_tolerance is None)
    precision: str = "fp32"
    grads_tolerance: float | None = None
    grads_norm: str = "max"  # "max": each tensor's largest element; "global": all gradients as one vector
    worst_grad_rel_err: float | None = None  # "global" only: worst_grad's own error (its largest element)

    @property
    def ok(self) -> bool:
        grads_tolerance = self.tolerance if self.grads_tolerance is None else self.grads_tolerance
        return max(self.logits_rel_err, self.loss_rel_err) < self.tolerance and self.grads_rel_err < grads_tolerance

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


@dataclass
class AgreementCheck:
    """A low-precision placement against another one (the first checked) in the same
    precision: logits, loss and each gradient tensor, relative to its largest element.
    ``same_forward``: their logits are bit for bit the same, so every ReLU and max-pool
    choice is too, and the gradients may differ by rounding alone (``tolerance``); else by
    flipped choices as well (``grads_tolerance``, on all gradients together)."""

    placement: str
    against: str
    precision: str
    logits_rel_err: float
    loss_rel_err: float
    grads_rel_err: float
    worst_grad: str
    same_forward: bool
    tolerance: float
    grads_tolerance: float

    @property
    def ok(self) -> bool:
        limit = self.tolerance if self.same_forward else self.grads_tolerance
        return max(self.logits_rel_err, self.loss_rel_err) < self.tolerance and self.grads_rel_err < limit

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, computed in float64 on the CPU."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float((actual - expected).abs().max() / scale)


def global_relative_error(actual: dict, expected: dict) -> float:
    """||actual - expected|| / ||expected|| over every tensor of two name -> tensor dicts
    as one vector (2-norm, float64 on the CPU)."""
    diff = sum(
        float((actual[n].detach().double().cpu() - e.double().cpu()).square().sum()) for n, e in expected.items()
    )
    norm = sum(float(e.double().cpu().square().sum()) for e in expected.values())
    return math.sqrt(diff) / max(math.sqrt(norm), torch.finfo(torch.float64).tiny)


def available_placements() -> list[tuple[str, list[str]]]:
    """Every placement this machine can run: towers and grouped on the first device, split
    on two GPUs where there are two, else on ("cpu", "cpu")."""
    first = str(default_device())
    split = ["cuda:0", "cuda:1"] if torch.cuda.device_count() >= 2 else ["cpu", "cpu"]
    return [("towers", [first]), ("grouped", [first]), ("split", split)]


def _step(model, x: torch.Tensor, y: torch.Tensor, seed: int, numerics: Numerics = FP32):
    """Logits, loss and gradients of one step under ``numerics`` (float16: the loss scaled
    by ``FP16_LOSS_SCALE``, the gradients divided back, as GradScaler does)."""
    seed_dropout(model, seed)
    model.train()
    model.zero_grad(set_to_none=True)
    with numerics.autocast(devices_of(model) if hasattr(model, "layout") else [x.device]):
        logits = model(x)
        loss = F.cross_entropy(logits, y.to(logits.device))
    scale = FP16_LOSS_SCALE if numerics.scaled else 1.0
    (loss * scale).backward()
    grads = {name: p.grad / scale for name, p in model.named_parameters()}
    return logits, loss, grads


def _test_model(width: float, image_size: int | None, dropout: float, seed: int) -> DualAlexNet:
    """A tiny dual net with Xavier-uniform weights drawn from ``seed``: the paper's
    N(0, 0.01) makes conv1's gradient a sum that cancels to ~1e-3 relative error in float32
    itself at full width, whatever the placement, which would hide placement bugs."""
    torch.manual_seed(seed)
    size = image_size or smallest_image_size("dual")
    model = build_model("dual", image_size=size, width=width, dropout=dropout)
    init_xavier_(model)
    return model


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
    numerics: Numerics = FP32,
) -> PlacementCheck:
    """One training step of ``placement`` on ``devices`` against the float64 reference on
    the first of those devices, with TF32 off. ``model`` defaults to a tiny dual net (width
    1/16, the smallest input; see :func:`_test_model`)."""
    checks, _ = check_all(
        [(placement, devices)],
        model=model,
        width=width,
        image_size=image_size,
        batch_size=batch_size,
        dropout=dropout,
        seed=seed,
        numerics=numerics,
    )
    return checks[0]


def check_all(
    placements: list[tuple[str, list[str]]] | None = None,
    *,
    model: DualAlexNet | None = None,
    width: float = 1 / 16,
    image_size: int | None = None,
    batch_size: int = 4,
    dropout: float = 0.5,
    seed: int = 0,
    numerics: Numerics = FP32,
) -> tuple[list[PlacementCheck], list[AgreementCheck]]:
    """Every placement in ``placements`` (default: :func:`available_placements`) against
    the float64 reference, and, under bf16/fp16, each one after the first against the first."""
    placements = available_placements() if placements is None else placements
    model = _test_model(width, image_size, dropout, seed) if model is None else model
    data = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, model.in_channels, model.image_size, model.image_size, generator=data)
    y = torch.randint(0, model.num_classes, (batch_size,), generator=data)
    checks, runs, references = [], [], {}
    with _full_float32():
        for placement, devices in placements:
            devices = parse_devices(devices)
            if devices[0] not in references:  # one reference per device kind
                reference = copy.deepcopy(model).double().to(devices[0])
                references[devices[0]] = _step(reference, x.double().to(devices[0]), y, seed)
            placed = place(copy.deepcopy(model), placement, devices)
            run = _step(placed, x, y, seed, numerics)
            runs.append((placement, run))
            checks.append(_against_reference(placement, devices, run, references[devices[0]], numerics.precision))
    agreements = []
    if numerics.mixed:
        agreements = [_agreement(name, run, *runs[0], numerics.precision) for name, run in runs[1:]]
    return checks, agreements


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


def _worst(grads: dict, expected: dict) -> tuple[str, float]:
    errors = {name: relative_error(grads[name], expected[name]) for name in expected}
    worst = max(errors, key=errors.get)
    return (worst if errors[worst] > 0 else "none: all equal"), errors[worst]


def _against_reference(placement: str, devices, run, reference, precision: str) -> PlacementCheck:
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = run, reference
    limits = tolerances(precision)
    worst, grads_err = _worst(grads, ref_grads)
    mixed = precision != "fp32"
    return PlacementCheck(
        placement=placement,
        devices=[str(d) for d in devices],
        logits_rel_err=relative_error(logits, ref_logits),
        loss_rel_err=relative_error(loss, ref_loss),
        grads_rel_err=global_relative_error(grads, ref_grads) if mixed else grads_err,
        worst_grad=worst,
        tolerance=limits.forward,
        precision=precision,
        grads_tolerance=limits.grads if mixed else None,
        grads_norm="global" if mixed else "max",
        worst_grad_rel_err=grads_err if mixed else None,
    )


def _agreement(placement: str, run, against: str, first, precision: str) -> AgreementCheck:
    (logits, loss, grads), (first_logits, first_loss, first_grads) = run, first
    limits = tolerances(precision)
    same_forward = bool(torch.equal(logits.detach().cpu(), first_logits.detach().cpu()))
    worst, grads_err = _worst(grads, first_grads)
    return AgreementCheck(
        placement=placement,
        against=against,
        precision=precision,
        logits_rel_err=relative_error(logits, first_logits),
        loss_rel_err=relative_error(loss, first_loss),
        grads_rel_err=grads_err if same_forward else global_relative_error(grads, first_grads),
        worst_grad=worst,
        same_forward=same_forward,
        tolerance=limits.agree,
        grads_tolerance=limits.grads,
    )
