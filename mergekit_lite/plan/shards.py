"""The shard plan: which output files a merge writes and which tensors go in each, from the plan alone.

Shapes and dtypes are known from the headers, so the files are planned before anything is computed: each
shard is an independent unit of work (any process may write it), resume checks finished shards against it,
and the dry run reports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..dtypes import itemsize
from .planner import MergePlan


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


@dataclass(frozen=True)
class ShardPlan:
    """One output file and the tensors planned into it: an independent unit of work (any process may write it)."""

    file: str
    entries: tuple[Entry, ...]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def plan_output(entries: Sequence[Entry], max_bytes: int) -> list[ShardPlan]:
    """The output files and their tensors, from the plan alone."""
    shards = plan_shards(entries, max_bytes)
    return [ShardPlan(file, tuple(shard)) for file, shard in zip(shard_filenames(len(shards)), shards)]


def file_order(entries: Sequence[Entry]) -> list[Entry]:
    """The order tensors are stored in a shard: largest itemsize first (stable), which keeps every tensor
    naturally aligned after the 8-byte-padded header, as the safetensors library itself writes them."""
    return sorted(entries, key=lambda e: -itemsize(e.dtype))


def output_layout(plan: MergePlan, max_shard_size: int) -> list[ShardPlan]:
    """The output files and the tensors in each, in plan order: known before anything is computed."""
    return plan_output([Entry(j.name, j.dtype, j.shape) for j in plan.jobs], max_shard_size)
