"""What a training run is asked to do (:class:`TrainConfig`, the recipes) and the plain
records it reports (:class:`StepRecord`, :class:`EvalRecord`, :class:`TrainResult`).

Sources: [paper] Krizhevsky et al. 2012, section 5; [cfg] the released code,
computerhistory/AlexNet-Source-Code (``layers/layer-params-145.cfg``, ``convdata.py``);
[caffe] BVLC ``models/bvlc_alexnet/train_val.prototxt``; [d2l] Dive into Deep Learning
8.1.4, the seed's set-up.

Departures, printed when a run starts: ten classes are not a thousand. With biases of 1
every fc7 unit is on, and fc8's curvature with 10 classes is about ten times what it is
with 1000; measured on Fashion-MNIST, lr 0.01 with momentum 0.9 diverges (at either input
scale). At lr 0.003 with centred 0-255 inputs the paper's N(0, 0.01) weights still sat at
chance (loss 2.31, train accuracy 0.10 after 140 steps of batch 128, dual at 64 px), while
the released code's initialisation ([cfg] layers-145.cfg: std 0.03 in conv3-conv5) learned
at once (train accuracy 0.48 at step 50, the same run otherwise). So on a real data set of
at most :data:`FEW_CLASSES` classes the paper recipe starts at lr 0.003 (unless ``--lr``
is given) with the released code's initialisation (unless ``--init`` is given).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..errors import ConfigError
from ..models.names import INIT_NAMES
from ..parallel.names import DEFAULT_TIMEOUT_S, PRECISIONS
from .names import NONFINITE_POLICIES, RECIPE_NAMES, SCHEDULES, SYNC_EVERY_STEPS
from .records import EvalRecord, StepRecord, TrainResult  # here too, where they were first

__all__ = [
    "CPU_SIZED_COMMAND",
    "DIVERGENCE_FACTOR",
    "DIVERGENCE_STEPS",
    "FEW_CLASSES",
    "NONFINITE_POLICIES",
    "PLATEAU_PATIENCE",
    "RECIPES",
    "SCHEDULES",
    "SYNC_EVERY_STEPS",
    "SYNTHETIC_EPOCH_STEPS",
    "EvalRecord",
    "Recipe",
    "SettingError",
    "StepRecord",
    "TrainConfig",
    "TrainResult",
    "cpu_hint",
]


@dataclass(frozen=True)
class Recipe:
    """Optimiser and initialisation of a training recipe."""

    init: str  # a models.INITS name: "paper", "cfg" or "xavier"
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    epochs: int
    schedule: str  # a SCHEDULES name: "plateau" (/10 on the validation error), "constant" or "cosine"
    pixels: str = "unit"  # "unit": [0, 1]; "mean-image": 0-255 minus the training mean image
    bias_lr: float = 1.0  # the biases' learning rate, as a multiple of the weights'
    bias_decay: float = 1.0  # the biases' weight decay, as a multiple of the weights'
    max_drops: int = 0  # at most this many lr /10 steps (plateau)
    few_classes_lr: float | None = None  # the start lr on <= FEW_CLASSES classes (module docstring)
    few_classes_init: str | None = None  # the initialisation on <= FEW_CLASSES classes (module docstring)


RECIPES = {
    "paper": Recipe(
        init="paper",  # [paper] 5: N(0, 0.01), biases 1 in conv2, conv4, conv5, fc6, fc7
        lr=0.01,  # [paper] 5
        momentum=0.9,  # [paper] 5
        weight_decay=5e-4,  # [paper] 5
        batch_size=128,  # [paper] 5
        epochs=90,  # [paper] 5: "roughly 90 cycles through the training set"
        schedule="plateau",  # [paper] 5: /10 "when the validation error rate stopped improving"
        pixels="mean-image",  # [cfg] convdata.py: raw 0-255 minus the mean image; [caffe] the same
        bias_lr=2.0,  # [cfg] layer-params-145.cfg: epsB = 2 x epsW; [caffe] lr_mult 2
        bias_decay=0.0,  # [cfg] wcB=0; [caffe] decay_mult 0
        max_drops=3,  # [paper] 5: "reduced three times prior to termination"
        few_classes_lr=0.003,  # the departures for 10 classes (module docstring)
        few_classes_init="cfg",
    ),
    # The seed's set-up ([d2l] 8.1.4): Xavier-uniform, plain SGD lr 0.01, batch 128, 10
    # epochs, Fashion-MNIST in [0, 1] resized; one learning rate and no decay for all.
    "d2l": Recipe(
        init="xavier", lr=0.01, momentum=0.0, weight_decay=0.0, batch_size=128, epochs=10, schedule="constant"
    ),
}
# How the learning rate moves: "plateau", /10 when the test error stops improving ([paper]
# 5); "constant", never ([d2l]); "cosine", from lr down to 0 over the run's steps
# (SGDR, Loshchilov & Hutter 2017, without restarts), for short runs that must settle
# within their few epochs (a constant lr left the d2l runs here oscillating: 0.865 then
# 0.848 at lr 0.02).
# Evaluations (epochs) without improvement before lr /= 10. The paper gives none; the
# released code's drops were about 25 epochs apart (layer-params-145.cfg's notes put them
# near epochs 20-25 and 47-51 of about 90), so a plateau is judged over several epochs,
# not one: 5 lets the three drops fit in 90 epochs with room between them.
PLATEAU_PATIENCE = 5
FEW_CLASSES = 10  # at most this many classes: the recipe's few_classes_lr applies
# A run is diverging when its loss stays above DIVERGENCE_FACTOR x its first loss for
# DIVERGENCE_STEPS steps in a row (a learning run never returns to twice its start; the
# diverging default runs measured went from 3.2 to 22 within tens of steps).
DIVERGENCE_FACTOR = 2.0
DIVERGENCE_STEPS = 20
# The README's CPU-sized run (docs/results.md: test accuracy 0.865 in 512 s on a 2-core CPU).
CPU_SIZED_COMMAND = (
    "alexnet2gpu train --model simplified --recipe d2l --momentum 0.9 --lr 0.02 --image-size 72 --epochs 2"
)
CPU_LARGE_IMAGE = 112  # above this side, a Fashion-MNIST epoch on a CPU takes hours (227 px: about 9-28 images/s)
# Models whose first epoch on Fashion-MNIST under d2l's plain SGD (lr 0.01, no momentum)
# ended at chance (scripts/recipe_matrix.py --recipes d2l --steps 468 --batch-size 128, 72 px)
D2L_PLAIN_SGD_STALLS = ("dual", "half")
SYNTHETIC_EPOCH_STEPS = 50  # synthetic data has no epochs: evaluate every 50 steps


class SettingError(ConfigError):
    """A :class:`TrainConfig` setting refused, its message naming fields (``batch_size must be
    at least 1, got 0``). ``template`` has ``{name}`` for each field named, ``{field}`` for
    ``field``'s name and ``{key}`` for each value by keyword: :meth:`naming` can reword it."""

    def __init__(self, template: str, field: str | None = None, **values) -> None:
        self.template, self.field, self.values = template, field, values
        super().__init__(self.naming(lambda f: f.name))

    def naming(self, name_of) -> str:
        """The message with ``name_of(dataclasses.Field)`` for each field's name (the CLI: its flag)."""
        names = {f.name: name_of(f) for f in fields(TrainConfig)}
        return self.template.format(**names, **self.values, field=names.get(self.field))


SHARED = {"cli": "shared"}  # the flag is cli.arguments' (shared with the other commands): same name and default


def setting(default, group: str, help: str, **flag):
    """A :class:`TrainConfig` field and its command-line flag, declared once: ``group`` is
    its section of ``train --help``, ``help`` its text (which says the default, else the
    parser adds it); ``flag`` may give ``flag`` (the name; else ``--`` and the field's
    name with ``-`` for ``_``), ``choices``, ``metavar``, ``type``, ``nargs`` and ``const``."""
    return field(default=default, metadata={"group": group, "help": help, **flag})


def _per_recipe(key: str) -> str:
    """A recipe value for a help text: ``128``, or ``paper 90, d2l 10``."""
    said = {name: format(getattr(r, key), "" if key in ("init", "schedule") else "g") for name, r in RECIPES.items()}
    same = len(set(said.values())) == 1
    return said["paper"] if same else ", ".join(f"{name} {value}" for name, value in said.items())


@dataclass
class TrainConfig:
    """Everything a run needs. Each field is declared once, here: the command line makes
    one flag of each (``batch_size``: ``--batch-size``), from its metadata (:func:`setting`)."""

    model: str = field(default="dual", metadata=SHARED)
    in_channels: int | None = field(default=None, metadata=SHARED)
    num_classes: int | None = field(default=None, metadata=SHARED)  # synthetic only; real data sets bring their own
    image_size: int | None = field(default=None, metadata=SHARED)
    width: float = field(default=1.0, metadata=SHARED)
    dropout: float = field(default=0.5, metadata=SHARED)
    placement: str = field(default="auto", metadata=SHARED)
    devices: str | None = field(default=None, metadata=SHARED)

    data: str = setting("fashion-mnist", "data", "fashion-mnist, synthetic, or a folder with train/ and val/")
    data_dir: str | None = setting(
        None,
        "data",
        "the Fashion-MNIST IDX files' folder (default: /usr/share/datasets/fashion-mnist, else downloaded)",
    )
    train_subset: int | None = setting(
        None, "data", "train on the first N training images only, for quick runs (default: all)", metavar="N"
    )
    val_size: int | None = setting(
        None,
        "data",
        "hold N training images out as the validation split, which the plateau schedule follows; the test set only "
        "reports (default: 5,000 of Fashion-MNIST's 60,000, 1 in 12 of a folder's train/; 0: none)",
        metavar="N",
    )
    ten_crop: bool = setting(
        False, "data", "evaluate image folders on 10 crops, softmax averaged (paper 4.1) (default: off)"
    )
    workers: int | None = setting(None, "data", "loader worker processes (default: automatic)")

    recipe: str = setting(
        "paper",
        "training",
        "paper: SGD momentum 0.9, wd 5e-4, lr 0.01, /10 on plateau, N(0, 0.01) init; d2l: the seed's plain SGD "
        "lr 0.01, Xavier init, 10 epochs",
        choices=RECIPE_NAMES,
    )
    init: str | None = setting(
        None,
        "training",
        "initialisation (default: the recipe's; paper: N(0, 0.01); cfg: the released layers-145.cfg, std 0.03 in "
        "conv3-5; xavier: d2l's)",
        choices=INIT_NAMES,
    )
    compile: bool = setting(
        False, "training", "torch.compile the placed net; the compile time is reported on its own line (default: off)"
    )
    steps: int | None = setting(None, "training", "total optimizer steps (default: the epochs')")
    epochs: int | None = setting(None, "training", f"epochs (default: the recipe's, {_per_recipe('epochs')})")
    batch_size: int | None = setting(
        None,
        "training",
        f"global batch, split over data-parallel replicas (default: the recipe's, {_per_recipe('batch_size')})",
    )
    lr: float | None = setting(
        None,
        "training",
        f"learning rate (default: the recipe's, {_per_recipe('lr')}; paper on {FEW_CLASSES} classes or fewer: "
        f"{RECIPES['paper'].few_classes_lr:g})",
    )
    momentum: float | None = setting(
        None, "training", f"SGD momentum (default: the recipe's, {_per_recipe('momentum')})"
    )
    weight_decay: float | None = setting(
        None, "training", f"weight decay (default: the recipe's, {_per_recipe('weight_decay')})"
    )
    schedule: str | None = setting(
        None,
        "training",
        "how the lr moves: plateau (/10 when validation accuracy stops improving), constant, or cosine (to 0 over "
        f"the run) (default: the recipe's, {_per_recipe('schedule')})",
        choices=SCHEDULES,
    )
    precision: str = setting(
        "fp32",
        "training",
        "arithmetic: fp32 (the paper's), or torch.autocast to bf16 or fp16 with float32 weights; fp16 scales its "
        "loss (torch.amp.GradScaler) (default: fp32)",
        choices=PRECISIONS,
    )
    channels_last: bool = setting(
        False, "training", "the net and its input batches in channels-last memory format (default: off)"
    )
    cudnn_benchmark: bool = setting(
        True, "training", "let cuDNN time its convolution algorithms and keep the fastest (CUDA only; default: on)"
    )
    seed: int = setting(0, "training", "run seed: weights, data order, dropout")
    threads: int | None = setting(None, "training", "CPU threads per process (default: torch's)")
    on_nonfinite: str = setting(
        "stop", "training", "a NaN/inf loss or gradient: stop the run, or skip that step", choices=NONFINITE_POLICIES
    )
    sync_every: int = setting(
        SYNC_EVERY_STEPS,
        "training",
        "read the loss and non-finite flags from the device every N steps: each read waits for the GPU's queue",
        metavar="N",
    )
    timeout: float = setting(
        DEFAULT_TIMEOUT_S,
        "training",
        "seconds a collective waits for a dead or hung rank before the job fails (under torchrun)",
    )

    metrics: str | None = setting(
        None,
        "output",
        "append one JSON object per step and per evaluation to PATH (rank 0; default: none)",
        metavar="PATH",
    )
    checkpoint_dir: str | None = setting(
        None, "output", "write checkpoints to DIR (rank 0; default: none; Ctrl-C writes one under runs/)", metavar="DIR"
    )
    checkpoint_every: int = setting(
        0, "output", "also checkpoint every N steps (default: 0, only at the end)", metavar="N"
    )
    keep: int = setting(3, "output", "checkpoints kept in DIR")
    resume: str | bool = setting(  # a path, or True: the newest in checkpoint_dir
        False,
        "output",
        "continue from PATH, or without PATH from the newest valid checkpoint in --checkpoint-dir, if there is "
        "one yet (default: a fresh start)",
        nargs="?",
        const=True,
        metavar="PATH",
    )
    weights: str | None = setting(
        None,
        "output",
        "start from the weights of this checkpoint (same model, any placement) with a fresh optimizer, schedule "
        "and data order: a second stage of training, e.g. a warm restart (default: none)",
        metavar="PATH",
    )
    # not a flag: without checkpoint_dir, where SIGINT/SIGTERM write the checkpoint (the CLI's runs/...)
    interrupt_dir: str | None = field(default=None, metadata={"cli": "none"})

    def __post_init__(self) -> None:
        for f in fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                options = ", ".join(choices)
                raise SettingError(
                    "unknown {field} '{value}': choose one of {options}", f.name, value=value, options=options
                )
        self._check_ranges()
        self._refuse_pairs_that_do_not_learn()
        self._check_paths()

    def _check_paths(self) -> None:
        """Paths that cannot work, and flags that cannot go together."""
        if self.data not in ("fashion-mnist", "synthetic") and Path(self.data).is_file():
            raise SettingError(
                "{data} {path} is a file: give a folder with train/ and val/ (one folder per class), "
                "fashion-mnist or synthetic",
                path=self.data,
            )
        if self.resume is True and not self.checkpoint_dir:
            raise SettingError(
                "{resume} without a path needs {checkpoint_dir}, the folder to look for the newest checkpoint in"
            )
        if self.resume not in (False, True) and not Path(self.resume).is_file():
            raise SettingError("{resume} {path}: no such checkpoint file", path=self.resume)
        if self.weights is not None and not Path(self.weights).is_file():
            raise SettingError("{weights} {path}: no such checkpoint file", path=self.weights)
        if self.weights is not None and self.resume:
            raise SettingError(
                "{weights} starts a new run from a checkpoint's weights, {resume} continues one: give one"
            )

    def _refuse_pairs_that_do_not_learn(self) -> None:
        """A model and recipe measured not to leave chance on Fashion-MNIST within their
        first epoch, refused with what did work (docs/results.md, "Every model and recipe")."""
        if self.data != "fashion-mnist":
            return
        if (self.model, self.recipe) == ("torchvision", "paper"):
            # torchvision's AlexNet has no LRN; on 0-255 inputs its loss starts at 18-23: at
            # lr 0.003 it went non-finite at step 8, at lr 0.001 and with Xavier weights it
            # stayed near chance
            raise SettingError(
                "{model} torchvision with {recipe} paper does not learn on Fashion-MNIST (no LRN: its loss on "
                "0-255 inputs starts near 20 and diverged, measured): use {recipe} d2l, or {model} "
                "dual/half/simplified"
            )
        if self.recipe == "d2l" and self.momentum is None and self.model in D2L_PLAIN_SGD_STALLS:
            # plain SGD at lr 0.01 (the seed's): loss 2.300 -> 2.302 over a whole epoch
            raise SettingError(
                "{model} {name} with the d2l recipe's plain SGD stayed at chance for a whole epoch on "
                "Fashion-MNIST (measured): add {momentum} 0.9 (0.78 after one epoch with {lr} 0.02), "
                "or {momentum} 0 to run it anyway",
                name=self.model,
            )

    def _check_ranges(self) -> None:
        """Numbers out of range, refused before any work with the setting and what works."""
        checks = (
            ("lr", lambda v: v > 0, "a positive number, e.g. 0.01"),
            ("momentum", lambda v: 0 <= v < 1, "a value in [0, 1), e.g. 0.9"),
            ("weight_decay", lambda v: v >= 0, "0 or more, e.g. 5e-4"),
            ("dropout", lambda v: 0 <= v < 1, "a value in [0, 1), e.g. 0.5"),
            ("width", lambda v: v > 0, "positive, e.g. 1 or 0.0625"),
            ("workers", lambda v: v >= 0, "0 or more"),
            ("timeout", lambda v: v > 0, "a positive number of seconds, e.g. 180"),
        )
        for name, ok, want in checks:
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and ok(value)):
                raise SettingError("{field} {value:g} is out of range: give {want}", name, value=value, want=want)
        for name in ("steps", "epochs", "batch_size", "threads", "train_subset", "sync_every", "keep"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SettingError("{field} must be at least 1, got {value}", name, value=value)
        for name, what in (("checkpoint_every", "steps"), ("val_size", "images")):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise SettingError("{field} must be 0 or more {what}, got {value}", name, value=value, what=what)

    @property
    def hyper(self) -> Recipe:
        """The recipe with this run's overrides applied (before :meth:`for_classes`): each
        setting named as a recipe field (lr, epochs...) that is not None."""
        given = {f.name: getattr(self, f.name) for f in fields(Recipe) if getattr(self, f.name, None) is not None}
        return replace(RECIPES[self.recipe], **given)

    def for_classes(self, num_classes: int) -> tuple[Recipe, list[str]]:
        """The recipe for a data set of ``num_classes`` classes, and the departures from its
        source that this makes, in words (the run's header prints them)."""
        hyper, notes = self.hyper, []
        if self.data == "synthetic" or num_classes > FEW_CLASSES:
            return hyper, notes
        if hyper.few_classes_lr is not None and self.lr is None:
            notes.append(
                f"departure from the {self.recipe} recipe: lr {hyper.few_classes_lr:g}, not {hyper.lr:g}, for "
                f"{num_classes} classes: lr {hyper.lr:g} diverged on Fashion-MNIST (measured); --lr overrides"
            )
            hyper = replace(hyper, lr=hyper.few_classes_lr)
        if hyper.few_classes_init is not None and self.init is None:
            notes.append(
                f"departure from the {self.recipe} recipe: the released code's initialisation "
                f"(--init {hyper.few_classes_init}: std 0.03 in conv3-5), not the paper's, for {num_classes} "
                "classes: N(0, 0.01) sat at chance on Fashion-MNIST (measured); --init overrides"
            )
            hyper = replace(hyper, init=hyper.few_classes_init)
        return hyper, notes


def cpu_hint(device_type: str, image_size: int, data: str) -> str | None:
    """A line for a run that will take hours on a CPU: the README's CPU-sized command."""
    if device_type != "cpu" or data != "fashion-mnist" or image_size <= CPU_LARGE_IMAGE:
        return None
    return (
        f"on a CPU, {image_size} px takes hours an epoch; for a CPU-sized run (test accuracy 0.865 after 2 epochs, "
        f"8.5 min on an idle 2-core Xeon with --threads 2, 50 min under load): {CPU_SIZED_COMMAND}"
    )
