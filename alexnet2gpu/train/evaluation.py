"""The training loop's evaluations: validation and test accuracy after every epoch (and at
the run's end), under the run's autocast and memory format, counted on the device and read
once; then the plateau schedule's step on the validation error ([paper] 5).

``run`` is the loop's ``_Run`` (:mod:`.loop`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from ..data import ten_crop_predict
from ..parallel import devices_of
from .build import input_shape
from .records import EvalRecord
from .sync import sync

__all__ = ["count_accuracy", "equal_batches", "evaluate"]


def evaluate(run, epoch_complete: bool) -> None:
    """Validation and test accuracy, written and displayed; then the plateau scheduler's
    step, on the validation error ([paper] 5). The test set reports and drives nothing."""
    sync(run)  # the running means below include every step so far
    val_accuracy, val_images = count_accuracy(run, run.data.val) if run.data.val is not None else (None, 0)
    accuracy, images = count_accuracy(run, run.data.test)
    run.test_accuracy, run.val_accuracy = accuracy, val_accuracy
    record = EvalRecord(
        step=run.step,
        epoch=run.epoch,
        test_accuracy=accuracy,
        test_images=images,
        val_accuracy=val_accuracy,
        val_images=val_images,
    )
    run.metrics.write(record.to_json())
    if run.display:
        run.display.evaluated(run.step, accuracy, val_accuracy)
    loss, train_accuracy = run.means.summary()
    epochs = run.step / run.data.train.batches_per_epoch
    run.curve.append(
        {
            "epoch": epochs,
            "train_loss": loss,
            "train_accuracy": train_accuracy,
            "val_accuracy": val_accuracy,
            "test_accuracy": accuracy,
        }
    )
    if run.on_evaluated:
        run.on_evaluated(list(run.curve))
    if isinstance(run.scheduler, ReduceLROnPlateau) and epoch_complete:
        # [paper] 5: on the validation error, once per epoch (not after a run's last,
        # partial epoch, so that a run resumed past it steps the same way)
        run.scheduler.step(1.0 - val_accuracy)
    run.placed.train()


@torch.no_grad()
def count_accuracy(run, loader) -> tuple[float, int]:
    """Accuracy over the whole of ``loader`` (the replicas' shards summed), counted on the
    device and read once at the end. Rows labelled -1 are padding (:func:`equal_batches`)
    and count for nothing."""
    run.placed.eval()
    device = run.layout.device
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # correct, images
    batches = equal_batches(run, loader) if run.layout.placement == "hybrid" else loader
    for x, y in batches:
        x, y = run.numerics.format_input(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        with run.numerics.autocast(devices_of(run.placed)):
            scores = ten_crop_predict(run.placed, x) if run.data.ten_crop else run.placed(x)
        if run.holds_loss:
            counts[0] += (scores.argmax(1) == y).sum()
            counts[1] += (y >= 0).sum()
    correct, total = run.sum_over_ranks(counts).tolist()
    return (correct / total if total else float("nan")), int(total)


def equal_batches(run, loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``loader``'s batches, as many and as large on every rank: ``hybrid``'s forward is a
    collective over all the processes (fc6 gathers every process's examples), so a rank
    with fewer or smaller batches would leave the others waiting. An evaluation share holds
    images ``r, r + p, ...`` (:class:`~alexnet2gpu.data.loaders.EvalShard`), so shares differ
    by up to one image: every batch is padded to the local batch size with zero images
    labelled -1, and a rank whose share ran out runs padding alone until the longest
    share's last batch (every rank's count, summed into one vector over the ranks)."""
    counts = torch.zeros(run.layout.world_size, dtype=torch.float64)
    counts[run.layout.rank] = loader.batches_per_epoch
    rounds = run.sum_over_ranks(counts).max()
    rows = run.layout.local_batch(run.config.hyper.batch_size)
    channels, size = input_shape(run.config)
    image = (10, channels, size, size) if run.data.ten_crop else (channels, size, size)
    empty = (torch.zeros(0, *image), torch.zeros(0, dtype=torch.int64))
    batches = iter(loader)
    for _ in range(int(rounds)):
        x, y = next(batches, empty)
        if len(y) > rows:
            raise ValueError(f"an evaluation batch of {len(y)} images is larger than the local batch {rows}")
        if len(y) < rows:
            x = torch.cat([x, x.new_zeros(rows - len(y), *x.shape[1:])])
            y = torch.cat([y, y.new_full((rows - len(y),), -1)])
        yield x, y
