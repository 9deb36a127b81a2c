"""Plans a placed net without its hardware: every layer's device, output shape and
parameters, computed under ``FakeTensorMode`` from a model built on the meta device.
Nothing is allocated and no GPU is needed, so ``split`` on cuda:0/cuda:1 plans anywhere.
Returns plain records; :mod:`alexnet2gpu.report` renders them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..models import build_model
from ..parallel import place

__all__ = ["LayerRecord", "SummaryRecord", "plan_summary"]


@dataclass
class LayerRecord:
    name: str
    kind: str
    device: str
    output_shape: list[int]
    params: int


@dataclass
class SummaryRecord:
    model: str
    placement: str
    params_total: int
    params_per_device: list[dict]
    layers: list[LayerRecord] = field(default_factory=list)
    note: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def _record_leaves(model: nn.Module, rows: list[LayerRecord]) -> list:
    """Forward hooks on every leaf module, appending a row per call, in call order."""
    handles = []
    for name, module in model.named_modules():
        if next(module.children(), None) is not None:
            continue

        def hook(mod, _inputs, output, name=name):
            rows.append(
                LayerRecord(
                    name=name,
                    kind=type(mod).__name__,
                    device=str(output.device),
                    output_shape=list(output.shape),
                    params=sum(p.numel() for p in mod.parameters(recurse=False)),
                )
            )

        handles.append(module.register_forward_hook(hook))
    return handles


def plan_summary(model_name: str, placement: str = "auto", devices=None, **model_kwargs) -> SummaryRecord:
    """Builds ``model_name`` on the meta device, places it under ``FakeTensorMode`` and
    runs one image through it, recording each leaf layer."""
    with torch.device("meta"):
        model = build_model(model_name, **model_kwargs)
    rows: list[LayerRecord] = []
    note = ""
    with FakeTensorMode(allow_non_fake_inputs=True):
        placed = place(model, placement, devices)
        layout = placed.layout
        if layout.fused:
            # The fused net calls the towers' kernels through F.conv2d, which module hooks
            # cannot see; its layers are the towers' layers, so plan those on its device.
            note = (
                "grouped runs these layers fused: each conv of both towers as one "
                "convolution (groups=2 for conv2, conv4, conv5)"
            )
            traced = model
        else:
            traced = placed
        handles = _record_leaves(traced, rows)
        try:
            traced.eval()
            x = torch.empty(1, model.in_channels, model.image_size, model.image_size, device=layout.devices[0])
            traced(x)
        finally:
            for handle in handles:
                handle.remove()
        per_device: dict[str, int] = {}
        for p in placed.parameters():
            per_device[str(p.device)] = per_device.get(str(p.device), 0) + p.numel()
    return SummaryRecord(
        model=model_name,
        placement=layout.placement,
        params_total=sum(per_device.values()),
        params_per_device=[{"device": d, "params": n} for d, n in per_device.items()],
        layers=rows,
        note=" ".join(filter(None, [layout.reason and f"auto: {layout.reason}.", note])),
    )
