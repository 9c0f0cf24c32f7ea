"""``load_tensor(folder, name)``: one tensor of a model folder (a merge's output, an input) or of a PEFT adapter
folder, for a look at it in a notebook. Only that tensor's bytes are read, from the file that holds it."""

from __future__ import annotations

import os
from typing import Iterable, Union

import torch

from ..errors import ModelError, did_you_mean

ADAPTER_WEIGHTS = "adapter_model.safetensors"   # as peft's save_pretrained names them


def load_tensor(folder: Union[str, os.PathLike], name: str) -> torch.Tensor:
    """The tensor ``name`` of the model in ``folder`` (safetensors, single or sharded; or a PEFT adapter's
    adapter_model.safetensors), as a CPU tensor of its stored dtype. Raises ModelError for a folder without
    weights or a name it does not hold (naming the closest names)."""
    folder = os.fspath(folder)
    adapter = os.path.join(folder, ADAPTER_WEIGHTS)
    if os.path.isfile(adapter):
        from safetensors import safe_open

        with safe_open(adapter, framework="pt") as f:
            _check_name(folder, name, f.keys())
            return f.get_tensor(name)
    from ..sources.opener import open_checkpoint

    checkpoint = open_checkpoint(folder)
    try:
        _check_name(folder, name, checkpoint.tensors)
        return checkpoint.read(name)
    finally:
        checkpoint.close()


def _check_name(folder: str, name: str, names: Iterable[str]) -> None:
    names = sorted(names)
    if name not in names:
        close = did_you_mean(name, names)
        raise ModelError(f"no tensor '{name}' here ({len(names)} tensors).{close}", file=folder,
                         hint=None if close else f"names look like {', '.join(names[:3])}, ...")
