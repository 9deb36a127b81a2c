"""Devices, decided here only: where work goes when no device is named, how a device list
is read and checked against this machine, and how many CPU threads a process uses."""

from __future__ import annotations

import torch

from ..errors import ConfigError

__all__ = ["check_available", "default_device", "parse_devices", "set_cpu_threads"]


def default_device(local_rank: int = 0) -> torch.device:
    """Where work goes when no device is named, decided here only: ``cuda:LOCAL_RANK`` (the
    first GPU outside torchrun) where CUDA exists, else the CPU."""
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def set_cpu_threads(threads: int | None, flag: str = "--threads") -> int:
    """Sets torch's CPU threads for this process (None: leaves torch's choice) and returns
    the number before, so a caller can put it back; every command sets them here."""
    previous = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"{flag} must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    return previous


def parse_devices(spec: str | list | tuple | None) -> list[torch.device] | None:
    """``"cuda:0,cuda:1"``, ``["cpu", "cpu"]`` or ``None``; a bare ``cuda`` means cuda:0."""
    if spec is None:
        return None
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    devices = []
    for item in items:
        try:
            device = torch.device(item)
        except (RuntimeError, TypeError):
            raise ConfigError(f"'{item}' is not a device: use e.g. cpu, cuda:0, cuda:1") from None
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", 0)
        devices.append(device)
    if not devices:
        raise ConfigError("the device list is empty: use e.g. cpu, cuda:0 or cuda:0,cuda:1")
    return devices


def check_available(devices: list[torch.device]) -> None:
    """Refuses devices this machine does not have, naming what it has."""
    count = torch.cuda.device_count()
    for device in devices:
        if device.type == "cuda" and device.index >= count:
            raise ConfigError(
                f"device {device} was requested but this machine has {count} CUDA device(s)"
                + ("; use cpu (or --devices cpu,cpu for split)" if count == 0 else "")
            )
        if device.type not in ("cpu", "cuda", "meta"):
            raise ConfigError(f"device type '{device.type}' is not supported: use cpu or cuda:N")
