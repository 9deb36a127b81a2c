"""The training loop behind ``alexnet2gpu train``, for every placement and data source.

    config = TrainConfig(model="dual", data="synthetic", steps=10, width=1/16, image_size=64)
    result = train(config)          # a TrainResult record; rendering is report.training

One function runs the loop; settings live in :class:`TrainConfig`, the recipe in
:data:`RECIPES`. What it does on every process of a job (one process, or torchrun's
2k processes under ``ranks``):

* builds the net from the run seed, places it, seeds the per-tower dropout generators
  (per data-parallel replica);
* each step: ``forward_loss(...).backward()``, then one all-reduce that carries the loss,
  the correct count and the non-finite flags, so that every rank agrees whether to step,
  skip (``on_nonfinite="skip"``) or stop (``"stop"``), and the message names the step
  and the tower;
* evaluates after every epoch (and at the end), steps ``ReduceLROnPlateau`` on the
  validation error (paper recipe);
* checkpoints through :mod:`alexnet2gpu.checkpoint`: the full dual-net state dict (the
  same keys in every placement), the optimizer state keyed by parameter *name* (so a
  ``ranks`` checkpoint resumes under ``towers`` and the reverse), the scheduler, step,
  epoch, data position and RNG states; never a non-finite one;
* only rank 0 prints (through ``report.training``) and writes (metrics, checkpoints).

Faults. Under ``ranks`` every rank records the step it is in in torchrun's store; when a
collective fails (a peer died, or the process-group timeout ran out waiting for a hung
one) the error names the ranks that stopped making progress. ``destroy_process_group``
runs on every exit path (:func:`alexnet2gpu.ranks.close_distributed`).

Test-only fault injection: ``ALEXNET2GPU_FAULT=<what>:rank<R>:step<S>`` with ``what`` one of
``kill`` (the process kills itself with SIGKILL), ``hang`` (sleeps for an hour),
``nan-loss`` (tower rank 0's loss becomes NaN), ``nan-grad`` (rank R's gradients become
NaN). It fires only in torchrun's first attempt (``TORCHELASTIC_RESTART_COUNT`` 0), so a
restarted job runs clean. It exists for tests/test_train.py; do not use it otherwise.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import Alexnet2gpuError, ConfigError
from ..models import build_model, seed_dropout
from ..models.init import init_paper_, init_xavier_
from ..parallel import TorchrunEnv, forward_loss, place
from .checkpointing import capture_rng_state, restore_rng_state

__all__ = [
    "RECIPES",
    "Recipe",
    "TrainConfig",
    "TrainResult",
    "train",
    "optimizer_state_by_name",
    "load_optimizer_state_by_name",
    "SYNTHETIC_EPOCH_STEPS",
]

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class Recipe:
    """Optimiser and initialisation of a training recipe."""

    init: str  # "paper" (N(0, 0.01), biases 1 in conv2/4/5, fc6/7) or "xavier"
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    epochs: int
    plateau: bool  # ReduceLROnPlateau on the validation error, factor 0.1


RECIPES = {
    # [paper] section 5: SGD, batch 128, momentum 0.9, weight decay 0.0005, lr 0.01 divided
    # by 10 "when the validation error rate stopped improving", roughly 90 cycles.
    "paper": Recipe(init="paper", lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=128, epochs=90, plateau=True),
    # The seed's set-up ([d2l] 8.1.4): Xavier-uniform, plain SGD lr 0.01, batch 128, 10 epochs.
    "d2l": Recipe(init="xavier", lr=0.01, momentum=0.0, weight_decay=0.0, batch_size=128, epochs=10, plateau=False),
}
PLATEAU_PATIENCE = 1  # evaluations without improvement before lr /= 10 (the paper gives none)
SYNTHETIC_EPOCH_STEPS = 50  # synthetic data has no epochs: evaluate every 50 steps
SYNTHETIC_EVAL_BATCHES = 2
NONFINITE_POLICIES = ("stop", "skip")


@dataclass
class TrainConfig:
    """Everything a run needs; the command line maps onto it one flag per field."""

    model: str = "dual"
    placement: str = "auto"
    devices: str | None = None
    data: str = "fashion-mnist"  # "fashion-mnist", "synthetic" or an image-folder path
    data_dir: str | None = None  # Fashion-MNIST IDX files
    train_subset: int | None = None
    in_channels: int | None = None
    num_classes: int | None = None  # synthetic only; real data sets bring their own
    image_size: int | None = None
    width: float = 1.0
    dropout: float = 0.5
    recipe: str = "paper"
    lr: float | None = None  # None: the recipe's
    momentum: float | None = None
    weight_decay: float | None = None
    batch_size: int | None = None  # global batch; None: the recipe's (128)
    steps: int | None = None  # total optimizer steps; None: epochs x batches per epoch
    epochs: int | None = None  # None: the recipe's (paper 90, d2l 10)
    seed: int = 0
    threads: int | None = None
    workers: int | None = None
    ten_crop: bool = False
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # steps; 0: only at the end
    keep: int = 3
    resume: str | bool = False  # a path, True for the newest in checkpoint_dir
    metrics: str | None = None  # JSONL path
    on_nonfinite: str = "stop"
    timeout: float = 180.0  # process-group timeout in seconds (ranks)

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ConfigError(f"unknown recipe '{self.recipe}': choose one of {', '.join(RECIPES)}")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"--on-nonfinite must be stop or skip, got '{self.on_nonfinite}'")
        for name in ("steps", "epochs", "batch_size", "threads", "train_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.checkpoint_every < 0 or self.keep < 1:
            raise ConfigError(
                f"--checkpoint-every must be >= 0 and keep >= 1, got {self.checkpoint_every}, {self.keep}"
            )
        if self.timeout <= 0:
            raise ConfigError(f"--timeout must be positive seconds, got {self.timeout}")
        if self.resume and not self.checkpoint_dir and self.resume is True:
            raise ConfigError("--resume without a path needs --checkpoint-dir DIR to look for the newest checkpoint")
        if self.resume not in (False, True) and not Path(self.resume).is_file():
            raise ConfigError(f"--resume {self.resume}: no such checkpoint file")

    @property
    def hyper(self) -> Recipe:
        """The recipe with this run's overrides applied."""
        r = RECIPES[self.recipe]
        return Recipe(
            init=r.init,
            lr=r.lr if self.lr is None else self.lr,
            momentum=r.momentum if self.momentum is None else self.momentum,
            weight_decay=r.weight_decay if self.weight_decay is None else self.weight_decay,
            batch_size=r.batch_size if self.batch_size is None else self.batch_size,
            epochs=r.epochs if self.epochs is None else self.epochs,
            plateau=r.plateau,
        )


@dataclass
class StepRecord:
    step: int  # optimizer steps done after this one (1-based)
    epoch: int
    loss: float
    accuracy: float
    lr: float
    images_per_s: float
    skipped: bool = False

    def to_json(self) -> dict:
        return {"event": "step", **asdict(self)}


@dataclass
class EvalRecord:
    step: int
    epoch: int
    test_accuracy: float
    test_images: int

    def to_json(self) -> dict:
        return {"event": "eval", **asdict(self)}


@dataclass
class TrainResult:
    """What a run did, for the end summary (the seed's format) and the metrics file."""

    placement: str
    device: str  # e.g. "cpu", "cuda:0", "2 processes x cpu (gloo)"
    steps: int
    epochs_done: float
    loss: float  # mean training loss over the last epoch (or the run, if shorter)
    train_accuracy: float
    test_accuracy: float | None
    images_per_s: float  # training images per second of training time (excludes evaluation)
    train_seconds: float
    skipped_steps: int = 0
    resumed_from: str | None = None
    checkpoint: str | None = None
    history: list = field(default_factory=list)

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("history")
        return {"event": "summary", **out}


# --------------------------------------------------------------------------- state by name


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with parameters named, not numbered, so that it loads into
    any placement (whose parameter order differs) and merges across tower ranks."""
    names = {id(p): n for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    index_to_name: dict[int, str] = {}
    for group, saved in zip(optimizer.param_groups, sd["param_groups"]):
        for p, i in zip(group["params"], saved["params"]):
            index_to_name[i] = names[id(p)]
    return {
        "state": {
            index_to_name[i]: {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in s.items()}
            for i, s in sd["state"].items()
        },
        "param_groups": [{**g, "params": [index_to_name[i] for i in g["params"]]} for g in sd["param_groups"]],
    }


def load_optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, named: dict) -> None:
    """Loads :func:`optimizer_state_by_name` output (possibly holding more parameters, e.g.
    both towers) into ``optimizer``, whose one parameter group holds ``model``'s parameters."""
    params = dict(model.named_parameters())
    ids = {id(p): i for i, p in enumerate(optimizer.param_groups[0]["params"])}
    index = {n: ids[id(p)] for n, p in params.items() if id(p) in ids}
    if named["state"]:  # empty for plain SGD; otherwise every parameter has its entry
        missing = [n for n in index if n not in named["state"]]
        if missing:
            raise ConfigError(f"the checkpoint's optimizer state lacks {missing[0]}: it belongs to another model")
    group = {k: v for k, v in named["param_groups"][0].items() if k != "params"}
    optimizer.load_state_dict(
        {
            "state": {index[n]: s for n, s in named["state"].items() if n in index},
            "param_groups": [{**group, "params": list(range(len(ids)))}],
        }
    )


# --------------------------------------------------------------------------- data


def _build_data(
    config: TrainConfig, image_size: int, in_channels: int, dp_size: int, dp_rank: int, device: torch.device
):
    """(train loader, test loader, num_classes, description, ten_crop)."""
    batch = config.hyper.batch_size
    if config.data == "synthetic":
        from ..data.synthetic import SyntheticLoader
        from ..models import DEFAULTS

        if config.ten_crop:
            raise ConfigError("--ten-crop needs an image folder (--data PATH)")
        classes = config.num_classes or DEFAULTS[config.model][1]
        kw = dict(
            seed=config.seed,
            global_batch=batch,
            in_channels=in_channels,
            image_size=image_size,
            num_classes=classes,
            dp_size=dp_size,
            dp_rank=dp_rank,
        )
        train_loader = SyntheticLoader(**kw, batches=SYNTHETIC_EPOCH_STEPS)
        # Held-out batches: steps numbered from -1 downwards never appear in training.
        test_loader = SyntheticLoader(**kw, offset=-(10**9), batches=SYNTHETIC_EVAL_BATCHES)
        return (
            train_loader,
            test_loader,
            classes,
            f"synthetic N(0, 1) images, {classes} classes, seed {config.seed}",
            False,
        )
    if config.data != "fashion-mnist" and not Path(config.data).exists():
        raise ConfigError(
            f"--data {config.data}: no such folder; use fashion-mnist, synthetic or a folder with train/ and val/"
        )
    from ..data import build_loaders

    loaders = build_loaders(
        config.data,
        image_size=image_size,
        in_channels=in_channels,
        global_batch=batch,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=config.seed,
        data_dir=config.data_dir,
        train_subset=config.train_subset,
        ten_crop=config.ten_crop,
        num_workers=config.workers,
        device=device,
    )
    return loaders.train, loaders.test, loaders.num_classes, loaders.description, loaders.ten_crop


# --------------------------------------------------------------------------- faults


def _parse_fault() -> tuple[str, int, int] | None:
    spec = os.environ.get("ALEXNET2GPU_FAULT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    try:
        what, rank, step = spec.split(":")
        return what, int(rank.removeprefix("rank")), int(step.removeprefix("step"))
    except ValueError:
        raise ConfigError(f"ALEXNET2GPU_FAULT={spec}: expected WHAT:rankR:stepS (test-only)") from None


class _Progress:
    """Each rank's current step in torchrun's store, to name the ranks that stopped when a
    collective fails."""

    def __init__(self, world_size: int) -> None:
        import torch.distributed as dist

        self.world_size = world_size
        try:
            self.store = dist.distributed_c10d._get_default_store()
        except Exception:  # no store: errors just cannot name the rank
            self.store = None

    def mark(self, rank: int, step: int) -> None:
        if self.store is not None:
            self.store.set(f"alexnet2gpu/progress/{rank}", str(step))

    def silent_ranks(self, me: int, wait_s: float = 1.0) -> str:
        """Reports this rank's failure in the store, waits up to ``wait_s`` for the others'
        reports, and names the ranks that sent none: the dead or hung ones."""
        if self.store is None:
            return ""
        import datetime

        reported: set[int] = set()
        try:
            self.store.set_timeout(datetime.timedelta(seconds=2))
            self.store.set(f"alexnet2gpu/failed/{me}", "1")
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and len(reported) < self.world_size:
                reported |= {r for r in range(self.world_size) if self.store.check([f"alexnet2gpu/failed/{r}"])}
                time.sleep(0.05)
        except BaseException:  # the store is gone, or torchrun is stopping us: say what we know
            pass
        silent = [r for r in range(self.world_size) if r not in reported and r != me]
        if not silent or not reported:
            return ""
        steps = []
        for r in silent:
            try:
                key = f"alexnet2gpu/progress/{r}"
                steps.append(
                    f"rank {r} (last began step {int(self.store.get(key)) + 1})"
                    if self.store.check([key])
                    else f"rank {r}"
                )
            except BaseException:
                steps.append(f"rank {r}")
        return f"; not responding (dead or hung): {', '.join(steps)}"


# --------------------------------------------------------------------------- the loop


class _Job:
    """This process's share of a run: where it sits, what it holds, and its collectives."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.env = TorchrunEnv.from_environ()
        self.distributed = config.placement == "ranks" or (config.placement == "auto" and self.env.world_size > 1)
        if self.distributed and config.model != "dual":
            raise ConfigError(
                f"under torchrun each process holds one tower of the two-tower net 'dual'; '{config.model}' "
                "is a single-stream net that trains in one process: run it without torchrun"
            )
        if self.env.launched and self.env.world_size > 1 and not self.distributed:
            raise ConfigError(
                f"launched by torchrun with WORLD_SIZE={self.env.world_size} but --placement {config.placement} "
                "runs in one process: use --placement ranks (or auto) under torchrun, or run without torchrun"
            )

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()


def _build_net(config: TrainConfig, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The net from the run seed, initialised by the recipe (paper: [paper] 5; d2l: Xavier)."""
    torch.manual_seed(config.seed)
    model = build_model(
        config.model,
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
        width=config.width,
        dropout=config.dropout,
    )
    (init_paper_ if config.hyper.init == "paper" else init_xavier_)(model)
    return model


def _tower_of(name: str) -> str:
    head = name.split(".", 1)[0]
    return {"tower_a": "a", "tower_b": "b", "fc8": "a"}.get(head, "a")


def _grad_flags(placed: nn.Module) -> tuple[float, float]:
    """(tower a has a non-finite gradient, tower b has one); single-stream nets count as a."""
    finite: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    for name, p in placed.named_parameters():
        if p.grad is not None:
            finite[_tower_of(name)].append(torch.isfinite(p.grad).all())
    # one device-to-host read per tower, not one per parameter
    return tuple(0.0 if not f or bool(torch.stack(f).all()) else 1.0 for f in (finite["a"], finite["b"]))


def _weights_finite(placed: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in placed.parameters())


def _device_words(placed: nn.Module, world_size: int) -> str:
    layout = placed.layout
    if layout.placement == "ranks":
        backend = "nccl" if layout.devices[0].type == "cuda" else "gloo"
        return f"{world_size} processes ({layout.dp_size} x 2 towers) on {layout.devices[0].type} ({backend})"
    return ",".join(str(d) for d in layout.devices)  # split on the CPU: "cpu,cpu"


def _nonfinite_message(step: int, bad_loss: float, bad_a: float, bad_b: float) -> str:
    what = []
    if bad_loss:
        what.append("loss (in tower a, which holds fc8)")
    towers = [t for t, bad in (("a", bad_a), ("b", bad_b)) if bad]
    if towers:
        what.append("gradients in tower " + " and tower ".join(towers))
    return f"non-finite {' and '.join(what)} at step {step}"


def train(config: TrainConfig, display_factory: Callable[..., Any] | None = None) -> TrainResult:
    """Runs ``config`` on this process and returns what happened (on every rank; only
    rank 0's ``display`` prints). ``display_factory(total_steps, header)`` makes the live
    display on rank 0 (``report.training.TrainingDisplay``); None shows nothing."""
    job = _Job(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    if job.distributed:
        from ..parallel import close_distributed, init_distributed

        init_distributed(config.devices, timeout_s=config.timeout)
        try:
            result = _train(job, display_factory)
        except BaseException:
            close_distributed()
            raise
        close_distributed(barrier=True)
        return result
    return _train(job, display_factory)


def _train(job: _Job, display_factory) -> TrainResult:
    from ..io import checkpoints as ckpt
    from ..parallel import full_state_dict, load_full_state_dict

    config, hyper = job.config, job.config.hyper
    from ..models import DEFAULTS

    default_c, _, default_s = DEFAULTS.get(config.model, (3, 1000, 227))
    in_channels = config.in_channels or default_c
    image_size = config.image_size or default_s

    # Data first (it fixes the class count); replica d of k reads the d-th share of each
    # global batch, both tower ranks of a replica the same share.
    dp_size = job.env.world_size // 2 if job.distributed else 1
    dp_rank = job.env.rank // 2 if job.distributed else 0
    device_hint = _first_device(config, job)
    train_loader, test_loader, num_classes, data_words, ten_crop = _build_data(
        config, image_size, in_channels, dp_size, dp_rank, device_hint
    )
    model = _build_net(config, num_classes, in_channels, image_size)
    placed = place(model, config.placement, config.devices)
    layout = placed.layout
    device = layout.devices[0]
    rank0 = job.env.is_rank0 if job.distributed else True
    is_loss_rank = getattr(placed, "is_loss_rank", True)
    replica = layout.replica
    seed_dropout(placed, config.seed, replica=replica)

    optimizer = torch.optim.SGD(
        placed.parameters(), lr=hyper.lr, momentum=hyper.momentum, weight_decay=hyper.weight_decay
    )
    scheduler = (
        torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1, patience=PLATEAU_PATIENCE)
        if hyper.plateau
        else None
    )
    steps_per_epoch = train_loader.batches_per_epoch
    total_steps = config.steps or hyper.epochs * steps_per_epoch
    step, resumed_from = 0, None

    # ---- resume
    source = _resume_source(config)
    if source is not None:
        state = _load_everywhere(job, source)
        _check_config(state, config, source)
        load_full_state_dict(placed, state["model"])
        load_optimizer_state_by_name(placed, optimizer, state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        rng = dict(state["rng"])
        replicas = rng.pop("replica_dropout", None)
        if replicas and replica < len(replicas):
            rng["dropout"] = replicas[replica]
        restore_rng_state(placed, rng)
        train_loader.load_state_dict(state["data"])
        step, resumed_from = int(state["step"]), str(source)

    metrics = _Metrics(config.metrics if rank0 else None)
    if resumed_from:
        metrics.write({"event": "resume", "step": step, "checkpoint": resumed_from})
    header = {
        "model": config.model,
        "placement": layout.placement,
        "device": _device_words(placed, job.env.world_size),
        "data": data_words,
        "recipe": config.recipe,
        "batch_size": hyper.batch_size,
        "steps": total_steps,
        "image_size": image_size,
        "in_channels": in_channels,
        "lr": optimizer.param_groups[0]["lr"],
        "resumed_from": resumed_from,
    }
    display = display_factory(total_steps, header) if (display_factory and rank0) else None
    progress = _Progress(job.env.world_size) if job.distributed else None
    fault = _parse_fault()
    criterion_logits: list[torch.Tensor] = []

    def criterion(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        criterion_logits[:] = [logits.detach()]
        return F.cross_entropy(logits, y)

    epoch = train_loader.state_dict()["epoch"]
    run = _RunningMeans()
    skipped = 0
    images = train_seconds = 0.0
    test_accuracy: float | None = None
    saved_path = None

    def save() -> None:
        nonlocal saved_path
        if not config.checkpoint_dir:
            return
        finite = job.all_sum([0.0 if _weights_finite(placed) else 1.0])[0] == 0.0
        if not finite:
            raise Alexnet2gpuError(
                f"the weights are non-finite at step {step}: no checkpoint written "
                f"(the previous one in {config.checkpoint_dir} is kept)"
            )
        state = _checkpoint_state(job, placed, optimizer, scheduler, train_loader, step, config, full_state_dict)
        if rank0:
            saved_path = str(ckpt.save_in_directory(config.checkpoint_dir, step, state, keep=config.keep))
            metrics.write({"event": "checkpoint", "step": step, "path": saved_path})

    try:
        if display:
            display.start(step)
        while step < total_steps:
            train_loader.set_epoch(epoch)
            placed.train()
            for x, y in train_loader:
                if progress:
                    progress.mark(job.env.rank, step)
                t0 = time.perf_counter()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if fault and fault[0] in ("kill", "hang") and fault[2] == step + 1 and fault[1] == job.env.rank:
                    _inject(fault[0])
                try:
                    loss = forward_loss(placed, x, y, criterion)
                    if fault and fault[0] == "nan-loss" and fault[2] == step + 1 and is_loss_rank:
                        loss = loss * float("nan")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if fault and fault[0] == "nan-grad" and fault[2] == step + 1 and fault[1] == job.env.rank:
                        next(iter(placed.parameters())).grad.fill_(float("nan"))
                    local_loss = float(loss.detach()) if is_loss_rank else 0.0
                    correct = float((criterion_logits[0].argmax(1) == y).sum()) if is_loss_rank else 0.0
                    bad_loss = 0.0 if math.isfinite(local_loss) else 1.0
                    bad_a, bad_b = _grad_flags(placed)
                    # One all-reduce: the loss and accuracy for the display, and the
                    # non-finite flags, so that every rank takes the same decision.
                    loss_sum, correct_sum, seen, bad_loss, bad_a, bad_b = job.all_sum(
                        [
                            0.0 if bad_loss else local_loss,
                            correct,
                            float(len(y)) if is_loss_rank else 0.0,
                            bad_loss,
                            bad_a,
                            bad_b,
                        ]
                    )
                except RuntimeError as error:
                    raise _collective_failure(job, progress, step + 1, error) from None
                nonfinite = bool(bad_loss or bad_a or bad_b)
                if nonfinite:
                    message = _nonfinite_message(step + 1, bad_loss, bad_a, bad_b)
                    metrics.write(
                        {"event": "nonfinite", "step": step + 1, "action": config.on_nonfinite, "message": message}
                    )
                    if config.on_nonfinite == "stop":
                        raise Alexnet2gpuError(
                            f"{message}: stopped (--on-nonfinite skip skips such steps); "
                            "no checkpoint was written for it"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    if display:
                        display.note(f"{message}: step skipped")
                else:
                    optimizer.step()
                step += 1
                dt = time.perf_counter() - t0
                train_seconds += dt
                images += seen
                record = StepRecord(
                    step=step,
                    epoch=epoch,
                    loss=float("nan") if nonfinite else loss_sum / dp_size,
                    accuracy=correct_sum / seen if seen else 0.0,
                    lr=optimizer.param_groups[0]["lr"],
                    images_per_s=seen / dt if dt > 0 else 0.0,
                    skipped=nonfinite,
                )
                if not nonfinite:
                    run.add(record.loss, correct_sum, seen)
                metrics.write(record.to_json())
                if display:
                    display.update(record)
                # A checkpoint at an epoch's last batch waits for that epoch's evaluation
                # (below), so that a resumed run has seen the same scheduler steps.
                if (
                    config.checkpoint_every
                    and step % config.checkpoint_every == 0
                    and step < total_steps
                    and train_loader.state_dict()["epoch"] == epoch
                ):
                    save()
                if step >= total_steps:
                    break  # before the loader fetches a batch that this run will not train on
            epoch_complete = train_loader.state_dict()["epoch"] > epoch
            if epoch_complete or step >= total_steps:
                test_accuracy, test_images = _evaluate(job, placed, test_loader, device, ten_crop, is_loss_rank)
                metrics.write(
                    EvalRecord(step=step, epoch=epoch, test_accuracy=test_accuracy, test_images=test_images).to_json()
                )
                if display:
                    display.evaluated(step, test_accuracy)
                if scheduler is not None and epoch_complete:
                    # [paper] 5: on the validation error, once per epoch (not after a run's
                    # last, partial epoch, so that a run resumed past it steps the same way)
                    scheduler.step(1.0 - test_accuracy)
                placed.train()
            if epoch_complete:
                run.end_epoch()
                epoch += 1
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
                    save()
            elif step < total_steps:
                raise Alexnet2gpuError(f"the training data ran out at step {step} of epoch {epoch}")
        save()
    finally:
        if display:
            display.stop()
        metrics.close()
    loss, train_accuracy = run.summary()
    result = TrainResult(
        placement=layout.placement,
        device=_device_words(placed, job.env.world_size),
        steps=step,
        epochs_done=round(step / steps_per_epoch, 3),
        loss=loss,
        train_accuracy=train_accuracy,
        test_accuracy=test_accuracy,
        images_per_s=images / train_seconds if train_seconds else 0.0,
        train_seconds=train_seconds,
        skipped_steps=skipped,
        resumed_from=resumed_from,
        checkpoint=saved_path,
        history=history_of(metrics),
    )
    if rank0 and config.metrics:
        with open(config.metrics, "a") as f:
            f.write(json.dumps(result.to_json()) + "\n")
    return result


def history_of(metrics: _Metrics) -> list:
    return metrics.records


class _RunningMeans:
    """Training loss and accuracy over the current epoch, and the last complete one: the
    summary reports the last complete epoch (as d2l does), or the run if shorter."""

    def __init__(self) -> None:
        self.now = [0.0, 0.0, 0.0]
        self.last: list[float] | None = None

    def add(self, mean_loss: float, correct: float, seen: float) -> None:
        self.now[0] += mean_loss * seen
        self.now[1] += correct
        self.now[2] += seen

    def end_epoch(self) -> None:
        if self.now[2]:
            self.last, self.now = self.now, [0.0, 0.0, 0.0]

    def summary(self) -> tuple[float, float]:
        loss, correct, seen = self.now if self.now[2] else (self.last or [math.nan, math.nan, 1.0])
        return loss / seen, correct / seen


class _Metrics:
    """The metrics JSONL on rank 0: one object per line, flushed at once (a crash loses
    nothing written before it); the step records are also kept for the caller."""

    def __init__(self, path: str | None) -> None:
        self.records: list[dict] = []
        self.file = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a")

    def write(self, record: dict) -> None:
        if record.get("event") == "step":
            self.records.append(record)
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None


def _first_device(config: TrainConfig, job: _Job) -> torch.device:
    from ..parallel import default_device, parse_devices

    devices = parse_devices(config.devices)
    if job.distributed:
        if torch.cuda.is_available() and not devices:
            return torch.device("cuda", job.env.local_rank)
        return devices[0] if devices else torch.device("cpu")
    return devices[0] if devices else default_device()


def _resume_source(config: TrainConfig) -> Path | None:
    from ..io.checkpoints import newest_checkpoint

    if config.resume is False:
        return None
    if config.resume is True:
        directory = Path(config.checkpoint_dir)
        if not directory.exists():
            return None  # nothing written yet: a first start (e.g. torchrun's first attempt)
        return newest_checkpoint(directory)
    return Path(config.resume)


def _load_everywhere(job: _Job, source: Path) -> dict:
    """Rank 0 reads and verifies the checkpoint and sends it to every rank (other nodes
    need not see rank 0's disk); one process just reads it."""
    from ..io.checkpoints import load_checkpoint

    if not job.distributed:
        return load_checkpoint(source)
    import torch.distributed as dist

    box: list[Any] = [None]
    if job.env.is_rank0:
        try:
            box[0] = load_checkpoint(source)
        except Alexnet2gpuError as error:
            box[0] = error
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def _check_config(state: dict, config: TrainConfig, source: Path) -> None:
    saved = state.get("config", {})
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{source} is not an alexnet2gpu training checkpoint (format {state.get('format')})")
    for key in ("model", "batch_size", "seed", "data"):
        mine = getattr(config.hyper, key) if key == "batch_size" else getattr(config, key)
        if key in saved and saved[key] != mine:
            raise ConfigError(
                f"{source} was written with --{key.replace('_', '-')} {saved[key]}, this run has "
                f"{mine}: resume with the same setting"
            )


def _checkpoint_state(
    job: _Job, placed: nn.Module, optimizer, scheduler, train_loader, step: int, config: TrainConfig, full_state_dict
) -> dict:
    """The checkpoint (on every rank; only rank 0 writes it). Under ``ranks`` the towers'
    weights, optimizer states and dropout generators are gathered first."""

    model_state = full_state_dict(placed)
    optim_state = optimizer_state_by_name(placed, optimizer)
    rng = capture_rng_state(placed)
    if job.distributed:
        import torch.distributed as dist

        # Every rank's optimizer state and dropout generators; replicas hold the same
        # optimizer state (DDP averaged the gradients), but draw different dropout masks.
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (optim_state["state"], rng["dropout"]))
        optim_state["state"] = {k: v for s, _ in parts[:2] for k, v in s.items()}
        optim_state["param_groups"][0]["params"] = list(model_state)  # all names, in dual order
        replicas = [{**parts[2 * d][1], **parts[2 * d + 1][1]} for d in range(len(parts) // 2)]
        rng["dropout"] = replicas[0]
        rng["replica_dropout"] = replicas
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model_state,
        "optimizer": optim_state,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": step,
        "epoch": train_loader.state_dict()["epoch"],
        "data": train_loader.state_dict(),
        "rng": rng,
        "config": {
            "model": config.model,
            "width": config.width,
            "batch_size": config.hyper.batch_size,
            "seed": config.seed,
            "data": config.data,
            "recipe": config.recipe,
            "placement": placed.layout.placement,
            "world_size": placed.layout.world_size,
        },
    }


@torch.no_grad()
def _evaluate(
    job: _Job, placed: nn.Module, loader, device: torch.device, ten_crop: bool, is_loss_rank: bool
) -> tuple[float, int]:
    """Test accuracy over the whole test split (the replicas' shards summed)."""
    placed.eval()
    correct = total = 0.0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if ten_crop:
            from ..data import ten_crop_predict

            scores = ten_crop_predict(placed, x)
        else:
            scores = placed(x)
        if is_loss_rank:
            correct += float((scores.argmax(1) == y).sum())
            total += len(y)
    correct, total = job.all_sum([correct, total])
    return (correct / total if total else float("nan")), int(total)


def _inject(what: str) -> None:
    """Test-only faults (module docstring)."""
    if what == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if what == "hang":
        time.sleep(3600)


def _collective_failure(job: _Job, progress: _Progress | None, step: int, error: RuntimeError) -> Exception:
    """A failed collective as one line naming the ranks that stopped; other errors as they are."""
    if not job.distributed:
        return error
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    where = progress.silent_ranks(job.env.rank) if progress else ""
    failure = Alexnet2gpuError(
        f"rank {job.env.rank}: a collective failed at step {step} (process-group timeout "
        f"{job.config.timeout:g}s){where}: {first}"
    )
    failure.rank_specific = True  # every rank prints its own (other errors: rank 0 only)
    return failure
