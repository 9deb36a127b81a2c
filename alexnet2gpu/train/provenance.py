"""The record that opens a run's metrics JSONL: everything that decides the run, so that a
reader of the file needs no one's word for the settings.

    {"event": "config", "settings": {every TrainConfig field}, "recipe": {the resolved
     Recipe, after its departures}, "departures": [...], "data": "...", "split": {"train",
     "val", "test" image counts}, "precision": "fp32", "memory_format": "contiguous",
     "cudnn_benchmark": false, "tf32_matmul": false, "tf32_cudnn": true,
     "float32_matmul_precision": "highest" (the switches in force), "placement": "...", "devices": "...",
     "weights_from": path or null, "resumed_from": path or null, "torch": "2.14.1",
     "torchvision": "0.29.1", "python": "3.11.7", "commit": "abc123..." (+ "dirty"),
     "machine": {"cpu": "...", "cpus": 2, "gpus": [...]}, "started": ISO time}
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path

import torch

__all__ = ["config_record", "git_commit", "machine"]


def config_record(config, hyper, departures: list[str], layout, data, resumed_from: str | None, numerics) -> dict:
    """The ``config`` event: ``config`` (a TrainConfig), ``hyper`` (its Recipe after
    departures), the layout and data it runs on, and ``numerics`` (the run's
    :class:`~alexnet2gpu.parallel.Numerics`, applied): its precision, memory format and
    the backends' switches."""
    import torchvision

    split = {name: _images(getattr(data, name)) for name in ("train", "val", "test")}
    return {
        "event": "config",
        "settings": asdict(config),
        "recipe": asdict(hyper),
        "departures": list(departures),
        "data": data.description,
        "split": split,
        **numerics.record(),
        "placement": layout.placement,
        "devices": layout.describe(),
        "weights_from": config.weights,
        "resumed_from": resumed_from,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        **git_commit(),
        "machine": machine(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _images(loader) -> int | None:
    """Images in a loader's split (None: no such split, or synthetic batches)."""
    dataset = getattr(loader, "dataset", None)
    return len(dataset) if dataset is not None else None


def git_commit(root: Path | None = None) -> dict:
    """``{"commit": sha, "dirty": bool}`` of the checkout this package runs from, or ``{}``
    outside a git checkout (an installed wheel)."""
    root = root or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": sha, "dirty": bool(status.strip())}


def machine() -> dict:
    """CPU model and count, and the GPUs' names."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpu": cpu, "cpus": os.cpu_count(), "gpus": gpus, "host": platform.node()}
