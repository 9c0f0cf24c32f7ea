"""Writing output shards whose layout is planned before any tensor is computed.

Shapes and dtypes are known from the plan, so each shard's header is written first and every tensor is
then written straight into its place with a positional write. Nothing accumulates in memory: the peak does
not grow with the shard size (mergekit holds a whole shard, 5 GB by default, in RAM before writing it).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .dtypes import itemsize
from .errors import OutputError
from .safetensors_format import build_header, tensor_bytes, write_from

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def plan_shards(entries: Sequence[Entry], max_bytes: int) -> list[list[Entry]]:
    """Greedy split in order: a shard is closed when the next tensor would push it past ``max_bytes``.

    A tensor larger than ``max_bytes`` gets a shard of its own, as in transformers' save_pretrained.
    """
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def shard_filenames(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardWriter:
    """One output safetensors file: tensors written into their planned places, the header last.

    Until ``close`` writes the header, the file starts with eight zero bytes (a header length of 0), which
    every safetensors reader rejects: a shard cut short by a full disk, a crash or Ctrl-C can never be
    loaded as if it were complete, with zeros where tensors are missing."""

    def __init__(self, path: str, entries: Sequence[Entry], metadata: dict[str, str] | None = None):
        # Largest itemsize first keeps every tensor naturally aligned (the header is padded to 8 bytes),
        # which is the order the safetensors library itself writes.
        ordered = sorted(entries, key=lambda e: -itemsize(e.dtype))
        header, offsets = build_header([(e.name, e.dtype, e.shape) for e in ordered], metadata)
        self.path = path
        self._entries = {e.name: e for e in entries}
        self._offsets = offsets
        self._header = header
        self._missing = {e.name: e.nbytes for e in entries}   # bytes not yet written, per tensor
        self.size = len(header) + sum(e.nbytes for e in entries)
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(self._fd, self.size)
        except OSError as exc:
            raise OutputError(f"cannot write: {exc.strerror}", file=path,
                              hint="check free disk space and permissions of the output folder") from None

    def write(self, name: str, tensor: torch.Tensor, rows: Optional[tuple[int, int]] = None) -> None:
        """Write a whole tensor, or the block of its rows [start, end), into its planned place."""
        entry = self._entries[name]
        shape, offset = entry.shape, self._offsets[name]
        if rows is not None:
            shape = (rows[1] - rows[0], *entry.shape[1:])
            offset += rows[0] * (entry.nbytes // entry.shape[0])
        if tensor.dtype != entry.dtype or tuple(tensor.shape) != shape:
            raise AssertionError(f"{name}: planned {entry.dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor_bytes(tensor)
        try:
            write_from(self._fd, offset, data)
        except OSError as exc:
            raise OutputError(f"cannot write tensor '{name}': {exc.strerror}", file=self.path,
                              hint="free some disk space and run again (the unfinished files are left where they are; "
                                   "the next run of this merge deletes them)") from None
        self._missing[name] -= len(data)

    @property
    def complete(self) -> bool:
        return not any(self._missing.values())

    def close(self) -> None:
        """Flush to disk. A shard is complete only when every planned byte was written."""
        if not self.complete:
            raise AssertionError(f"{self.path}: tensors not fully written: "
                                 f"{sorted(n for n, left in self._missing.items() if left)[:3]}")
        try:
            write_from(self._fd, 0, memoryview(self._header))
            os.fsync(self._fd)
        except OSError as exc:
            raise OutputError(f"cannot write the header: {exc.strerror}", file=self.path,
                              hint="free some disk space and run again") from None
        finally:
            os.close(self._fd)

    def abort(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
