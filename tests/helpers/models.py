"""Tiny synthetic checkpoints (several shards each, so streaming is exercised) and the helpers to read
them back and write specs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from mergekit_lite.testing.synthetic import LlamaShape, write_model

SHAPE = LlamaShape(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=256)


TIED = LlamaShape(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=256, tied=True)


SHARD = 60_000  # bytes: every tiny model is split over several shards, so the streaming path is exercised


FINETUNES = {"ft-a": 1, "ft-b": 2, "ft-c": 3}


def build_set(root: Path, dtype: torch.dtype, shape: LlamaShape = SHAPE) -> Path:
    write_model(str(root / "base"), shape, dtype=dtype, seed=0, max_shard_size=SHARD)
    for name, delta_seed in FINETUNES.items():
        write_model(str(root / name), shape, dtype=dtype, seed=0, delta_seed=delta_seed, max_shard_size=SHARD)
    return root


def read_folder(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an output folder, read with the safetensors library (an independent reader)."""
    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                for key in f.keys():
                    assert key not in tensors, f"{key} is in two shards"
                    tensors[key] = f.get_tensor(key)
    return tensors


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def edit_config(folder: Path, **changes) -> Path:
    """Set ``changes`` in ``folder``'s config.json (a value of None removes the key); returns the folder."""
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder
