"""What a training checkpoint holds, assembled on every rank and loaded back into any
placement, so that a resumed run continues bit for bit.

    state = checkpoint_state(layout, placed, optimizer, scheduler, loader, step, config)
    source = resume_source(config); state = load_everywhere(layout, source)
    restore_checkpoint(state, layout, placed, optimizer, scheduler, loader)

Contents: the full two-tower state dict (the same keys in every placement), the optimizer
state keyed by parameter *name* (so a ``ranks`` checkpoint resumes under ``towers`` and the
reverse, whose parameter order differs), the scheduler, fp16's loss scaler (its scale and
growth tracker; None in fp32 and bf16), the step, the data position, the RNG states and
the settings a resume must share. Writing and verifying the file is
:mod:`alexnet2gpu.io.checkpoints`' job.

RNG state. :func:`capture_rng_state` returns the torch CPU generator, every CUDA
generator (when CUDA is available), Python's ``random`` and each
:class:`~alexnet2gpu.models.TowerDropout` generator with its seed, keyed by module name
(``tower_a.dropout``...), which is the same in every placement. NumPy's generator is not
captured: nothing here draws from it. Under the ``ranks`` placement each process holds
only its own tower's generator: gather the ``"dropout"`` entries of both tower ranks into
one dict before rank 0 saves; :func:`restore_rng_state` restores the towers a process holds.
Under ``replicas`` and ``hybrid`` the single-stream nets' ``nn.Dropout`` draws from each
process's global RNG, seeded per replica (:func:`seed_replica_rng`): every replica's torch
and CUDA states are saved (``"replica_global"``) and each replica resumes its own.

Optimizer state under ``hybrid``: fc6-fc8's momentum buffers are DTensors like their
parameters; they are saved as plain full tensors (a collective, in the same order on every
rank) and distributed back as the parameter is on loading, so the file is the same as any
other placement's.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import Alexnet2gpuError, ConfigError
from ..io.checkpoints import CHECKPOINT_FORMAT, load_checkpoint, newest_checkpoint
from ..models import TowerDropout
from ..parallel import Layout, full_state_dict, load_full_state_dict
from ..parallel.state import distributed_like, full_cpu
from .build import input_shape
from .config import TrainConfig

__all__ = [
    "CHECKPOINT_FORMAT",
    "capture_rng_state",
    "check_resume_config",
    "checkpoint_state",
    "load_everywhere",
    "load_weights",
    "load_optimizer_state_by_name",
    "optimizer_state_by_name",
    "restore_checkpoint",
    "restore_rng_state",
    "resume_source",
    "seed_replica_rng",
]

log = logging.getLogger("alexnet2gpu")


def _dropouts(model: nn.Module) -> dict[str, tuple[TowerDropout, torch.device]]:
    """Each TowerDropout by name, with the device of its tower's parameters (where its
    activations, and so its generator, live)."""
    found = {}
    parents = dict(model.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, TowerDropout):
            parent = parents[name.rpartition(".")[0]] if "." in name else model
            param = next(parent.parameters(), None)
            found[name] = (module, param.device if param is not None else torch.device("cpu"))
    return found


def capture_rng_state(model: nn.Module) -> dict[str, Any]:
    """Every random stream a training step draws from, as a dict ``weights_only`` loads."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "dropout": {},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for name, (module, _) in _dropouts(model).items():
        generator = module.generator
        state["dropout"][name] = {
            "seed": module.seed,
            "device": str(generator.device) if generator is not None else None,
            "state": generator.get_state() if generator is not None else None,
        }
    return state


def restore_rng_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Puts back what :func:`capture_rng_state` captured. A dropout generator that had been
    created is re-created on its tower's current device and given its saved state; one
    that had not stays lazy (created from its seed on first use, as in an unbroken run).
    A state saved on another kind of device (CUDA vs CPU generators differ) cannot be
    continued: that generator restarts from its seed, with a warning."""
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "checkpoint holds %d CUDA generator states, this machine has %d devices: CUDA generators not restored",
                len(cuda),
                torch.cuda.device_count(),
            )
    saved = state.get("dropout", {})
    for name, (module, device) in _dropouts(model).items():
        if name not in saved:
            log.warning("checkpoint holds no dropout generator for %s: it starts from its seed", name)
            continue
        entry = saved[name]
        module.seed = int(entry["seed"])
        module.generator = None
        if entry["state"] is None or device.type == "meta":
            continue
        if torch.device(entry["device"]).type != device.type:
            log.warning(
                "dropout generator %s was saved on %s and now runs on %s: it restarts from its seed",
                name,
                entry["device"],
                device,
            )
            continue
        generator = torch.Generator(device=device)
        generator.set_state(entry["state"])
        module.generator = generator


# Keeps the replicas' seeds apart from the run seed and from each other (a prime stride).
REPLICA_SEED_STRIDE = 1_000_003


def _own_global_rng(layout: Layout) -> bool:
    """``replicas`` and ``hybrid``: each process draws ``nn.Dropout``'s masks from its own
    global RNG (``ranks`` runs ``dual``, whose dropout has generators of its own)."""
    return layout.distributed and layout.placement != "ranks"


def seed_replica_rng(layout: Layout, seed: int, step: int = 0) -> None:
    """Under ``replicas`` and ``hybrid``: seeds this process's global RNG (torch's, which
    also seeds CUDA's) for its replica, after the net was built from the run seed, so that
    replicas draw different dropout masks and the same ones for the same seed. ``step``:
    a resume that holds no state for this replica (e.g. from a one-process run) starts a
    fresh stream of its own at that step. Elsewhere nothing changes."""
    if _own_global_rng(layout):
        torch.manual_seed(seed + REPLICA_SEED_STRIDE * (layout.replica + 1) + step)


def _replica_global_rng(rng: dict, layout: Layout) -> dict | None:
    """This replica's saved global RNG states (``replicas``, ``hybrid``), popped out of
    ``rng``; None where there are none (another placement, or a one-process run)."""
    saved = rng.pop("replica_global", None)
    if not _own_global_rng(layout) or not saved or layout.replica >= len(saved):
        return None
    return {k: v for k, v in saved[layout.replica].items() if v is not None}


# --------------------------------------------------------------------------- optimizer state by name


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
            # full_cpu: a DTensor's whole tensor (hybrid's fc6-fc8; a collective, in the same order everywhere)
            index_to_name[i]: {k: (full_cpu(v) if torch.is_tensor(v) else v) for k, v in s.items()}
            for i, s in sd["state"].items()
        },
        "param_groups": [{**g, "params": [index_to_name[i] for i in g["params"]]} for g in sd["param_groups"]],
    }


def load_optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, named: dict) -> None:
    """Loads :func:`optimizer_state_by_name` output (possibly holding more parameters, e.g.
    both towers) into ``optimizer``: group ``i`` of the checkpoint gives its settings to
    group ``i`` here, each parameter's state is found by its name."""
    if len(named["param_groups"]) != len(optimizer.param_groups):
        raise ConfigError(
            f"the checkpoint's optimizer has {len(named['param_groups'])} parameter group(s), this run's has "
            f"{len(optimizer.param_groups)}: it was written by another recipe"
        )
    names = {id(p): n for n, p in model.named_parameters()}
    index: dict[str, int] = {}
    groups = []
    for group, saved in zip(optimizer.param_groups, named["param_groups"]):
        start = len(index)
        index.update({names[id(p)]: start + k for k, p in enumerate(group["params"])})
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": list(range(start, len(index)))})
    if named["state"]:  # empty for plain SGD; otherwise every parameter has its entry
        missing = [n for n in index if n not in named["state"]]
        if missing:
            raise ConfigError(f"the checkpoint's optimizer state lacks {missing[0]}: it belongs to another model")
    params = dict(model.named_parameters())
    state = {
        index[n]: {k: _like_param(params[n], v) for k, v in s.items()} for n, s in named["state"].items() if n in index
    }
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _like_param(param: torch.Tensor, value):
    """A saved (plain, full) state tensor laid out as its parameter: a DTensor with the
    parameter's mesh and placements for hybrid's fc6-fc8 (no communication), else as it is."""
    if torch.is_tensor(value) and tuple(value.shape) == tuple(param.shape):
        return distributed_like(param, value)
    return value


# --------------------------------------------------------------------------- the checkpoint


def checkpoint_state(
    layout: Layout,
    placed: nn.Module,
    optimizer,
    scheduler,
    train_loader,
    step: int,
    config: TrainConfig,
    scaler: torch.amp.GradScaler | None = None,
) -> dict:
    """The checkpoint (on every rank; only rank 0 writes it). Under ``ranks`` the towers'
    weights, optimizer states and dropout generators are gathered first; under
    ``replicas`` and ``hybrid`` every rank holds the same full weights and optimizer state
    (DDP's gradients are the same everywhere, hybrid's fc6-fc8 are gathered whole), so
    rank 0's are saved, with every replica's random streams. Every rank's loss scaler is
    the same (its overflows are agreed), so rank 0's is saved."""
    model_state = full_state_dict(placed)
    optim_state = optimizer_state_by_name(placed, optimizer)
    rng = capture_rng_state(placed)
    if layout.placement == "ranks":
        _gather_tower_ranks(layout, model_state, optim_state, rng)
    elif layout.distributed:
        _gather_replica_rng(layout, rng)
    folder = config.data not in ("fashion-mnist", "synthetic")  # an image folder: its path, resolved
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model_state,
        "optimizer": optim_state,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
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
            "precision": config.precision,
            "channels_last": config.channels_last,
            "placement": layout.placement,
            "world_size": layout.world_size,
            # the input, as `evaluate` rebuilds it (checks.evaluate.read_spec)
            "in_channels": input_shape(config)[0],
            "image_size": input_shape(config)[1],
            "pixels": config.hyper.pixels,
            "data_root": str(Path(config.data).resolve()) if folder else None,
            "data_dir": str(Path(config.data_dir).resolve()) if config.data_dir else None,
            "train_subset": config.train_subset,
            "val_size": config.val_size,
            "ten_crop": config.ten_crop,
        },
    }


def _gather_tower_ranks(layout: Layout, model_state: dict, optim_state: dict, rng: dict) -> None:
    """``ranks``: every rank's optimizer state and dropout generators; replicas hold the
    same optimizer state (DDP averaged the gradients), but draw different dropout masks."""
    groups = [g["params"] for g in optim_state["param_groups"]]
    parts: list[Any] = [None] * layout.world_size
    dist.all_gather_object(parts, (optim_state["state"], rng["dropout"], groups, layout.replica))
    first_replica = [p for p in parts if p[3] == 0]
    optim_state["state"] = {k: v for p in first_replica for k, v in p[0].items()}
    order = {name: k for k, name in enumerate(model_state)}  # all names, in dual order
    for g, group in enumerate(optim_state["param_groups"]):
        group["params"] = sorted({n for p in first_replica for n in p[2][g]}, key=order.__getitem__)
    replicas: list[dict] = [{} for _ in range(layout.dp_size)]
    for _, dropout, _, replica in parts:
        replicas[replica].update(dropout)
    rng["dropout"] = replicas[0]
    rng["replica_dropout"] = replicas


def _gather_replica_rng(layout: Layout, rng: dict) -> None:
    """``replicas``, ``hybrid``: every replica's dropout generators (``dual``'s) and global
    RNG states (the single-stream nets' ``nn.Dropout``), in replica order."""
    parts: list[Any] = [None] * layout.world_size
    mine = {"torch": rng["torch"], "cuda": rng.get("cuda")}
    dist.all_gather_object(parts, (layout.replica, rng["dropout"], mine))
    parts.sort(key=lambda p: p[0])
    rng["replica_dropout"] = [p[1] for p in parts]
    rng["replica_global"] = [p[2] for p in parts]


def resume_source(config: TrainConfig) -> Path | None:
    """The checkpoint to resume from: ``--resume PATH``, the newest valid one in
    ``--checkpoint-dir`` for a bare ``--resume``, or None (a fresh start)."""
    if config.resume is False:
        return None
    if config.resume is True:
        directory = Path(config.checkpoint_dir)
        if not directory.exists():
            return None  # nothing written yet: a first start (e.g. torchrun's first attempt)
        return newest_checkpoint(directory)
    return Path(config.resume)


def load_everywhere(layout: Layout, source: Path) -> dict:
    """Rank 0 reads and verifies the checkpoint and sends it to every rank (other nodes
    need not see rank 0's disk); one process just reads it."""
    if not layout.distributed:
        return load_checkpoint(source)

    box: list[Any] = [None]
    if layout.is_rank0:
        try:
            box[0] = load_checkpoint(source)
        except Alexnet2gpuError as error:
            box[0] = error
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def check_resume_config(state: dict, config: TrainConfig, source: Path) -> None:
    """Refuses a checkpoint written with another model, batch, seed, data set, recipe or
    precision. Another precision is another recipe: the resumed run would no longer be the
    one its record describes (and fp16's loss scale has no counterpart in the others), so
    it is refused like one; ``--weights`` starts a new run from its weights in any precision.
    A checkpoint without a precision predates it and was float32."""
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
    if "recipe" in saved and saved["recipe"] != config.recipe:  # another optimiser, schedule and initialisation
        raise ConfigError(
            f"checkpoint {source} was written by a run with recipe {saved['recipe']}; this run has recipe "
            f"{config.recipe}: resume with --recipe {saved['recipe']}, or start a new run with --weights {source}"
        )
    precision = saved.get("precision", "fp32")
    if precision != config.precision:
        raise ConfigError(
            f"checkpoint {source} was written by a run in --precision {precision}; this run has --precision "
            f"{config.precision}: resume with --precision {precision}, or start a new run from its weights with "
            f"--weights {source}"
        )


def load_weights(layout: Layout, placed: nn.Module, source: Path, model: str) -> None:
    """``--weights``: only the net's weights from a checkpoint of the same model (any
    placement); the optimizer, schedule, step and data order start fresh."""
    state = load_everywhere(layout, source)
    saved = state.get("config", {}).get("model")
    if state.get("format") != CHECKPOINT_FORMAT or saved != model:
        raise ConfigError(f"--weights {source} holds {saved or 'no alexnet2gpu'} weights, this run trains {model}")
    load_full_state_dict(placed, state["model"])


def restore_checkpoint(
    state: dict,
    layout: Layout,
    placed: nn.Module,
    optimizer,
    scheduler,
    train_loader,
    scaler: torch.amp.GradScaler | None = None,
) -> int:
    """Puts a checkpoint back into this process's share of the run; returns its step."""
    load_full_state_dict(placed, state["model"])
    load_optimizer_state_by_name(placed, optimizer, state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rng = dict(state["rng"])
    replicas = rng.pop("replica_dropout", None)
    if replicas and layout.replica < len(replicas):
        rng["dropout"] = replicas[layout.replica]
    own = _replica_global_rng(rng, layout)
    rng.update(own or {})
    restore_rng_state(placed, rng)
    if own is None and layout.replica > 0:
        seed_replica_rng(layout, int(state["config"]["seed"]), int(state["step"]))
    train_loader.load_state_dict(state["data"])
    return int(state["step"])
