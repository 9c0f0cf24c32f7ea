"""A PEFT LoRA adapter folder on disk: its config, its tensor table, and what each tensor is for.

``adapter_model.safetensors`` is one file. Every key starts with ``base_model.model.`` followed by the
module path inside the transformers model (shared/research/lora.md 1.3):

    M.lora_A.weight (r, in)   M.lora_B.weight (out, r)   M.lora_B.bias (out,)          -> M.weight, M.bias
    M.lora_embedding_A (r, V)  M.lora_embedding_B (d, r)                                -> M.weight (V, d)
    M.lora_magnitude_vector (out,) or (d,)  (DoRA)                                      -> M.weight
    anything else (M.base_layer.weight, N.bias, modules_to_save copies)                 -> replaces that tensor

Opening reads the header only; tensors are read one at a time when a module is folded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import ModelError
from ..safetensors_format import TensorInfo, read_header
from ..sources.checkpoint import Checkpoint, contained_path
from .config import LoraSettings, read_settings

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt")
PREFIX = "base_model.model."
LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
# What may follow each part: an optional adapter name (peft strips it on save; in-memory dumps keep it),
# then .weight / .bias for module parameters; the embedding factors are bare parameters.
_TAILS = {
    "lora_A": ("weight",), "lora_B": ("weight", "bias"),
    "lora_embedding_A": ("",), "lora_embedding_B": ("",), "lora_magnitude_vector": ("", "weight"),
}


@dataclass
class LoraModule:
    """The adapter keys of one adapted module of the base (``name`` is its module path)."""

    name: str
    keys: dict[str, str] = field(default_factory=dict)   # part (lora_A, lora_B, lora_B.bias, ...) -> adapter key

    @property
    def is_embedding(self) -> bool:
        return "lora_embedding_A" in self.keys or "lora_embedding_B" in self.keys

    @property
    def down(self) -> Optional[str]:
        return self.keys.get("lora_embedding_A" if self.is_embedding else "lora_A")

    @property
    def up(self) -> Optional[str]:
        return self.keys.get("lora_embedding_B" if self.is_embedding else "lora_B")

    @property
    def magnitude(self) -> Optional[str]:
        return self.keys.get("lora_magnitude_vector")

    @property
    def up_bias(self) -> Optional[str]:
        return self.keys.get("lora_B.bias")


@dataclass
class Adapter:
    """One opened adapter: settings, adapted modules, full-tensor replacements, lazy tensor reads."""

    label: str
    folder: str
    settings: LoraSettings
    modules: dict[str, LoraModule]
    replacements: dict[str, str]      # base tensor name -> adapter key holding its new full value
    base_layer_copies: set[str]       # the replacements saved from a LoRA layer's base_layer (embedding copies)
    file: Checkpoint

    def info(self, key: str) -> TensorInfo:
        return self.file.tensors[key]

    def read(self, key: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """One adapter tensor as stored (or the block of its rows [start, end))."""
        return self.file.read(key, rows)

    def close(self) -> None:
        self.file.close()


def open_adapter(folder: str, label: str, allow_pickle: bool = False) -> Adapter:
    """Read an adapter's config and tensor table (no tensor data) and sort its keys by purpose.

    ``allow_pickle``: an adapter saved only as ``adapter_model.bin`` is loaded with
    torch.load(weights_only=True) (mergekit_lite.sources.pickled); without it, it is refused."""
    if not os.path.isdir(folder):
        raise ModelError("adapter folder not found" if not os.path.exists(folder) else "is a file, not a folder",
                         file=label, hint="give the folder that holds adapter_config.json")
    settings = read_settings(folder, label)
    file = _weights(folder, label, allow_pickle)
    tensors = file.tensors
    modules: dict[str, LoraModule] = {}
    replacements: dict[str, str] = {}
    copies: set[str] = set()
    for key in tensors:
        if not key.startswith(PREFIX):
            raise ModelError(f"key '{key}' does not start with '{PREFIX}'", file=label,
                             hint="this is not a PEFT LoRA adapter of a transformers model (diffusers/kohya "
                                  "files have other key layouts)")
        try:
            parsed = _lora_key(key[len(PREFIX):])
        except ValueError:
            raise ModelError(f"key '{key}' is not a LoRA tensor name we know", file=label,
                             hint="expected M.lora_A.weight, M.lora_B.weight/bias, M.lora_embedding_A/B or "
                                  "M.lora_magnitude_vector") from None
        if parsed is not None:
            module, part = parsed
            entry = modules.setdefault(module, LoraModule(module))
            if part in entry.keys:
                raise ModelError(f"two tensors for {part} of module '{module}': '{entry.keys[part]}' and '{key}'",
                                 file=label, hint="the file holds several adapters; save one adapter per folder")
            entry.keys[part] = key
            continue
        target, from_base_layer = _replaced_tensor(key[len(PREFIX):])
        if target in replacements:
            raise ModelError(f"two tensors replace '{target}': '{replacements[target]}' and '{key}'", file=label)
        replacements[target] = key
        if from_base_layer:
            copies.add(target)
    for module in modules.values():
        _check_parts(module, label)
    return Adapter(label, os.path.abspath(folder), settings, modules, replacements, copies, file)


def _weights(folder: str, label: str, allow_pickle: bool) -> Checkpoint:
    """The adapter's tensor file (header only), refusing a link out of the folder and, unless allowed, pickles."""
    path = os.path.join(folder, WEIGHTS_FILE)
    if os.path.lexists(path):
        tensors, _ = read_header(contained_path(folder, WEIGHTS_FILE, label))
        return Checkpoint(label, os.path.abspath(folder), tensors, {})
    pickled = [n for n in PICKLE_FILES if os.path.exists(os.path.join(folder, n))]
    if pickled and allow_pickle:
        from ..sources.pickled import open_pickle_files

        return open_pickle_files(label, os.path.abspath(folder), [contained_path(folder, pickled[0], label)], {})
    if pickled:
        raise ModelError(f"only a pickle adapter ({pickled[0]}) found; it is refused because loading a pickle "
                         "can run arbitrary code", file=label,
                         hint="convert it (load it with peft, save_pretrained(dir, safe_serialization=True)), or, if "
                              "you trust its source, pass --allow-pickle (tensors only, torch.load(weights_only=True))")
    raise ModelError(f"no {WEIGHTS_FILE} in the adapter folder", file=label,
                     hint="give the folder peft's save_pretrained() wrote")


def _lora_key(rest: str) -> Optional[tuple[str, str]]:
    """``model.layers.0.q_proj.lora_A[.default].weight`` -> (``model.layers.0.q_proj``, ``lora_A``); None for
    a key without a LoRA part; ValueError for a LoRA part followed by something we do not know."""
    parts = rest.split(".")
    for i, part in enumerate(parts):
        if part in LORA_PARTS and i > 0:
            tail = parts[i + 1:]
            param = tail[-1] if tail and tail[-1] in ("weight", "bias") else ""
            adapter_name = tail[:-1] if param else tail
            if len(adapter_name) > 1 or param not in _TAILS[part]:
                raise ValueError(rest)
            return ".".join(parts[:i]), "lora_B.bias" if param == "bias" else part
    return None


def _replaced_tensor(rest: str) -> tuple[str, bool]:
    """The base tensor a full tensor replaces: drop ``.base_layer`` and ``.modules_to_save.<name>``."""
    parts = rest.split(".")
    out, from_base_layer, i = [], False, 0
    while i < len(parts):
        if parts[i] == "base_layer":
            from_base_layer = True
        elif parts[i] == "modules_to_save" and i + 1 < len(parts) - 1:
            i += 1  # skip the adapter name too
        else:
            out.append(parts[i])
        i += 1
    return ".".join(out), from_base_layer


def _check_parts(module: LoraModule, label: str) -> None:
    present = set(module.keys)
    if module.is_embedding:
        needed, extra = {"lora_embedding_A", "lora_embedding_B"}, present & {"lora_A", "lora_B", "lora_B.bias"}
    else:
        needed, extra = {"lora_A", "lora_B"}, set()
    missing = sorted(needed - present)
    if missing or extra:
        what = f"has no {missing[0]}" if missing else f"mixes embedding and linear LoRA tensors ({sorted(extra)[0]})"
        raise ModelError(f"module '{module.name}' {what}", file=label,
                         hint="the adapter file is incomplete or not a PEFT LoRA adapter")
