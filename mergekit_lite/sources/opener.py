"""Opening a model folder: safetensors weights (sharded or single), or pickle weights when allowed.

It sits above both readers (checkpoint.py, pickled.py) so neither needs to know the other.
"""

from __future__ import annotations

import os
from typing import Optional

from ..errors import ModelError
from ..safetensors_format import read_header
from .checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    Checkpoint,
    contained_path,
    no_weights_error,
    pickle_weights,
    read_config,
    read_sharded,
)
from .pickled import open_pickled


def open_checkpoint(folder: str, label: Optional[str] = None, *, allow_pickle: bool = False) -> Checkpoint:
    """Read the tensor table and config of a model folder. No tensor data is read.

    Pickle checkpoints (``pytorch_model.bin``) are refused unless ``allow_pickle``; then they are loaded
    with ``torch.load(weights_only=True)`` only, and only when the folder has no safetensors weights.
    """
    label = label or folder
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        what = "is a file, not a model folder" if os.path.exists(folder) else "model folder not found"
        raise ModelError(what, file=label, hint="give the folder that holds config.json and *.safetensors")
    index_path = os.path.join(folder, INDEX_FILE)
    config = read_config(folder)
    if os.path.exists(index_path):   # and model.safetensors beside it only if the index names just that file
        _refuse_other_weights(config, INDEX_FILE, label)
        tensors = read_sharded(folder, contained_path(folder, INDEX_FILE, label), label)
    elif os.path.exists(os.path.join(folder, SINGLE_FILE)):
        _refuse_other_weights(config, SINGLE_FILE, label)
        tensors, _ = read_header(contained_path(folder, SINGLE_FILE, label))
    elif allow_pickle and pickle_weights(folder):
        _refuse_other_weights(config, "its pickle files", label)
        return open_pickled(folder, label, config)
    else:
        raise no_weights_error(folder, label)
    return Checkpoint(label, folder, tensors, config)


def _refuse_other_weights(config: dict, reading: str, label: str) -> None:
    """config.json's ``transformers_weights`` makes transformers load that file instead of the usual names; a
    merge that read other weights would not be of the model transformers loads."""
    named = config.get("transformers_weights")
    if named is not None and named != reading:
        raise ModelError(f"config.json names {named!r} as the weights to load (transformers_weights), but the "
                         f"folder's weights are {reading}", file=label,
                         hint="remove transformers_weights from config.json, or keep only the weights it names, "
                              f"as {SINGLE_FILE} or {INDEX_FILE} with its shards")
