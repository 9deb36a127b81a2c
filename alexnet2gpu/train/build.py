"""What a run is built from, on each process: its :class:`~alexnet2gpu.parallel.Layout`
(resolved once), the data for its replica, the net from the run seed, placed in the run's
memory format, its arithmetic (:class:`~alexnet2gpu.parallel.Numerics` and the fp16 loss
scaler), the optimizer and the learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from ..data import build_loaders
from ..data.synthetic import HELD_OUT_BATCHES, HELD_OUT_OFFSETS, SyntheticLoader
from ..errors import ConfigError
from ..models import DEFAULTS, build_model, initialise_, is_two_tower
from ..parallel import Layout, Numerics, TorchrunEnv, place, resolve_layout
from ..parallel.distributed import join_process_group
from ..parallel.state import local_part
from .config import PLATEAU_PATIENCE, SYNTHETIC_EPOCH_STEPS, Recipe, TrainConfig

__all__ = [
    "RunData",
    "build_data",
    "build_net",
    "build_numerics",
    "build_optimizer",
    "build_scaler",
    "build_scheduler",
    "place_net",
    "resolve_run_layout",
]


def _two_tower(model: str) -> bool:
    with torch.device("meta"):
        return is_two_tower(build_model(model, width=1 / 64))


def resolve_run_layout(config: TrainConfig) -> Layout:
    """Where this process runs, decided once: under torchrun (``ranks``, ``replicas``,
    ``hybrid``; ``auto`` picks ``ranks`` for ``dual``, ``replicas`` for a single-stream net)
    this joins torchrun's process group (call
    :func:`~alexnet2gpu.parallel.close_distributed` on every exit). A one-process placement
    under torchrun is refused: every process would train the whole run alone."""
    env = TorchrunEnv.from_environ()
    two_tower = _two_tower(config.model)
    layout = resolve_layout(config.placement, config.devices, two_tower=two_tower)
    if env.world_size > 1 and not layout.distributed:
        launched = "replicas or ranks" if two_tower else "replicas or hybrid"
        raise ConfigError(
            f"launched by torchrun with WORLD_SIZE={env.world_size} but --placement {config.placement} "
            f"runs in one process: use --placement {launched} (or auto) under torchrun, or run without torchrun"
        )
    if config.compile and layout.distributed:
        raise ConfigError(
            f"--compile compiles a net that runs in one process; under {layout.placement} each step runs through "
            "collectives: run it without --compile, or --compile in one process (--placement single, grouped, "
            "towers or split)"
        )
    if layout.distributed:
        join_process_group(layout, timeout_s=config.timeout)
    return layout


def input_shape(config: TrainConfig) -> tuple[int, int]:
    """(in_channels, image_size): the flags', else the model's defaults."""
    default_c, _, default_s = DEFAULTS[config.model]
    return config.in_channels or default_c, config.image_size or default_s


@dataclass
class RunData:
    train: object  # an EpochLoader or SyntheticLoader
    val: object | None  # held out of the training data: drives the plateau schedule (None: no validation split)
    test: object  # reports, drives nothing
    num_classes: int
    description: str
    ten_crop: bool


def build_data(config: TrainConfig, layout: Layout) -> RunData:
    """This replica's share of the data: replica d of k reads the d-th share of each
    global batch, both tower ranks of a replica the same share."""
    in_channels, image_size = input_shape(config)
    batch = config.hyper.batch_size
    if config.data == "synthetic":
        if config.ten_crop:
            raise ConfigError("--ten-crop needs an image folder (--data PATH)")
        classes = config.num_classes or DEFAULTS[config.model][1]
        kw = dict(
            seed=config.seed,
            global_batch=batch,
            in_channels=in_channels,
            image_size=image_size,
            num_classes=classes,
            dp_size=layout.dp_size,
            dp_rank=layout.replica,
        )
        train_loader = SyntheticLoader(**kw, batches=SYNTHETIC_EPOCH_STEPS)
        test_loader, val_loader = (
            SyntheticLoader(**kw, offset=HELD_OUT_OFFSETS[split], batches=HELD_OUT_BATCHES) for split in ("test", "val")
        )
        words = f"synthetic N(0, 1) images, {classes} classes, seed {config.seed}"
        return RunData(train_loader, val_loader if config.val_size != 0 else None, test_loader, classes, words, False)
    if config.data != "fashion-mnist" and not Path(config.data).exists():
        raise ConfigError(
            f"--data {config.data}: no such folder; use fashion-mnist, synthetic or a folder with train/ and val/"
        )
    loaders = build_loaders(
        config.data,
        image_size=image_size,
        in_channels=in_channels,
        global_batch=batch,
        dp_rank=layout.replica,
        dp_size=layout.dp_size,
        seed=config.seed,
        data_dir=config.data_dir,
        train_subset=config.train_subset,
        ten_crop=config.ten_crop,
        num_workers=config.workers,
        device=layout.device,
        pixels=config.hyper.pixels,
        val_size=config.val_size,
    )
    return RunData(loaders.train, loaders.val, loaders.test, loaders.num_classes, loaders.description, loaders.ten_crop)


def build_net(config: TrainConfig, num_classes: int, hyper: Recipe) -> nn.Module:
    """The net from the run seed, initialised as ``hyper`` says (the recipe's, ``--init``'s
    or a departure's: paper: [paper] 5; cfg: [cfg]; d2l: Xavier)."""
    in_channels, image_size = input_shape(config)
    torch.manual_seed(config.seed)
    model = build_model(
        config.model,
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
        width=config.width,
        dropout=config.dropout,
    )
    initialise_(model, hyper.init)
    return model


def build_numerics(config: TrainConfig, layout: Layout) -> Numerics:
    """The run's precision and memory format; ``cudnn.benchmark`` as ``--cudnn-benchmark``
    says where the run uses a CUDA device (applied here), left as it is on the CPU."""
    on_cuda = any(torch.device(d).type == "cuda" for d in layout.devices)
    numerics = Numerics(config.precision, config.channels_last, config.cudnn_benchmark if on_cuda else None)
    numerics.apply()
    return numerics


def place_net(net: nn.Module, layout: Layout, numerics: Numerics) -> nn.Module:
    """``net`` placed as ``layout`` says, its parameters in the run's memory format: made
    channels-last before placing under torchrun (``ranks``, ``replicas``, ``hybrid``: DDP
    registers the parameters as they are then), after placing otherwise."""
    if layout.distributed:
        return place(numerics.format_model(net), layout)
    return numerics.format_model(place(net, layout))


def build_scaler(numerics: Numerics, layout: Layout) -> torch.amp.GradScaler:
    """fp16's loss scaler (``GradScaler``; disabled for fp32 and bf16, it passes everything
    through). Under torchrun each process holds part of the gradients (``ranks``: one
    tower's; ``hybrid``: 1/p of fc6-fc8's), so whether they overflowed must be agreed by
    every rank, or one part would step and another skip:
    ``ShardedGradScaler`` all-reduces its found-inf flag over the process group before it
    decides, and so every rank's scale moves alike."""
    if numerics.scaled and layout.distributed:
        import torch.distributed as dist
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        class LocalPartsScaler(ShardedGradScaler):
            """Unscales each gradient through this process's part: hybrid's fc6-fc8 hold
            DTensor gradients beside the trunk's plain ones, and the fused unscale refuses
            the mix (its found-inf flag is a plain tensor)."""

            def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16=True):
                groups = [
                    {"params": [SimpleNamespace(grad=local_part(p.grad)) for p in g["params"] if p.grad is not None]}
                    for g in optimizer.param_groups
                ]
                return super()._unscale_grads_(SimpleNamespace(param_groups=groups), inv_scale, found_inf, allow_fp16)

        return LocalPartsScaler(layout.device.type, process_group=dist.group.WORLD)
    return numerics.grad_scaler(layout.device.type)


def build_optimizer(hyper: Recipe, placed: nn.Module) -> torch.optim.Optimizer:
    """SGD with two parameter groups, the weights and then the biases, which get the
    recipe's own learning rate and weight decay multiples ([cfg] epsB/wcB, [caffe]
    lr_mult/decay_mult; d2l: the same as the weights')."""
    named = list(placed.named_parameters())
    weights = [p for n, p in named if not n.endswith("bias")]
    biases = [p for n, p in named if n.endswith("bias")]
    return torch.optim.SGD(
        [
            {"params": weights},
            {"params": biases, "lr": hyper.lr * hyper.bias_lr, "weight_decay": hyper.weight_decay * hyper.bias_decay},
        ],
        lr=hyper.lr,
        momentum=hyper.momentum,
        weight_decay=hyper.weight_decay,
    )


def build_scheduler(hyper: Recipe, optimizer: torch.optim.Optimizer, total_steps: int):
    """The recipe's schedule: None for "constant"; "cosine", lr to 0 over ``total_steps``
    (stepped after every optimizer step); "plateau", [paper] 5: lr /10 when the
    validation error stops improving (stepped after each epoch's evaluation), at most
    ``max_drops`` times (a floor just under lr / 10**max_drops stops a fourth)."""
    if hyper.schedule == "constant":
        return None
    if hyper.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    floor = [g["lr"] * 0.1**hyper.max_drops * (1 - 1e-6) for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.1, patience=PLATEAU_PATIENCE, min_lr=floor
    )
