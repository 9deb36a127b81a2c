"""Evaluates a training checkpoint: top-1 and top-5 accuracy, per-class accuracy and the
confusion matrix on the test split (or a validation split), in any placement and on any
device. Returns a plain :class:`EvaluationRecord`; rendering is :mod:`alexnet2gpu.report.evaluate`.

    record = evaluate_checkpoint("runs/a/step-00000936.pt")                 # the run's own data
    record = evaluate_checkpoint(path, placement="towers", devices="cuda:0", ten_crop=True)

The net and its input are rebuilt from the checkpoint alone: the model, its width, input
channels and classes (from the weights' shapes where the checkpoint does not record them),
the image size, and the recipe's pixels (``unit``: [0, 1]; ``mean-image``: 0-255 minus the
training set's mean image, recomputed from the same training files, subset and held-out
images, and cached, as the run computed it). The data go through the run's own loader
(:func:`~alexnet2gpu.data.build_loaders`), in batches of the run's size, so evaluating a
run's final checkpoint on the device and placement it ran in gives its final test
accuracy exactly. Weights are the same in every placement (:mod:`alexnet2gpu.parallel.state`),
so a checkpoint written under ``ranks`` or ``towers`` evaluates under ``grouped`` or the
reverse; ``ranks`` itself is refused (evaluation runs in one process).

Top-1 is the arg-max (as the training loop counts it), top-5 counts an image when its label
is among the five highest scores (or the arg-max: ties never make top-5 lower than top-1);
with fewer than five classes, top-k over all of them. With 10 crops (image folders, [paper]
4.1) the scores are the softmax averaged over the crops, and ``single_crop`` holds the
centre crop's own top-1 and top-5 from the same pass.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data import build_loaders, ten_crop_predict
from ..data.loaders import Loaders
from ..data.synthetic import HELD_OUT_BATCHES, HELD_OUT_OFFSETS, SyntheticLoader
from ..errors import ConfigError
from ..io.checkpoints import CHECKPOINT_FORMAT, load_checkpoint
from ..models import DEFAULTS, build_model, is_two_tower
from ..parallel import load_full_state_dict, place, resolve_layout
from ..parallel.names import PROCESS_PLACEMENTS

__all__ = [
    "SPLITS",
    "CheckpointSpec",
    "ClassResult",
    "EvalData",
    "EvaluationRecord",
    "evaluate_checkpoint",
    "evaluation_data",
    "read_spec",
]

SPLITS = ("test", "val")
TOP_K = 5
CENTRE_CROP = 4  # torchvision's ten_crop order: 4 corners, centre, then the same mirrored
# Each recipe's pixels (train.config.RECIPES[name].pixels), for checkpoints that do not record them.
RECIPE_PIXELS = {"paper": "mean-image", "d2l": "unit"}


@dataclass(frozen=True)
class CheckpointSpec:
    """What a checkpoint says about its net and the input it was trained on."""

    path: str
    model: str
    width: float
    in_channels: int
    num_classes: int
    image_size: int
    recipe: str
    pixels: str  # "unit" or "mean-image"
    data: str  # "fashion-mnist", "synthetic" or an image folder
    data_dir: str | None
    train_subset: int | None
    val_size: int | None  # images the run held out of its training set (None: the default share, 0: none)
    ten_crop: bool
    batch_size: int
    seed: int
    step: int | None
    placement: str | None  # the placement that wrote it
    notes: tuple[str, ...] = ()  # what was inferred rather than read


@dataclass
class ClassResult:
    name: str
    images: int
    correct: int
    accuracy: float | None  # None for a class with no images in the split


@dataclass
class EvaluationRecord:
    checkpoint: str
    step: int | None
    model: str
    placement: str
    device: str
    split: str
    data: str  # the data in words (the loader's description)
    classes: list[str]
    images: int
    crops: int  # 1, or 10 (four corners, centre, mirrored; softmax averaged)
    top1: float
    top5: float
    top_k: int  # the k of "top5": 5, or the class count when there are fewer
    per_class: list[ClassResult]
    confusion: list[list[int]]  # confusion[true][predicted], image counts
    image_size: int
    in_channels: int
    width: float
    recipe: str
    pixels: str
    batch_size: int
    seconds: float
    single_crop: dict | None = None  # with crops == 10: the centre crop's {"top1", "top5"}
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- the checkpoint


def _weights_shapes(weights: dict) -> tuple[int, int]:
    """(in_channels, num_classes): the first convolution's input, the last layer's output."""
    convs = [v for v in weights.values() if torch.is_tensor(v) and v.dim() == 4]
    linears = [v for v in weights.values() if torch.is_tensor(v) and v.dim() == 2]
    if not convs or not linears:
        raise ConfigError("the checkpoint's weights hold no convolution or no linear layer: not an AlexNet")
    return int(convs[0].shape[1]), int(linears[-1].shape[0])


def _fits(model: str, weights: dict, **sizes) -> bool:
    """Whether the net built with ``sizes`` has exactly the shapes of ``weights`` (on meta)."""
    with torch.device("meta"):
        net = build_model(model, **sizes)
    own = net.state_dict()
    return all(k in weights and tuple(weights[k].shape) == tuple(v.shape) for k, v in own.items())


def _image_size(path: str, saved: dict, weights: dict, override: int | None, notes: list[str], **sizes) -> int:
    """The recorded image size; else ``override``; else the model's default if it fits."""
    recorded = saved.get("image_size")
    if recorded is not None:
        if override is not None and override != recorded:
            raise ConfigError(
                f"--image-size {override}: {path} was trained at {recorded} px, and evaluate rebuilds the "
                "run's own net and input: leave --image-size out"
            )
        return int(recorded)
    if override is not None:
        return override
    model = saved["model"]
    default = DEFAULTS[model][2]
    if _fits(model, weights, image_size=default, **sizes):
        notes.append(f"the checkpoint does not record its image size: the model's default {default} px fits it")
        return default
    raise ConfigError(
        f"{path} does not record its image size and {model}'s default {default} px does not fit its weights: "
        "pass --image-size, the train run's"
    )


def read_spec(state: dict, path: str | Path, image_size: int | None = None) -> CheckpointSpec:
    """The :class:`CheckpointSpec` of a loaded checkpoint ``state``; ``image_size`` is for
    checkpoints that do not record theirs."""
    path = str(path)
    saved = state.get("config") if isinstance(state.get("config"), dict) else {}
    weights = state.get("model")
    if state.get("format") != CHECKPOINT_FORMAT or not isinstance(weights, dict) or saved.get("model") not in DEFAULTS:
        raise ConfigError(f"{path} is not an alexnet2gpu training checkpoint (format {state.get('format')})")
    notes: list[str] = []
    in_channels, num_classes = _weights_shapes(weights)
    in_channels = int(saved.get("in_channels") or in_channels)
    num_classes = int(saved.get("num_classes") or num_classes)
    width = float(saved.get("width", 1.0))
    size = _image_size(
        path, saved, weights, image_size, notes, in_channels=in_channels, num_classes=num_classes, width=width
    )
    recipe = str(saved.get("recipe", "paper"))
    pixels = saved.get("pixels")
    if pixels is None:
        pixels = RECIPE_PIXELS.get(recipe, "unit")
        notes.append(f"the checkpoint does not record its pixels: the {recipe} recipe's, {pixels}")
    data = str(saved.get("data_root") or saved.get("data", "fashion-mnist"))  # a folder's resolved path
    if data == "fashion-mnist" and pixels == "mean-image" and "train_subset" not in saved:
        notes.append("the checkpoint does not record --train-subset: the mean image is the whole training set's")
    return CheckpointSpec(
        path=path,
        model=saved["model"],
        width=width,
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=size,
        recipe=recipe,
        pixels=pixels,
        data=data,
        data_dir=saved.get("data_dir"),
        train_subset=saved.get("train_subset"),
        val_size=saved.get("val_size", 0),  # checkpoints that do not record it predate the hold-out: none
        ten_crop=bool(saved.get("ten_crop", False)),
        batch_size=int(saved.get("batch_size") or 128),
        seed=int(saved.get("seed", 0)),
        step=state.get("step"),
        placement=saved.get("placement"),
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------- the data


@dataclass
class EvalData:
    """One split's loader, as the run built it, with its class names and description."""

    loader: object
    classes: list[str]
    description: str
    ten_crop: bool


def _synthetic(spec: CheckpointSpec, batch: int, split: str, ten_crop: bool) -> EvalData:
    if ten_crop:
        raise ConfigError("--ten-crop needs an image folder (--data PATH); synthetic data is evaluated whole")
    if split == "val" and spec.val_size == 0:
        raise ConfigError("--split val: the run held out no validation batches (--val-size 0): use --split test")
    loader = SyntheticLoader(
        seed=spec.seed,
        global_batch=batch,
        in_channels=spec.in_channels,
        image_size=spec.image_size,
        num_classes=spec.num_classes,
        dp_size=1,
        dp_rank=0,
        offset=HELD_OUT_OFFSETS[split],
        batches=HELD_OUT_BATCHES,
    )
    words = f"synthetic N(0, 1) images, {spec.num_classes} classes, seed {spec.seed} (the run's held-out batches)"
    return EvalData(loader, [str(c) for c in range(spec.num_classes)], words, False)


def _split_loader(loaders: Loaders, split: str, val_size: int | None):
    """The loader of ``split``; ``val`` only where the run held images out."""
    if split == "test":
        return loaders.test
    if loaders.val is None:
        held = "holds out no validation images" if val_size == 0 else "has no validation split"
        raise ConfigError(
            f"--split val: the run {held} (--val-size 0, or written before the hold-out): use --split test"
        )
    return loaders.val


def evaluation_data(
    spec: CheckpointSpec, split: str = "test", data: str | None = None, data_dir: str | None = None, **kw
) -> EvalData:
    """The split's loader, built as the run built it (the same pixels and mean image, size,
    channels, training subset, held-out images and batch). Keywords: ``batch_size``,
    ``ten_crop``, ``device``, ``workers``."""
    data = data or spec.data
    batch, ten_crop, device = kw["batch_size"], kw["ten_crop"], kw["device"]
    if data == "synthetic":
        return _synthetic(spec, batch, split, ten_crop)
    if data != "fashion-mnist" and not Path(data).is_dir():
        raise ConfigError(
            f"--data {data}: no such folder{' (the folder the checkpoint trained on)' if data == spec.data else ''}: "
            "give --data fashion-mnist or a folder with train/ and val/"
        )
    same = data == spec.data
    if data_dir is None and same and spec.data_dir is not None and not Path(spec.data_dir).is_dir():
        raise ConfigError(
            f"the Fashion-MNIST folder the checkpoint trained on, {spec.data_dir}, is gone: pass --data-dir"
        )
    loaders = build_loaders(
        data,
        image_size=spec.image_size,
        in_channels=spec.in_channels,
        global_batch=batch,
        seed=spec.seed,
        data_dir=data_dir if data_dir is not None else (spec.data_dir if same else None),
        train_subset=spec.train_subset if same and data == "fashion-mnist" else None,
        ten_crop=ten_crop,
        num_workers=kw.get("workers"),
        device=device,
        pixels=spec.pixels,
        val_size=spec.val_size,
    )
    if loaders.num_classes != spec.num_classes:
        raise ConfigError(
            f"--data {data} has {loaders.num_classes} classes and the checkpoint's net {spec.num_classes}: "
            "evaluate it on data with the classes it was trained on"
        )
    loader = _split_loader(loaders, split, spec.val_size)
    return EvalData(loader, list(loaders.classes), loaders.description, loaders.ten_crop)


# --------------------------------------------------------------------------- counting


def _hits(scores: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """[top-1 hits, top-k hits] of a batch; top-1 is the arg-max, as training counts it."""
    predicted = scores.argmax(1)
    in_top_k = (scores.topk(k, dim=1).indices == y[:, None]).any(1) | (predicted == y)
    return torch.stack([(predicted == y).sum(), in_top_k.sum()])


def _ten_crop_scores(placed: nn.Module, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loop's own 10-crop scores (:func:`ten_crop_predict`) and the crops' logits."""
    seen: list[torch.Tensor] = []

    def forward(images: torch.Tensor) -> torch.Tensor:
        seen.append(placed(images))
        return seen[-1]

    return ten_crop_predict(forward, crops), seen[0]


@torch.no_grad()
def _count(placed: nn.Module, data: EvalData, num_classes: int, device: torch.device) -> tuple[list, int, list | None]:
    """(confusion matrix, top-k hits, centre-crop [top-1, top-k] hits or None), counted on
    the device and read once at the end."""
    placed.eval()
    k = min(TOP_K, num_classes)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    hits = torch.zeros(2, dtype=torch.int64, device=device)
    centre = torch.zeros(2, dtype=torch.int64, device=device)
    for x, y in data.loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if data.ten_crop:
            scores, logits = _ten_crop_scores(placed, x)
            centre += _hits(logits.float().view(len(y), 10, -1)[:, CENTRE_CROP], y, k)
        else:
            scores = placed(x)
        hits += _hits(scores, y, k)
        confusion += torch.bincount(y * num_classes + scores.argmax(1), minlength=num_classes * num_classes)
    matrix = confusion.view(num_classes, num_classes).tolist()
    return matrix, int(hits[1]), centre.tolist() if data.ten_crop else None


def _per_class(confusion: list[list[int]], classes: list[str]) -> list[ClassResult]:
    out = []
    for i, row in enumerate(confusion):
        images = sum(row)
        out.append(ClassResult(classes[i], images, row[i], row[i] / images if images else None))
    return out


# --------------------------------------------------------------------------- the whole


def _placed_net(spec: CheckpointSpec, weights: dict, placement: str, devices) -> nn.Module:
    with torch.device("meta"):
        two_tower = is_two_tower(build_model(spec.model, width=1 / 64))
    layout = None if placement in PROCESS_PLACEMENTS else resolve_layout(placement, devices, two_tower=two_tower)
    if layout is None or layout.distributed:  # ranks, replicas, hybrid, or auto under torchrun
        one_process = "grouped, towers or split" if two_tower else "single"
        raise ConfigError(
            f"evaluate runs in one process: use --placement {one_process} (a checkpoint written under ranks, "
            "replicas or hybrid holds the same weights, plain and whole), and run it without torchrun"
        )
    net = build_model(
        spec.model,
        in_channels=spec.in_channels,
        num_classes=spec.num_classes,
        image_size=spec.image_size,
        width=spec.width,
    )
    try:
        load_full_state_dict(net, weights)  # on the CPU, before placing: the same in every placement
    except ConfigError as error:
        raise ConfigError(
            f"{spec.path} does not fit {spec.model} at {spec.in_channels}x{spec.image_size} px, width {spec.width:g}: "
            f"{error}"
        ) from None
    return place(net, layout)


def evaluate_checkpoint(
    path: str | Path,
    *,
    split: str = "test",
    data: str | None = None,
    data_dir: str | None = None,
    ten_crop: bool | None = None,
    batch_size: int | None = None,
    placement: str = "auto",
    devices=None,
    image_size: int | None = None,
    workers: int | None = None,
) -> EvaluationRecord:
    """Evaluates the checkpoint at ``path`` on ``split`` of its own data (or ``data``,
    ``data_dir``); ``ten_crop``, ``batch_size``: None for the run's. See the module docstring."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}': choose one of {', '.join(SPLITS)}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    start = time.perf_counter()
    state = load_checkpoint(path)
    spec = read_spec(state, path, image_size)
    placed = _placed_net(spec, state.pop("model"), placement, devices)
    del state
    layout = placed.layout
    batch = batch_size or spec.batch_size
    crops10 = spec.ten_crop if ten_crop is None else ten_crop
    loaded = evaluation_data(
        spec, split, data, data_dir, batch_size=batch, ten_crop=crops10, device=layout.device, workers=workers
    )
    confusion, top_k_hits, centre = _count(placed, loaded, spec.num_classes, layout.device)
    images = sum(map(sum, confusion))
    if images == 0:
        raise ConfigError(f"the {split} split of {data or spec.data} holds no images")
    correct = sum(confusion[i][i] for i in range(len(confusion)))
    return EvaluationRecord(
        checkpoint=str(path),
        step=spec.step,
        model=spec.model,
        placement=layout.placement,
        device=layout.describe(),
        split=split,
        data=loaded.description,
        classes=loaded.classes,
        images=images,
        crops=10 if loaded.ten_crop else 1,
        top1=correct / images,
        top5=top_k_hits / images,
        top_k=min(TOP_K, spec.num_classes),
        per_class=_per_class(confusion, loaded.classes),
        confusion=confusion,
        image_size=spec.image_size,
        in_channels=spec.in_channels,
        width=spec.width,
        recipe=spec.recipe,
        pixels=spec.pixels,
        batch_size=batch,
        seconds=time.perf_counter() - start,
        single_crop={"top1": centre[0] / images, "top5": centre[1] / images} if centre else None,
        notes=list(spec.notes),
    )
