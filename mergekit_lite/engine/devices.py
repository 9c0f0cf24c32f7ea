"""Choosing the compute device: ``auto`` is CUDA when present, else the CPU."""

from __future__ import annotations

import torch

from ..errors import UsageError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    if isinstance(name, torch.device):
        return name
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}'", where="device", hint="use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("CUDA was asked for but is not available", where="device",
                         hint="use --device auto (CUDA when present, else CPU) or --device cpu")
    return device
