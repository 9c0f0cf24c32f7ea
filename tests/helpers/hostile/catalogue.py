"""The hostile-input catalogue: the cases' registry and the helpers every subject shares."""


from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from mergekit_lite.output.folder import LOCK_SUFFIX
from mergekit_lite.testing.synthetic import LlamaShape, write_model

TINY = LlamaShape(hidden=16, intermediate=32, layers=2, heads=2, kv_heads=1, vocab=32)
TINY_SHARD = 3_000     # bytes: the sharded model has several shards
MODEL_FILE = "model.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Models:
    """Good inputs every case may reference (never modified) and copy (then damage its copy)."""

    root: Path
    a: Path            # single file
    b: Path            # single file, another fine-tune
    sharded: Path      # several shards and an index

    def copy(self, source: Path, dest: Path) -> Path:
        shutil.copytree(source, dest)
        return dest


def build_models(root: Path) -> Models:
    write_model(str(root / "a"), TINY, seed=0, delta_seed=1)
    write_model(str(root / "b"), TINY, seed=0, delta_seed=2)
    write_model(str(root / "sharded"), TINY, seed=0, delta_seed=3, max_shard_size=TINY_SHARD)
    return Models(root, root / "a", root / "b", root / "sharded")


@dataclass
class Scenario:
    args: list[str]                      # after `merge`
    code: int                            # expected exit code
    stderr: str                          # expected stderr, exactly
    marker: Optional[Path] = None        # a file the planted code would write: it must never exist
    out: Optional[Path] = None           # the -o folder: must not exist after a refused run
    preserved: tuple[Path, ...] = ()     # the user's files and folders: byte-for-byte the same afterwards


@dataclass(frozen=True)
class Case:
    group: str
    name: str
    build: Callable[[Path, Models], Scenario]
    tags: tuple[str, ...] = field(default=())


CASES: list[Case] = []


def case(group: str, *tags: str):
    def register(fn: Callable[[Path, Models], Scenario]) -> Callable[[Path, Models], Scenario]:
        CASES.append(Case(group, fn.__name__, fn, tags))
        return fn
    return register



# ---------------------------------------------------------------- helpers

def linear_spec(tmp: Path, *models: Path, extra: str = "", name: str = "spec.yaml") -> Path:
    lines = ["merge_method: linear", "models:"] + [f"  - model: {m}\n    parameters: {{weight: 0.5}}" for m in models]
    path = tmp / name
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def run(tmp: Path, spec: Path, *extra: str) -> list[str]:
    return ["run", str(spec), "-o", str(tmp / "out"), "--no-validate", "--quiet", *extra]


def split_file(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def join_file(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def damaged(tmp: Path, models: Models, mutate: Callable[[Path], None]) -> tuple[Path, Path, Path]:
    """(spec, damaged folder, its model.safetensors): a copy of ``a`` with its file mutated, merged with ``b``."""
    bad = models.copy(models.a, tmp / "bad")
    mutate(bad / MODEL_FILE)
    return linear_spec(tmp, models.b, bad), bad, bad / MODEL_FILE


def model_error(bad: Path, where: str, what: str, hint: str) -> str:
    return f"error: {bad}: models[1].model: {where}{what}\nHint: {hint}\n"


class PlantedCode:
    """Unpickling this runs ``exec`` of its code: the payload of a hostile pickle."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def hostile_pickle(folder: Path, marker: Path) -> None:
    folder.mkdir(parents=True)
    state = {"model.embed_tokens.weight": torch.zeros(2, 2),
             "payload": PlantedCode(f"open({str(marker)!r}, 'w').write('code ran')")}
    torch.save(state, folder / "pytorch_model.bin")


def snapshot(paths: tuple[Path, ...]) -> dict[str, object]:
    """Everything under ``paths`` as the user left it: kind, bytes or link target, walked without following
    links, so a case can check that a run deleted, replaced or wrote through nothing of theirs."""
    state: dict[str, object] = {}
    for root in paths:
        for path in [root, *(sorted(root.rglob("*")) if root.is_dir() and not root.is_symlink() else [])]:
            if path.is_symlink():
                state[str(path)] = ("link", os.readlink(path))
            elif path.is_file():
                state[str(path)] = ("file", path.read_bytes())
            elif path.is_dir():
                state[str(path)] = ("dir",)
            else:
                state[str(path)] = ("missing" if not os.path.lexists(path) else "other",)
    return state


def leftover_problems(out: Path) -> list[str]:
    """What a failed run left that could pass for a finished output; [] when nothing did.

    Allowed: no OUT, no lock file, and an OUT.partial without index or config.json (they are written after the
    last tensor) whose shards are each either finished (every tensor written, none left zero-filled) or
    unloadable (the shard being written when the run stopped has no header yet)."""
    from safetensors import SafetensorError, safe_open

    problems = [f"{p} exists" for p in (out, Path(f"{out}{LOCK_SUFFIX}"), Path(f"{out}.lock")) if os.path.lexists(p)]
    partial = Path(f"{out}.partial")
    problems += [f"{partial / n} exists" for n in (INDEX, "config.json") if (partial / n).exists()]
    for shard in sorted(partial.glob("*.safetensors")):
        try:
            with safe_open(str(shard), framework="pt") as f:
                problems += [f"{shard}: '{k}' is all zeros" for k in f.keys() if not f.get_tensor(k).abs().sum() > 0]
        except SafetensorError:
            pass
    return problems


CORRUPT = "the file is corrupt; download it again"
CRAFTED = "the file is corrupt or was crafted; download it again"
EMBED = "model.embed_tokens.weight"
