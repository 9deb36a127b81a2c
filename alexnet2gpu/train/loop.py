"""The training loop behind ``alexnet2gpu train``, for every placement and data source.

    config = TrainConfig(model="dual", data="synthetic", steps=10, width=1/16, image_size=64)
    result = train(config)          # a TrainResult record; rendering is report.training

What it does on every process of a job (one process, or torchrun's processes under
``ranks``, ``replicas`` or ``hybrid``):

* resolves the :class:`~alexnet2gpu.parallel.Layout` once, builds the data for this
  replica, the net from the run seed, places it and seeds the dropout per data-parallel
  replica (``dual``'s per-tower generators; the single-stream nets' global RNG under
  ``replicas`` and ``hybrid``) (:mod:`.build`, :mod:`.checkpointing`);
* each step: ``forward_loss(...)`` under the run's autocast (``--precision``) and its
  ``backward()`` (of the scaled loss under fp16, whose overflows every rank agrees on:
  :func:`.build.build_scaler`); the step's loss, correct count and
  non-finite flags stay on the device (no host sync) until the next sync point, every
  ``sync_every`` steps and before any checkpoint, evaluation, stop or the end: there one
  all-reduce carries every pending step's numbers and one host read fetches them, so that
  every rank agrees whether to stop (``on_nonfinite="stop"``), and the message names the
  step and the tower (:mod:`.faults`); ``"skip"`` must know before the optimizer steps,
  so it reads every step. Signals are host flags, agreed on every step over the CPU;
* evaluates after every epoch (and at the end), steps ``ReduceLROnPlateau`` on the
  validation error (paper recipe);
* checkpoints what :mod:`.checkpointing` assembles, never a non-finite one;
* only rank 0 prints (through the display the caller passes) and writes (:mod:`.metrics`,
  checkpoints).

Under torchrun every rank records the step it is in (:class:`RankLiveness`), so that a
failed collective (a peer died, or the process-group timeout ran out waiting for a hung
one) names the ranks that stopped; ``close_distributed`` runs on every exit path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from ..errors import Alexnet2gpuError, ConfigError
from ..io.checkpoints import save_in_directory
from ..models import seed_dropout
from ..parallel import Layout, Numerics, close_distributed, devices_of, forward_loss, set_cpu_threads
from ..parallel.distributed import RankLiveness, all_sum
from .build import (
    RunData,
    build_data,
    build_net,
    build_numerics,
    build_optimizer,
    build_scaler,
    build_scheduler,
    input_shape,
    place_net,
    resolve_run_layout,
)
from .checkpointing import (
    check_resume_config,
    checkpoint_state,
    load_everywhere,
    load_weights,
    restore_checkpoint,
    resume_source,
    seed_replica_rng,
)
from .config import TrainConfig, TrainResult, cpu_hint
from .evaluation import evaluate
from .faults import Fault, collective_failure, grad_flags, weights_nonfinite
from .interrupt import Interrupted, StopSignals
from .metrics import MetricsLog, RunningMeans
from .provenance import config_record
from .sync import PendingStep, agreed_signal, sync

__all__ = ["TrainConfig", "TrainResult", "train"]


def train(
    config: TrainConfig,
    display_factory: Callable[..., Any] | None = None,
    on_evaluated: Callable[[list[dict]], None] | None = None,
) -> TrainResult:
    """Runs ``config`` on this process and returns what happened (on every rank; only
    rank 0's ``display`` prints). ``display_factory(total_steps, header)`` makes the live
    display on rank 0 (``report.training.TrainingDisplay``); None shows nothing.
    ``on_evaluated(curve)`` is called on rank 0 after each evaluation with the points so
    far, ``{"epoch", "train_loss", "train_accuracy", "test_accuracy"}`` (e.g. to redraw
    the curves). With ``checkpoint_dir`` (or, for a run without one, ``interrupt_dir``),
    SIGINT and SIGTERM end the run with a checkpoint at the current step and
    :class:`~.interrupt.Interrupted`."""
    set_cpu_threads(config.threads or None)
    layout = resolve_run_layout(config)
    if not layout.distributed:
        return _train(config, layout, display_factory, on_evaluated)
    try:
        result = _train(config, layout, display_factory, on_evaluated)
    except BaseException:
        close_distributed()
        raise
    close_distributed(barrier=True)
    return result


@dataclass
class _Run:
    """This process's share of one run, as the loop's functions pass it along."""

    config: TrainConfig
    layout: Layout
    data: RunData
    placed: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    metrics: MetricsLog
    numerics: Numerics
    scaler: torch.amp.GradScaler  # fp16's loss scaler; disabled (passing everything through) otherwise
    display: Any = None
    on_evaluated: Callable[[list[dict]], None] | None = None
    signals: StopSignals | None = None
    stop_signal: int = 0  # the signal every rank agreed to stop on (0: none)
    loss_start: float | None = None  # the first step's loss, for the divergence check
    above_start: int = 0  # steps in a row with the loss above DIVERGENCE_FACTOR x loss_start
    curve: list[dict] = field(default_factory=list)
    compile_seconds: float | None = None
    pending: list[PendingStep] = field(default_factory=list)  # steps whose numbers are still on the device
    liveness: RankLiveness | None = None
    fault: Fault | None = None
    step: int = 0
    epoch: int = 0
    means: RunningMeans = field(default_factory=RunningMeans)
    skipped: int = 0
    overflows: int = 0  # fp16: steps the loss scaler skipped
    images: float = 0.0
    train_seconds: float = 0.0
    test_accuracy: float | None = None
    val_accuracy: float | None = None
    resumed_from: str | None = None
    saved_path: str | None = None

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over every rank under torchrun (``ranks``, ``replicas``,
        ``hybrid``); as it is in one process (even where a process group happens to exist,
        e.g. a caller's torchrun job). A step's loss and correct count come from the ranks
        that hold the loss (:attr:`holds_loss`): under ``replicas`` each its own share's
        mean loss, under ``hybrid`` each the whole batch's; the sum over the ranks divided
        by ``dp_size`` is the global batch's loss either way (:mod:`.sync`), and each rank
        counts its own examples' correct answers."""
        return all_sum(tensor) if self.layout.distributed else tensor

    @property
    def holds_loss(self) -> bool:
        """This process holds fc8 and the loss: tower 0 under ``ranks``, every process
        otherwise."""
        return self.layout.tower == 0


def _train(config: TrainConfig, layout: Layout, display_factory, on_evaluated) -> TrainResult:
    run = _prepare(config, layout, display_factory)
    run.on_evaluated = on_evaluated if layout.is_rank0 else None
    try:
        if run.display:
            run.display.start(run.step)
        if config.checkpoint_dir or config.interrupt_dir:
            with StopSignals() as run.signals:
                _run_epochs(run)
        else:
            _run_epochs(run)
    except BaseException:
        run.metrics.close()
        raise
    finally:
        if run.display:
            run.display.stop()
    loss, train_accuracy = run.means.summary()
    result = TrainResult(
        placement=layout.placement,
        device=layout.describe(),
        steps=run.step,
        epochs_done=round(run.step / run.data.train.batches_per_epoch, 3),
        loss=loss,
        train_accuracy=train_accuracy,
        test_accuracy=run.test_accuracy,
        val_accuracy=run.val_accuracy,
        images_per_s=run.images / run.train_seconds if run.train_seconds else 0.0,
        train_seconds=run.train_seconds,
        compile_seconds=run.compile_seconds,
        skipped_steps=run.skipped,
        overflow_steps=run.overflows,
        resumed_from=run.resumed_from,
        checkpoint=run.saved_path,
        history=run.metrics.records,
    )
    run.metrics.write(result.to_json())
    run.metrics.close()
    return result


def _prepare(config: TrainConfig, layout: Layout, display_factory) -> _Run:
    """Data first (it fixes the class count), then the net, placed where the layout says."""
    data = build_data(config, layout)
    hyper, departures = config.for_classes(data.num_classes)
    numerics = build_numerics(config, layout)
    placed = place_net(build_net(config, data.num_classes, hyper), layout, numerics)
    seed_dropout(placed, config.seed, replica=layout.replica)
    seed_replica_rng(layout, config.seed)
    if config.weights:
        load_weights(layout, placed, Path(config.weights), config.model)
    optimizer = build_optimizer(hyper, placed)
    total_steps = config.steps or hyper.epochs * data.train.batches_per_epoch
    scheduler = build_scheduler(hyper, optimizer, total_steps)
    if isinstance(scheduler, ReduceLROnPlateau) and data.val is None:
        raise ConfigError(
            "the plateau schedule lowers the learning rate on the validation error, and --val-size 0 holds "
            "no validation images out: give --val-size N, or --schedule cosine or constant"
        )
    if config.compile:
        placed.compile()  # in place: parameter names, and so checkpoints, stay the same
    metrics = MetricsLog(config.metrics if layout.is_rank0 else None)
    scaler = build_scaler(numerics, layout)
    run = _Run(config, layout, data, placed, optimizer, scheduler, total_steps, metrics, numerics, scaler)
    source = resume_source(config)
    if layout.is_rank0 and config.metrics:
        resumed = str(source) if source else None
        metrics.write(config_record(config, hyper, departures, layout, data, resumed, numerics))
    if source is not None:
        state = load_everywhere(layout, source)
        check_resume_config(state, config, source)
        _check_schedule_length(state, total_steps, source)
        run.step = restore_checkpoint(state, layout, placed, optimizer, scheduler, data.train, scaler)
        run.loss_start = state.get("run", {}).get("loss_start")
        run.curve = list(state.get("run", {}).get("curve", []))
        run.resumed_from = str(source)
        metrics.write({"event": "resume", "step": run.step, "checkpoint": run.resumed_from})
    run.epoch = data.train.state_dict()["epoch"]
    if display_factory and layout.is_rank0:
        run.display = display_factory(total_steps, {**_header(run), "departures": departures})
    run.liveness = RankLiveness(layout.world_size) if layout.distributed else None
    run.fault = Fault.from_environ()
    return run


def _check_schedule_length(state: dict, total_steps: int, source) -> None:
    """A cosine schedule is drawn over the run's length: resuming it into a run of another
    length would bend the curve, so that is refused."""
    saved = (state.get("scheduler") or {}).get("T_max")
    if saved is not None and saved != total_steps:
        raise ConfigError(
            f"{source} was written for a cosine schedule over {saved} steps, this run has {total_steps}: "
            "resume with the same --epochs/--steps"
        )


def _header(run: _Run) -> dict:
    in_channels, image_size = input_shape(run.config)
    return {
        "model": run.config.model,
        "placement": run.layout.placement,
        "device": run.layout.describe(),
        "data": run.data.description,
        "recipe": run.config.recipe,
        "batch_size": run.config.hyper.batch_size,
        "steps": run.total_steps,
        "image_size": image_size,
        "in_channels": in_channels,
        "lr": run.optimizer.param_groups[0]["lr"],
        "precision": run.numerics.precision,
        "resumed_from": run.resumed_from,
        "hint": cpu_hint(run.layout.device.type, image_size, run.config.data),
    }


def _run_epochs(run: _Run) -> None:
    """The loop: epochs of steps, an evaluation after each epoch (and at the end), and
    checkpoints every ``checkpoint_every`` steps and at the end."""
    while run.step < run.total_steps:
        run.data.train.set_epoch(run.epoch)
        run.placed.train()
        for x, y in run.data.train:
            _train_step(run, x, y)
            # A checkpoint at an epoch's last batch (and a stop there) waits for that
            # epoch's evaluation (below), so that a resumed run has seen the same
            # scheduler steps.
            mid_epoch = run.data.train.state_dict()["epoch"] == run.epoch
            if (_checkpoint_due(run) or run.stop_signal) and mid_epoch:
                _save(run)
                _stop_if_signalled(run)
            if run.step >= run.total_steps:
                break  # before the loader fetches a batch that this run will not train on
        epoch_complete = run.data.train.state_dict()["epoch"] > run.epoch
        if epoch_complete or run.step >= run.total_steps:
            evaluate(run, epoch_complete)
        if epoch_complete:
            run.means.end_epoch()
            run.epoch += 1
            if _checkpoint_due(run) or run.stop_signal:
                _save(run)
                _stop_if_signalled(run)
        elif run.step < run.total_steps:
            raise Alexnet2gpuError(f"the training data ran out at step {run.step} of epoch {run.epoch}")
    _save(run)


def _stop_if_signalled(run: _Run) -> None:
    if run.stop_signal:
        raise Interrupted(run.stop_signal, run.step, run.saved_path, run.curve)


def _checkpoint_due(run: _Run) -> bool:
    every = run.config.checkpoint_every
    return bool(every) and run.step % every == 0 and run.step < run.total_steps


def _train_step(run: _Run, x: torch.Tensor, y: torch.Tensor) -> None:
    """One optimizer step; a failed collective in it (or at its sync point) becomes one
    line naming the ranks that stopped (:func:`.faults.collective_failure`)."""
    try:
        _step(run, x, y, run.step + 1)
    except RuntimeError as error:
        raise collective_failure(run.layout, run.liveness, run.step + 1, run.config.timeout, error) from None


def _step(run: _Run, x: torch.Tensor, y: torch.Tensor, step: int) -> None:
    """Forward, backward, the optimizer's and scheduler's steps. The step's numbers stay on
    the device until the next sync point (:func:`.sync.sync`), which writes, displays and checks
    them."""
    layout = run.layout
    lr = run.optimizer.param_groups[0]["lr"]  # this step's (a per-step schedule moves it after)
    if run.liveness:
        run.liveness.mark(layout.rank, run.step)
    t0 = time.perf_counter()
    x, y = run.numerics.format_input(x.to(layout.device, non_blocking=True)), y.to(layout.device, non_blocking=True)
    if run.fault:
        run.fault.before_forward(layout, step)
    stats = _forward_backward(run, x, y, step)
    run.pending.append(PendingStep(step, run.epoch, lr, time.perf_counter() - t0, stats))
    if not (run.config.on_nonfinite == "skip" and sync(run)):  # skip must know before stepping
        # fp16: skipped when the scaled gradients overflowed (every rank alike). GradScaler.step
        # reads its found-inf flag on the host, once per fp16 step (torch's read, not ours);
        # fp32 and bf16 pass straight to optimizer.step().
        run.scaler.step(run.optimizer)
        run.scaler.update()
    if run.scheduler is not None and not isinstance(run.scheduler, ReduceLROnPlateau):
        run.scheduler.step()  # per-step schedules (cosine)
    run.step = step
    run.stop_signal = agreed_signal(run)
    compiling = run.config.compile and run.compile_seconds is None  # the first step compiles: read it alone
    if compiling or run.stop_signal or step % run.config.sync_every == 0 or step >= run.total_steps:
        sync(run)


def _forward_backward(run: _Run, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
    """Forward and loss (under the run's autocast), backward (of the scaled loss, fp16).
    Returns ``[loss, correct, images, non-finite loss, non-finite gradients in tower a,
    in tower b, loss scale]`` as float64 on the layout's device, computed there: nothing
    here waits for the device (a CUDA ``float()`` would). Under fp16 the gradient flags
    are those of the scaled gradients that the scaler checks: an overflow, not a fault."""
    logits_seen: list[torch.Tensor] = []

    def criterion(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # hybrid's loss is the whole global batch's (on every process): count this
        # replica's own rows of it, so that the correct counts sum over the ranks
        rows = len(y)
        own = logits if len(logits) == rows else logits[run.layout.replica * rows : (run.layout.replica + 1) * rows]
        logits_seen[:] = [own.detach()]
        return F.cross_entropy(logits, labels)

    with run.numerics.autocast(devices_of(run.placed)):
        loss = forward_loss(run.placed, x, y, criterion)
    if run.fault:
        loss = run.fault.spoil_loss(loss, run.holds_loss, step)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()  # a disabled scaler returns the loss as it is
    if run.fault:
        run.fault.spoil_gradients(run.placed, run.layout, step)
    device = run.layout.device
    zero = torch.zeros((), dtype=torch.float64, device=device)
    if run.holds_loss:
        local_loss = loss.detach().to(device, torch.float64)
        bad_loss = local_loss.isfinite().logical_not().to(torch.float64)
        local_loss = torch.where(bad_loss > 0, zero, local_loss)
        correct = (logits_seen[0].argmax(1) == y).sum().to(device, torch.float64)
        seen = torch.full((), float(len(y)), dtype=torch.float64, device=device)  # a fill, not a host copy
        scale = _loss_scale(run.scaler, device)
    else:
        local_loss = bad_loss = correct = seen = scale = zero
    return torch.cat([torch.stack([local_loss, correct, seen, bad_loss]), grad_flags(run.placed, device), scale[None]])


def _loss_scale(scaler: torch.amp.GradScaler, device: torch.device) -> torch.Tensor:
    """The scale this step's loss was multiplied by, as float64 on ``device`` without a
    host read (``get_scale()`` would read it); 0 without scaling."""
    scale = getattr(scaler, "_scale", None) if scaler.is_enabled() else None
    if scale is None:
        return torch.zeros((), dtype=torch.float64, device=device)
    return scale.detach().reshape(()).to(device, torch.float64)


def _save(run: _Run) -> None:
    """A checkpoint at the current step (rank 0 writes it); never of non-finite weights."""
    sync(run)  # the steps before it written and checked first
    directory = run.config.checkpoint_dir or (run.config.interrupt_dir if run.stop_signal else None)
    if not directory:
        return
    if float(run.sum_over_ranks(weights_nonfinite(run.placed, run.layout.device))) != 0.0:
        raise Alexnet2gpuError(
            f"the weights are non-finite at step {run.step}: no checkpoint written "
            f"(the previous one in {directory} is kept)"
        )
    state = checkpoint_state(
        run.layout, run.placed, run.optimizer, run.scheduler, run.data.train, run.step, run.config, run.scaler
    )
    state["run"] = {"loss_start": run.loss_start, "curve": run.curve}  # the divergence check's start, the plot
    if run.layout.is_rank0:
        run.saved_path = str(save_in_directory(directory, run.step, state, keep=run.config.keep))
        run.metrics.write({"event": "checkpoint", "step": run.step, "path": run.saved_path})
