"""Choosing the compute device: ``auto`` is CUDA when present, else the CPU.

Only devices that hold real data and that this torch can use are accepted: ``cpu``, ``cuda`` / ``cuda:N``
(an N this machine has), and ``mps`` where torch supports it. Everything else (``meta``, which holds no
data; ``xla``, ``hpu``, ``vulkan``... which this torch build cannot drive; a misspelling) is a UsageError
before any input is opened, instead of a torch error in the middle of a merge.
"""

from __future__ import annotations

import torch

from ..errors import UsageError

CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"unknown device '{name}'", where="device", hint=f"use {CHOICES}") from None
    if device.type == "cpu":
        return torch.device("cpu")   # cpu:N is the same CPU
    if device.type == "cuda":
        return _cuda(device)
    if device.type == "mps" and _mps_available():
        return device
    if device.type == "meta":
        raise UsageError("the meta device holds no data, so nothing can be merged on it", where="device",
                         hint=f"use {CHOICES}")
    raise UsageError(f"device '{name}' cannot be used by this PyTorch build", where="device",
                     hint=f"use {CHOICES}")


def _cuda(device: torch.device) -> torch.device:
    if not torch.cuda.is_available():
        raise UsageError("CUDA was asked for but is not available", where="device",
                         hint="use --device auto (CUDA when present, else CPU) or --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise UsageError(f"there is no CUDA device {device.index}: this machine has {count} "
                         f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})", where="device",
                         hint="use --device cuda (the first), or one of the devices nvidia-smi lists")
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
