"""What a training run is asked to do (:class:`TrainConfig`, the recipes) and the plain
records it reports (:class:`StepRecord`, :class:`EvalRecord`, :class:`TrainResult`).

Sources: [paper] Krizhevsky et al. 2012, section 5; [d2l] Dive into Deep Learning 8.1.4,
the seed's set-up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ConfigError

__all__ = [
    "NONFINITE_POLICIES",
    "PLATEAU_PATIENCE",
    "RECIPES",
    "SYNTHETIC_EPOCH_STEPS",
    "SYNTHETIC_EVAL_BATCHES",
    "EvalRecord",
    "Recipe",
    "StepRecord",
    "TrainConfig",
    "TrainResult",
]


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
