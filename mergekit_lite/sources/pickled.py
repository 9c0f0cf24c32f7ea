"""Pickle checkpoints (``pytorch_model.bin``), only when the user opts in with ``--allow-pickle``.

Unpickling runs whatever the file asks for, so a checkpoint from a stranger can run code on load. They are
refused by default (checkpoint.py says why and how to convert). With the opt-in, files are read by
``torch.load(weights_only=True)``, whose unpickler builds tensors and plain containers and refuses every
other global (``exec``, ``os.system``, any class): a file that asks for one is an error, not a warning, and
nothing from it runs. The result must be a flat ``{name: tensor}`` state dict.

Files in the zip format (torch >= 1.6) are memory-mapped, so opening one reads its pickle, not its tensor
data; the legacy format cannot be mapped and is read into memory whole.
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from typing import Any, Optional

import torch

from ..dtypes import TORCH_TO_SAFETENSORS, dtype_name, itemsize
from ..errors import ModelError
from ..safetensors_format import TensorInfo, open_regular
from .checkpoint import PICKLE_SUFFIXES, Checkpoint, contained_path, read_index, refuse_two_layouts, shard_path

PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
REFUSED_HINT = ("the file asks for more than tensors and plain containers, so it is refused even with "
                "--allow-pickle; get a safetensors version of the model")


class PickledCheckpoint(Checkpoint):
    """A Checkpoint whose tensors were loaded (memory-mapped where possible) from pickle files."""

    def __init__(self, label: str, folder: str, tensors: dict[str, TensorInfo], config: dict[str, Any],
                 loaded: dict[str, torch.Tensor]):
        super().__init__(label, folder, tensors, config)
        self._loaded = loaded

    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """A new contiguous CPU tensor (never a view the merge could write through into the mapping)."""
        tensor = self._loaded[name]
        if rows is not None:
            tensor = tensor[rows[0]:rows[1]]
        return tensor.clone(memory_format=torch.contiguous_format)

    def will_read(self, name: str, rows: Optional[tuple[int, int]] = None) -> None:
        """No hint: the tensors were loaded when the checkpoint was opened."""

    def close(self) -> None:
        self._loaded = {}


def open_pickled(folder: str, label: str, config: dict[str, Any]) -> PickledCheckpoint:
    """Load the pickle weights of ``folder`` (an index and its shards, or one file) safely."""
    return _open(label, folder, _weight_files(folder, label), config)


def open_pickle_files(label: str, folder: str, paths: list[str], config: dict[str, Any]) -> PickledCheckpoint:
    """Load whole pickle files (a LoRA adapter's adapter_model.bin) safely; paths already checked."""
    return _open(label, folder, [(path, None) for path in paths], config)


def _open(label: str, folder: str, files: list[tuple[str, Optional[list[str]]]],
          config: dict[str, Any]) -> PickledCheckpoint:
    tensors: dict[str, TensorInfo] = {}
    loaded: dict[str, torch.Tensor] = {}
    for path, names in files:
        state = load_state_dict(path)
        for name in names if names is not None else list(state):
            if name not in state:
                raise ModelError(f"the index lists tensor '{name}' in {os.path.basename(path)}, but that file does not "
                                 "have it", file=os.path.join(folder, PICKLE_INDEX),
                                 hint="the index and shards are from different versions")
            tensor = state[name]
            loaded[name] = tensor
            nbytes = tensor.numel() * itemsize(tensor.dtype)
            tensors[name] = TensorInfo(name, tensor.dtype, tuple(tensor.shape), os.path.abspath(path), 0, nbytes)
    return PickledCheckpoint(label, folder, tensors, config, loaded)


def _weight_files(folder: str, label: str) -> list[tuple[str, Optional[list[str]]]]:
    """[(file, the tensor names the index puts in it, or None for all)]; paths checked to stay inside."""
    index_path = os.path.join(folder, PICKLE_INDEX)
    if os.path.exists(index_path):
        by_shard: dict[str, list[str]] = {}
        for name, shard in read_index(contained_path(folder, PICKLE_INDEX, label)).items():
            by_shard.setdefault(shard, []).append(name)
        refuse_two_layouts(folder, label, PICKLE_SINGLE, PICKLE_INDEX, set(by_shard))
        return [(shard_path(folder, shard, index_path), names) for shard, names in by_shard.items()]
    pickles = sorted(n for n in os.listdir(folder) if n.endswith(PICKLE_SUFFIXES))
    if PICKLE_SINGLE in pickles:
        pickles = [PICKLE_SINGLE]
    if len(pickles) != 1:
        raise ModelError(f"several pickle files and no {PICKLE_INDEX}: {', '.join(pickles[:4])}", file=label,
                         hint=f"add the model's {PICKLE_INDEX}, or keep only its {PICKLE_SINGLE}")
    return [(contained_path(folder, pickles[0], label), None)]


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` of one file, checked to be a flat {name: dense tensor} dict."""
    try:
        os.close(open_regular(path))   # a FIFO would block torch.load's open forever, a device never end
    except OSError as exc:
        raise ModelError(f"cannot read: {exc.strerror or exc}", file=path,
                         hint="give the model's weight files themselves") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # torch warns about pickle protocols; our error says what matters
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - any failure of the unpickler on these bytes is the file's fault
        raise _load_error(path, exc) from None
    if not isinstance(state, dict):
        raise ModelError(f"holds a {type(state).__name__}, not a state dict of tensors", file=path,
                         hint="save the model's state_dict() (or convert it to safetensors)")
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise ModelError(f"entry {name!r} is a {type(tensor).__name__}, not a tensor", file=path,
                             hint="save the model's state_dict() itself, not a dict that wraps it")
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.dtype not in TORCH_TO_SAFETENSORS:
            raise ModelError(f"tensor '{name}' is {dtype_name(tensor.dtype)} ({tensor.layout}), which cannot be merged",
                             file=path, hint="convert the checkpoint to dense float tensors first")
    return state


def _load_error(path: str, exc: Exception) -> ModelError:
    text = str(exc)
    refused = re.search(r"WeightsUnpickler error: (.+?)(?: was not an allowed global| Please|\n|$)", text)
    if refused and refused.group(1).strip():
        return ModelError(f"refused by torch.load(weights_only=True): {refused.group(1).strip()}", file=path,
                          hint=REFUSED_HINT)
    if "WeightsUnpickler error" in text:   # the reason is on a later line
        detail = next((line.strip() for line in text.split("WeightsUnpickler error:", 1)[1].splitlines()
                       if line.strip()), "unsupported content")
        return ModelError(f"refused by torch.load(weights_only=True): {detail}", file=path, hint=REFUSED_HINT)
    first = text.strip().splitlines()[0].split(". ")[0].rstrip(".") if text.strip() else type(exc).__name__
    return ModelError(f"cannot be read as a torch checkpoint ({first})", file=path,
                      hint="the file is corrupt or not a torch checkpoint; download it again")
