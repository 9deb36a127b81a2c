"""The plain records a training run reports: one per step (:class:`StepRecord`), one per
evaluation (:class:`EvalRecord`) and the run's summary (:class:`TrainResult`), each a line
of the metrics JSONL (``to_json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["EvalRecord", "StepRecord", "TrainResult"]


@dataclass
class StepRecord:
    step: int  # optimizer steps done after this one (1-based)
    epoch: int
    loss: float
    accuracy: float
    lr: float
    images_per_s: float
    skipped: bool = False  # the optimizer did not step: a non-finite value, or (fp16) the loss scale overflowed
    loss_scale: float | None = None  # fp16: the GradScaler's scale in this step (None: no scaling)

    def to_json(self) -> dict:
        out = {"event": "step", **asdict(self)}
        if self.loss_scale is None:
            out.pop("loss_scale")
        return out


@dataclass
class EvalRecord:
    step: int
    epoch: int
    test_accuracy: float
    test_images: int
    val_accuracy: float | None = None  # the validation split's (None: the run has none)
    val_images: int = 0

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
    compile_seconds: float | None = None  # with --compile: the first step, which compiles (not in images/s)
    val_accuracy: float | None = None  # the validation split's, at the last evaluation
    skipped_steps: int = 0
    overflow_steps: int = 0  # fp16: steps the GradScaler skipped (inf/NaN gradients at the loss scale)
    resumed_from: str | None = None
    checkpoint: str | None = None
    history: list = field(default_factory=list)

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("history")
        return {"event": "summary", **out}
