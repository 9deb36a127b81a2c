"""Plans a placed net without its hardware: every layer's device, output shape and
parameters, computed under ``FakeTensorMode`` from a model built on the meta device.
Nothing is allocated and no GPU is needed, so ``split`` on cuda:0/cuda:1 plans anywhere.
Returns plain records; :mod:`alexnet2gpu.report` renders them.

The torchrun placements plan without torchrun too, as a view of one process among
``processes``, with the parameters of every rank: ``ranks`` is ``split``'s plan with tower a
(and fc8) on the even ranks, tower b on the odd ones; ``replicas`` the whole net (``dual``
fused as ``grouped``) on every rank; ``hybrid`` the conv trunk whole on every rank and each
of fc6-fc8 split by output units (rank 0's share shown, ``torch.chunk``'s split, as DTensor
shards them), the fully connected layers seeing the whole global batch (one image per
process).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..errors import ConfigError
from ..models import build_model, is_two_tower
from ..parallel import PROCESS_PLACEMENTS, place
from ..parallel.hybrid import split_trunk
from ..parallel.layout import check_net

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


def plan_summary(
    model_name: str, placement: str = "auto", devices=None, *, processes: int = 2, **model_kwargs
) -> SummaryRecord:
    """Builds ``model_name`` on the meta device, places it under ``FakeTensorMode`` and
    runs one image through it, recording each leaf layer. ``ranks``, ``replicas`` and
    ``hybrid`` are planned as one process of ``processes`` (see the module docstring)."""
    if placement in PROCESS_PLACEMENTS:
        return _plan_processes(model_name, placement, devices, processes, model_kwargs)
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


def _share(units: int, processes: int, rank: int) -> int:
    """Rank ``rank``'s output units of a layer of ``units`` split ``processes`` ways, as
    ``torch.chunk`` (DTensor's ``Shard``) splits them: ceil(units / p) each from the front."""
    chunk = -(-units // processes)
    return max(0, min(chunk, units - rank * chunk))


def _plan_processes(model_name: str, placement: str, devices, processes: int, model_kwargs: dict) -> SummaryRecord:
    """A torchrun placement's plan, as one of ``processes`` processes (module docstring)."""
    with torch.device("meta"):
        model = build_model(model_name, **model_kwargs)
    two_tower = is_two_tower(model)
    check_net(placement, two_tower)
    if processes < 2 or (placement == "ranks" and processes % 2):
        need = "an even number of processes, at least 2" if placement == "ranks" else "at least 2 processes"
        raise ConfigError(f"placement '{placement}' plans {need}, got {processes}")
    total = sum(p.numel() for p in model.parameters())
    if placement == "ranks":
        record = plan_summary(model_name, "split", ["cuda:0", "cuda:1"], **model_kwargs)
        towers = {"cuda:0": "even ranks (tower a, fc8)", "cuda:1": "odd ranks (tower b)"}
        for row in record.layers:
            row.device = towers[row.device]
        counts = {int(d["device"][-1]): d["params"] for d in record.params_per_device}
        per_rank = [counts[rank % 2] for rank in range(processes)]
        note = f"one tower per process: {processes // 2} data-parallel replica(s) x 2 towers"
    else:
        record = plan_summary(model_name, "grouped" if two_tower else "single", devices, **model_kwargs)
        for row in record.layers:
            row.device = "every rank"
        per_rank = [total] * processes
        note = f"each of the {processes} processes holds the whole net and its share of the global batch"
        if placement == "hybrid":
            per_rank = _plan_hybrid(model, record.layers, processes)
            note = (
                f"each of the {processes} processes holds the conv trunk whole (data parallel) and 1/{processes} "
                f"of fc6-fc8's units (tensor parallel); the fully connected layers see the whole global batch "
                f"({processes} images, one per process); their rows show rank 0's share"
            )
    record.placement = placement
    record.params_total = total
    record.params_per_device = [{"device": f"rank {rank}", "params": n} for rank, n in enumerate(per_rank)]
    record.note = " ".join(filter(None, [f"per process: {note}.", record.note]))
    return record


def _plan_hybrid(model: nn.Module, rows: list[LayerRecord], processes: int) -> list[int]:
    """Turns a single-device plan's fc rows into rank 0's share under ``hybrid``; returns
    every rank's parameter count."""
    _, fc_names = split_trunk(model)
    linears = {name: model.get_submodule(name) for name in fc_names}
    units = None
    for row in rows:
        if row.name in linears:
            fc = linears[row.name]
            units = _share(fc.out_features, processes, 0)
            row.params = units * (fc.in_features + (fc.bias is not None))
            row.device = "rank 0's share"
            gathered = row.name == fc_names[-1]  # fc8's logits come out whole on every process
            row.output_shape = [processes, fc.out_features if gathered else units]
        elif units is not None:
            row.output_shape = [processes, units]
            row.device = "rank 0's share"
    trunk = sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for fc in linears.values() for p in fc.parameters()
    )
    return [
        trunk
        + sum(
            _share(fc.out_features, processes, r) * (fc.in_features + (fc.bias is not None)) for fc in linears.values()
        )
        for r in range(processes)
    ]
